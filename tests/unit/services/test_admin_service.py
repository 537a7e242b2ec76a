"""The administrative changes (services/admin.py) over a fake directory whose writes run ``also`` like
a transaction: each change records its event with it, and a trail that cannot be written leaves the
directory as it was."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from safepacs.audit import EventID, ObjectKind, Outcome, Participant
from safepacs.auth.passwords import verify_password
from safepacs.auth.tokens import PREFIX
from safepacs.errors import AuditError, NotFoundError
from safepacs.records import TokenRecord, UserRecord
from safepacs.services.admin import AdminService, Change
from safepacs.services.audit import Auditor, Types
from safepacs.services.audittrail import MemoryAuditSink
from safepacs.storage import EnvelopeCipher, MemoryKeyProvider
from safepacs.types import Peer, Scope, Service
from tests.support.fakes import ARCHIVE_AE, FakeDirectory, FakeIndex

BY = Change(Participant("root", requestor=True), "safepacs peer add CT2 --host 192.0.2.2")
STUDY = "1.2.826.0.4.1"


def admin() -> tuple[AdminService, FakeDirectory, MemoryAuditSink]:
    d, sink = FakeDirectory(), MemoryAuditSink()
    d.users["bob"] = UserRecord("bob", "hash", frozenset({"radiologist"}), False, False)
    d.peers["CT1"] = Peer("CT1", "192.0.2.1", 104, frozenset({Service.STORE}), cert_sha256="aa")
    d.certificates["aa"] = ("CT1", b"PEM")
    now = datetime.now(UTC)
    d.tokens["t0"] = TokenRecord("t0", "bob", "0" * 64, frozenset(), now, now + timedelta(days=1), None)
    d.groups.add((STUDY, "g0"))
    d.grants[(STUDY, "bob")] = None
    # The composition root builds the admin service's auditor enabled, whatever audit.record says.
    auditor = Auditor(sink, ARCHIVE_AE)
    cipher = EnvelopeCipher(MemoryKeyProvider())
    return AdminService(d, FakeIndex(), auditor, lambda: cipher), d, sink  # type: ignore[arg-type]


Call = Callable[[AdminService], object]
CHANGES: list[tuple[str, Call, tuple[str, str], str]] = [
    (
        "add_peer",
        lambda s: s.add_peer(Peer("CT2", "192.0.2.2", 104, frozenset()), BY),
        Types.SECURITY_CONFIGURATION,
        "CT2",
    ),
    ("remove_peer", lambda s: s.remove_peer("CT1", BY), Types.SECURITY_CONFIGURATION, "CT1"),
    (
        "record_issued_certificate",
        lambda s: s.record_issued_certificate("CT1", "bb", "01", None, BY),
        Types.SECURITY_CONFIGURATION,
        "CT1",
    ),
    ("revoke_certificates", lambda s: s.revoke_certificates("CT1", BY), Types.SECURITY_CONFIGURATION, "CT1"),
    ("add_user", lambda s: s.add_user("carol", frozenset({"referrer"}), BY), Types.ROLES_CHANGED, "carol"),
    ("set_disabled", lambda s: s.set_disabled("bob", True, BY), Types.USER_ATTRIBUTES_CHANGED, "bob"),
    ("reset_password", lambda s: s.reset_password("bob", BY), Types.USER_ATTRIBUTES_CHANGED, "bob"),
    ("enrol_totp", lambda s: s.enrol_totp("bob", BY), Types.USER_ATTRIBUTES_CHANGED, "bob"),
    ("remove_totp", lambda s: s.remove_totp("bob", BY), Types.USER_ATTRIBUTES_CHANGED, "bob"),
    ("unlock", lambda s: s.unlock("bob", BY), Types.USER_ATTRIBUTES_CHANGED, "bob"),
    (
        "issue_token",
        lambda s: s.issue_token("bob", timedelta(days=1), frozenset(), BY),
        Types.USER_ATTRIBUTES_CHANGED,
        "bob",
    ),
    (
        "set_scope",
        lambda s: s.set_scope("bob", Scope(groups=frozenset({"g"})), BY),
        Types.ROLES_CHANGED,
        "bob",
    ),
    ("add_study_group", lambda s: s.add_study_group(STUDY, "g", BY), Types.USER_ATTRIBUTES_CHANGED, STUDY),
    ("revoke_token", lambda s: s.revoke_token("t0", BY), Types.USER_ATTRIBUTES_CHANGED, "t0"),
    (
        "remove_study_group",
        lambda s: s.remove_study_group(STUDY, "g0", BY),
        Types.USER_ATTRIBUTES_CHANGED,
        STUDY,
    ),
    (
        "grant_study",
        lambda s: s.grant_study(STUDY, "carol", None, BY),
        Types.USER_ATTRIBUTES_CHANGED,
        "carol",
    ),
    ("revoke_grant", lambda s: s.revoke_grant(STUDY, "bob", BY), Types.USER_ATTRIBUTES_CHANGED, "bob"),
]


@pytest.mark.parametrize(("name", "call", "type_code", "target"), CHANGES, ids=[c[0] for c in CHANGES])
def test_each_change_records_its_event(
    name: str, call: Call, type_code: tuple[str, str], target: str
) -> None:
    service, d, sink = admin()
    before = d.snapshot()
    call(service)
    assert d.snapshot() != before, name
    (event,) = sink.events
    assert (event.event_id, event.outcome, event.type_code) == (
        EventID.SECURITY_ALERT,
        Outcome.SUCCESS,
        type_code,
    )
    assert event.participants[0] == BY.who and event.outcome_description == BY.command
    (account,) = event.objects
    assert (account.kind, account.id) == (ObjectKind.ACCOUNT, target)
    assert account.detail == (("Alert Description", BY.command),)


@pytest.mark.parametrize(("name", "call", "type_code", "target"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_whose_record_fails_is_not_made(
    name: str, call: Call, type_code: tuple[str, str], target: str
) -> None:
    service, d, sink = admin()
    before = d.snapshot()
    sink.fail = True
    with pytest.raises(AuditError):
        call(service)
    assert d.snapshot() == before, name


def test_a_peer_acting_for_an_unknown_user_is_refused() -> None:
    service, d, sink = admin()
    with pytest.raises(NotFoundError, match="no user named 'nobody'"):
        service.add_peer(Peer("CT2", "192.0.2.2", 104, frozenset(), user="nobody"), BY)
    assert "CT2" not in d.peers and sink.events == []


def test_a_peer_acting_for_a_known_user_is_registered() -> None:
    service, d, _ = admin()
    service.add_peer(Peer("CT2", "192.0.2.2", 104, frozenset(), user="bob"), BY)
    assert d.peers["CT2"].user == "bob"


def test_an_issued_token_is_stored_by_the_hash_of_its_secret() -> None:
    service, d, _ = admin()
    issued = service.issue_token("bob", timedelta(days=30), frozenset({"find"}), BY)
    stored = d.tokens[issued.record.token_id]
    assert stored == issued.record and stored.user_name == "bob" and stored.scopes == frozenset({"find"})
    head = f"{PREFIX}_{stored.token_id}_"
    assert issued.token.startswith(head)
    secret = issued.token.removeprefix(head)  # token_urlsafe: the secret itself may hold "_"
    assert stored.secret_sha256 == hashlib.sha256(secret.encode("ascii")).hexdigest()
    assert secret not in repr(stored)
    assert stored.expires_at - stored.created_at == timedelta(days=30)
    assert stored.created_at <= datetime.now(UTC)


def test_a_token_for_an_unknown_user_is_refused() -> None:
    service, d, sink = admin()
    with pytest.raises(NotFoundError):
        service.issue_token("nobody", timedelta(days=1), frozenset(), BY)
    assert list(d.tokens) == ["t0"] and sink.events == []


def test_a_generated_password_is_stored_hashed_and_must_be_changed() -> None:
    service, d, _ = admin()
    password = service.add_user("carol", frozenset({"referrer"}), BY)
    assert password is not None
    carol = d.users["carol"]
    assert carol.must_change_password and verify_password(carol.password_hash, password)
    assert service.add_user("dave", frozenset(), BY, password="correct horse battery") is None
    assert not d.users["dave"].must_change_password


def test_revoking_an_already_revoked_certificate_is_recorded_as_asked() -> None:
    service, d, sink = admin()
    d.revoked.add("aa")
    assert service.revoke_certificates("CT1", BY, only="aa") == 0
    (event,) = sink.events
    assert event.type_code == Types.SECURITY_CONFIGURATION
    assert service.revoke_certificates("CT1", BY) == 0
    assert len(sink.events) == 1  # nothing there to revoke, nothing asked for by name: not recorded
