"""The authorizer (services/gate.py) over a fake directory: the policy decides, a refusal is recorded
before AccessDenied reaches the caller, and who is asking is read afresh from the directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from safepacs.audit import AuditObject, EventID, ObjectKind, Outcome
from safepacs.errors import AccessDenied, AuditError
from safepacs.records import TokenRecord, UserRecord
from safepacs.services.audit import Auditor, Types
from safepacs.services.audittrail import MemoryAuditSink
from safepacs.services.gate import Gate
from safepacs.types import Peer, Principal, PrincipalKind, Service
from tests.support.fakes import ARCHIVE_AE, FakeDirectory, peer, user


def gate(directory: FakeDirectory | None = None) -> tuple[Gate, MemoryAuditSink, FakeDirectory]:
    sink, d = MemoryAuditSink(), directory or FakeDirectory()
    return Gate(d, Auditor(sink, ARCHIVE_AE)), sink, d


def test_a_principal_allowed_the_service_passes_and_nothing_is_recorded() -> None:
    g, sink, _ = gate()
    g.require(peer(Service.STORE, Service.FIND), Service.FIND)
    g.require(
        Principal(PrincipalKind.USER, "root", roles=frozenset({"admin"}), allow=frozenset(Service)),
        Service.DELETE,
    )
    assert sink.events == []


@pytest.mark.parametrize(
    ("principal", "service"),
    [(peer(Service.FIND), Service.STORE), (user(Service.GET), Service.DELETE), (peer(), Service.ECHO)],
)
def test_a_refusal_is_recorded_as_a_security_alert(principal: Principal, service: Service) -> None:
    g, sink, _ = gate()
    with pytest.raises(AccessDenied):
        g.require(principal, service)
    (event,) = sink.events
    assert (event.event_id, event.outcome) == (EventID.SECURITY_ALERT, Outcome.MINOR_FAILURE)
    assert event.type_code == Types.RESTRICTED_FUNCTION
    assert event.outcome_description is not None
    assert event.outcome_description.startswith(f"{service.value}: ")
    who, archive = event.participants
    assert who.user_id == principal.name and who.requestor
    assert archive.ae_title == ARCHIVE_AE and not archive.requestor


def test_the_refusal_is_recorded_before_access_denied_reaches_the_caller() -> None:
    g, sink, _ = gate()
    sink.fail = True  # the trail cannot be written: the record is attempted first, so that fails instead
    with pytest.raises(AuditError):
        g.require(peer(Service.FIND), Service.STORE)


def test_no_principal_is_refused_and_nothing_recorded() -> None:
    g, sink, _ = gate()
    with pytest.raises(AccessDenied):
        g.require(None, Service.FIND)
    assert sink.events == []


def test_refused_records_what_was_asked_for() -> None:
    g, sink, _ = gate()
    target = AuditObject(ObjectKind.NODE, "NOWHERE")
    g.refused(peer(Service.MOVE), "not a registered peer", (target,))
    (event,) = sink.events
    assert event.objects == (target,) and event.outcome_description == "not a registered peer"


def test_lookups_read_the_directory_afresh_on_every_call() -> None:
    g, _, d = gate()
    assert g.peer("CT1") is None and g.user("bob") is None and g.token_holder("t1") is None
    modality = Peer("CT1", "192.0.2.1", 104, frozenset({Service.STORE}))
    bob = UserRecord("bob", "hash", frozenset({"referrer"}), False, False)
    now = datetime.now(UTC)
    token = TokenRecord("t1", "bob", "0" * 64, frozenset(), now, now + timedelta(days=1), None)
    d.peers["CT1"], d.users["bob"], d.tokens["t1"] = modality, bob, token
    assert g.peer("CT1") == modality and g.user("bob") == bob
    assert g.token_holder("t1") == (token, bob)
    del d.users["bob"]
    assert g.token_holder("t1") == (token, None)  # the token's user is gone
    d.peers["CT1"] = Peer("CT1", "192.0.2.1", 104, frozenset())
    changed = g.peer("CT1")
    assert changed is not None and changed.allow == frozenset()  # no cache kept the old peer
    assert d.reads == 8  # every call one read


def test_pinned_and_revoked_certificates_are_read_afresh() -> None:
    g, _, d = gate()
    assert g.pinned_certificates() == [] and not g.certificate_revoked("ab")
    d.certificates["ab"] = ("CT1", b"PEM")
    assert g.pinned_certificates() == [b"PEM"]
    d.revoked.add("ab")
    assert g.certificate_revoked("ab") and g.pinned_certificates() == []
