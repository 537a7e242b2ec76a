"""Administrative changes and their audit records commit together, or neither does (services/admin.py).

The ``peer``, ``user``, ``token`` and ``access`` commands change who may do what.  A change whose
110113 record cannot be written is not made; a record is appended in the very transaction of the
change it records, so no change is ever kept without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from safepacs.app import Repositories, open_repositories
from safepacs.audit import AuditEvent, EventID, Signer
from safepacs.config import load_settings
from safepacs.errors import AuditError
from safepacs.records import SessionRecord
from safepacs.services.admin import AdminService, Change
from safepacs.services.audit import Auditor, Types, operator
from safepacs.services.audittrail import AuditTrail
from safepacs.storage import EnvelopeCipher, FileKeyProvider
from safepacs.types import Peer, Service, TlsMode
from tests.support.audit_capture import AuditCapture
from tests.support.server import run_cli
from tests.support.webapp import execute

DENY_AUDIT = sa.text(
    "CREATE TRIGGER deny_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'disk full'); END"
)


def _data(data_dir: Path) -> tuple[str, str]:
    return ("--data", str(data_dir))


def test_a_change_whose_record_cannot_be_written_is_not_made(
    data_dir: Path, repos: Repositories, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data(data_dir)
    assert run_cli("user", "add", "eve", "--role", "radiologist", *data) == 0
    now = datetime.now(UTC)
    repos.directory.add_session(
        SessionRecord("s" * 64, "eve", "c" * 64, now, now, now + timedelta(hours=1), None)
    )
    capture = AuditCapture(repos.audit_log)
    execute(data_dir, DENY_AUDIT)
    capsys.readouterr()
    peer = ("peer", "add", "CT1", "--host", "127.0.0.1", "--allow", "store", "--tls", "off", *data)
    assert run_cli(*peer) == 2
    assert "audit trail cannot be written" in capsys.readouterr().err
    assert repos.directory.get_peer("CT1") is None
    assert run_cli("user", "add", "mallory", "--role", "admin", *data) == 2
    assert repos.directory.get_user("mallory") is None
    assert run_cli("user", "disable", "eve", *data) == 2
    user = repos.directory.get_user("eve")
    assert user is not None and not user.disabled
    assert [s.revoked_at for s in repos.directory.list_sessions("eve")] == [
        None
    ]  # disabling ends them: not done
    assert run_cli("user", "reset-password", "eve", *data) == 2
    assert repos.directory.get_user("eve") == user
    assert run_cli("token", "create", "--user", "eve", *data) == 2
    assert repos.directory.list_tokens("eve") == []
    assert run_cli("access", "grant", "1.2.3.4", "--user", "eve", *data) == 2
    assert repos.directory.list_grants("eve") == []
    assert run_cli("access", "scope", "eve", "--modality", "CT", *data) == 2
    assert repos.directory.get_user("eve") == user
    assert run_cli("access", "group", "add", "1.2.3.4", "cardio", *data) == 2
    assert repos.directory.list_study_groups() == []
    assert capture.events() == []
    capsys.readouterr()

    execute(data_dir, sa.text("DROP TRIGGER deny_audit"))
    assert run_cli(*peer) == 0
    assert repos.directory.get_peer("CT1") is not None
    [event] = capture.events(EventID.SECURITY_ALERT)
    assert event.type_code is not None and event.type_code[0] == "110129"
    assert event.objects[0].id == "CT1"
    assert event.outcome_description is not None and "peer add CT1" in event.outcome_description


class _Spy:
    """An audit sink whose writer runs ``check`` on the transaction's connection, then the trail's."""

    def __init__(self, trail: AuditTrail, check: Callable[[sa.Connection], None]) -> None:
        self.trail = trail
        self.check = check

    def record(self, *events: AuditEvent, checkpoint: bool = False, durable: bool = True) -> None:
        raise AssertionError("an administrative change is recorded in its own transaction, not after it")

    def writer(self, events: Sequence[AuditEvent]) -> Callable[[Any], None]:
        write = self.trail.writer(events)

        def run(conn: sa.Connection) -> None:
            write(conn)
            self.check(conn)

        return run


@pytest.fixture
def trail(data_dir: Path, repos: Repositories) -> Iterator[AuditTrail]:
    settings = load_settings(data_dir)
    yield AuditTrail(repos.audit_log, Signer.load_or_create(settings.keys_dir), settings.audit_head_file)


def _service(repos: Repositories, data_dir: Path, sink: _Spy) -> AdminService:
    keys = data_dir / "keys"
    return AdminService(
        repos.directory,
        repos.instances,
        Auditor(sink, "SAFEPACS"),
        lambda: EnvelopeCipher(FileKeyProvider(keys)),
    )


def test_the_record_is_appended_in_the_transaction_of_the_change(
    data_dir: Path, repos: Repositories, trail: AuditTrail
) -> None:
    other = open_repositories(
        f"sqlite:///{data_dir / 'index.sqlite3'}"
    )  # another connection: sees commits only
    seen: list[tuple[int, int, bool]] = []

    def check(conn: sa.Connection) -> None:
        mine = conn.execute(sa.text("SELECT count(*) FROM peers WHERE ae_title = 'MR1'")).scalar_one()
        records = conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one()
        seen.append((mine, records, other.directory.get_peer("MR1") is not None))

    capture = AuditCapture(repos.audit_log)
    by = Change(operator("peer"), "safepacs peer add MR1 --host 10.0.0.9 --allow find")
    peer = Peer("MR1", "10.0.0.9", None, frozenset({Service.FIND}), tls=TlsMode.REQUIRED)
    try:
        _service(repos, data_dir, _Spy(trail, check)).add_peer(peer, by)
    finally:
        other.close()
    # Inside the transaction: the peer and its record written, neither committed (not seen elsewhere).
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][2] is False
    assert repos.directory.get_peer("MR1") == peer
    [event] = capture.events(EventID.SECURITY_ALERT)
    assert event.objects[0].id == "MR1" and event.outcome_description == by.command


def test_a_record_that_fails_after_it_was_appended_takes_the_change_with_it(
    data_dir: Path, repos: Repositories, trail: AuditTrail
) -> None:
    def fail(conn: sa.Connection) -> None:
        raise AuditError("the audit trail cannot be written; the request is refused")

    admin = _service(repos, data_dir, _Spy(trail, fail))
    by = Change(operator("user"), "safepacs user add zed --role admin")
    head = repos.audit_log.audit_head()
    with pytest.raises(AuditError):
        admin.add_user("zed", frozenset({"admin"}), by)
    assert repos.directory.get_user("zed") is None
    assert repos.audit_log.audit_head() == head  # the record appended in that transaction was rolled back too
    with pytest.raises(AuditError):
        admin.add_peer(Peer("US1", "10.0.0.8", None, frozenset({Service.STORE})), by)
    assert repos.directory.get_peer("US1") is None
    assert repos.audit_log.audit_head() == head


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Repositories, AuditTrail]]:
    from safepacs.db.database import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    migrate(url)
    repos = open_repositories(url)
    try:
        yield repos, AuditTrail(repos.audit_log, Signer.load_or_create(tmp_path), tmp_path / "audit-head")
    finally:
        repos.close()


def _state(repos: Repositories) -> tuple[object, ...]:
    return (
        repos.directory.list_peers(),
        repos.directory.list_users(),
        repos.directory.get_login_state("eve"),
        repos.directory.list_sessions("eve"),
        repos.directory.list_tokens(),
        repos.directory.list_grants(),
        repos.directory.list_study_groups(),
        repos.directory.list_certificates(),
        repos.audit_log.audit_head(),
    )


def test_no_change_is_made_without_its_record(store: tuple[Repositories, AuditTrail], data_dir: Path) -> None:
    """Every administrative change, its record appended and then failing: nothing of either is kept."""
    from safepacs.auth.tokens import issue_token

    repos, trail = store
    now = datetime.now(UTC)
    repos.directory.add_user("eve", "x", frozenset({"radiologist"}))
    repos.directory.add_session(
        SessionRecord("s" * 64, "eve", "c" * 64, now, now, now + timedelta(hours=1), None)
    )
    repos.directory.add_peer(Peer("CT1", "10.0.0.7", 104, frozenset({Service.STORE}), "eve"))
    repos.directory.record_certificate("ab" * 32, "CT1", source="issued")
    token = issue_token("eve", timedelta(days=1)).record
    repos.directory.add_token(token)
    repos.directory.grant_study("1.2.3", "eve", None)
    repos.directory.add_study_group("1.2.3", "cardio")
    repos.directory.set_totp_secret("eve", "sealed")
    trail.record(Auditor(trail, "SAFEPACS").change(operator("test"), Types.SECURITY_CONFIGURATION, "-", "-"))

    def fail(conn: sa.Connection) -> None:
        raise AuditError("the audit trail cannot be written; the request is refused")

    admin = _service(repos, data_dir, _Spy(trail, fail))
    by = Change(operator("test"), "safepacs test")
    changes: list[Callable[[], object]] = [
        lambda: admin.add_peer(Peer("MR1", "10.0.0.8", None, frozenset({Service.FIND})), by),
        lambda: admin.remove_peer("CT1", by),
        lambda: admin.record_issued_certificate("CT1", "cd" * 32, "1f", now, by),
        lambda: admin.revoke_certificates("CT1", by),
        lambda: admin.revoke_certificates("CT1", by, "ef" * 32),
        lambda: admin.add_user("zed", frozenset({"admin"}), by),
        lambda: admin.add_user("zed", frozenset({"admin"}), by, "a long enough password"),
        lambda: admin.set_disabled("eve", True, by),
        lambda: admin.reset_password("eve", by),
        lambda: admin.enrol_totp("eve", by),
        lambda: admin.remove_totp("eve", by),
        lambda: admin.unlock("eve", by),
        lambda: admin.issue_token("eve", timedelta(days=1), frozenset(), by),
        lambda: admin.revoke_token(token.token_id, by),
        lambda: admin.set_scope("eve", None, by),
        lambda: admin.add_study_group("1.2.4", "cardio", by),
        lambda: admin.remove_study_group("1.2.3", "cardio", by),
        lambda: admin.grant_study("1.2.4", "eve", None, by),
        lambda: admin.revoke_grant("1.2.3", "eve", by),
    ]
    before = _state(repos)
    for number, make in enumerate(changes):
        with pytest.raises(AuditError):
            make()
        assert _state(repos) == before, number
