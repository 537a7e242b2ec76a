"""The audit trail's hash chain and signed checkpoints: tampering is found and located; the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from safepacs.app import Repositories, open_repositories
from safepacs.audit import (
    Action,
    AuditEvent,
    AuditObject,
    EventID,
    ObjectKind,
    Outcome,
    Participant,
    Signer,
    canonical,
    from_canonical,
)
from safepacs.audit.chain import chain_hash, verify_chain
from safepacs.audit.events import AuditFilter
from safepacs.errors import AuditError
from safepacs.services.audittrail import AuditTrail, MemoryAuditSink, verify_trail
from tests.support import index as ti
from tests.support.server import run_cli

db_url, repos = ti.db_url, ti.repos


def event(n: int, *, patient: str = "P1", user: str = "dr.house") -> AuditEvent:
    return AuditEvent(
        EventID.INSTANCES_TRANSFERRED,
        Action.READ,
        Outcome.SUCCESS,
        (
            Participant(user, True, "Destination Role ID", address="10.0.0.7", user_agent="viewer/1.0"),
            Participant("SAFEPACS", False, "Source Role ID", ae_title="SAFEPACS"),
        ),
        (
            AuditObject(ObjectKind.PATIENT, patient, name="Doe^Jane"),
            AuditObject(ObjectKind.STUDY, f"1.2.3.{n}", sop_classes=(("1.2.840.10008.5.1.4.1.1.2", 3),)),
        ),
        time=datetime(2026, 11, 22, 8, 0, tzinfo=UTC) + timedelta(minutes=n),
    )


def test_events_round_trip_through_their_canonical_form() -> None:
    e = event(1)
    assert from_canonical(canonical(e)) == e
    assert canonical(from_canonical(canonical(e))) == canonical(e)


@pytest.fixture
def trail(repos: Repositories, tmp_path: Path) -> AuditTrail:
    t = AuditTrail(repos.audit_log, Signer.load_or_create(tmp_path), tmp_path / "audit-head")
    for n in range(1, 251, 50):
        t.record(*(event(k, patient="P2" if k % 7 == 0 else "P1") for k in range(n, n + 50)))
    return t


def _conn(repos: Repositories) -> sa.Connection:
    return repos.db.engine.connect()  # the attacker's direct access to the database


def _edit(repos: Repositories) -> None:
    with _conn(repos) as c:
        body = c.execute(sa.text("SELECT body FROM audit_log WHERE seq = 50")).scalar_one()
        c.execute(
            sa.text("UPDATE audit_log SET body = :b WHERE seq = 50"),
            {"b": body.replace("dr.house", "nobody")},
        )
        c.commit()


def _delete(repos: Repositories) -> None:
    with _conn(repos) as c:
        c.execute(sa.text("DELETE FROM audit_refs WHERE seq = 70"))
        c.execute(sa.text("DELETE FROM audit_log WHERE seq = 70"))
        c.commit()


def _insert(repos: Repositories) -> None:
    with _conn(repos) as c:
        prev = c.execute(sa.text("SELECT hash FROM audit_log WHERE seq = 249")).scalar_one()
        last = c.execute(sa.text("SELECT body, prev_hash, hash FROM audit_log WHERE seq = 250")).one()
        # Move the last record up by one and slip a well-formed forged record in before it.
        c.execute(
            sa.text(
                "INSERT INTO audit_log (seq, recorded_at, event_id, outcome, body, prev_hash, hash) "
                "VALUES (251, CURRENT_TIMESTAMP, '110104', 0, :b, :p, :h)"
            ),
            {"b": last[0], "p": last[1], "h": last[2]},
        )
        # Well formed: the same search keys and columns as the record it replaces, its recording time.
        recorded = json.loads(last[0])["recorded"]
        forged = canonical(replace(event(250), time=datetime.now(UTC)), recorded=_parse_time(recorded))
        c.execute(
            sa.text("UPDATE audit_log SET body = :b, prev_hash = :p, hash = :h WHERE seq = 250"),
            {"b": forged, "p": prev, "h": chain_hash(prev, 250, forged)},
        )
        c.commit()


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _reorder(repos: Repositories) -> None:
    with _conn(repos) as c:
        a = c.execute(sa.text("SELECT body FROM audit_log WHERE seq = 30")).scalar_one()
        b = c.execute(sa.text("SELECT body FROM audit_log WHERE seq = 31")).scalar_one()
        c.execute(sa.text("UPDATE audit_log SET body = :b WHERE seq = 30"), {"b": b})
        c.execute(sa.text("UPDATE audit_log SET body = :b WHERE seq = 31"), {"b": a})
        c.commit()


def _truncate(repos: Repositories) -> None:
    with _conn(repos) as c:
        c.execute(sa.text("DELETE FROM audit_refs WHERE seq > 150"))
        c.execute(sa.text("DELETE FROM audit_log WHERE seq > 150"))
        c.commit()


def _rewrite(repos: Repositories) -> None:
    """Edit record 10 (and its search key) and recompute every later hash, as an attacker without the
    signing key could."""
    with _conn(repos) as c:
        c.execute(sa.text("UPDATE audit_refs SET value = 'nobody' WHERE seq = 10 AND kind = 'user'"))
        rows = c.execute(sa.text("SELECT seq, body FROM audit_log ORDER BY seq")).all()
        prev = "0" * 64
        for seq, body in rows:
            if seq == 10:
                body = body.replace("dr.house", "nobody")
            digest = chain_hash(prev, seq, body)
            c.execute(
                sa.text("UPDATE audit_log SET body = :b, prev_hash = :p, hash = :h WHERE seq = :s"),
                {"b": body, "p": prev, "h": digest, "s": seq},
            )
            prev = digest
        c.commit()


@pytest.mark.parametrize(
    ("tamper", "where", "words"),
    [
        (_edit, 50, "edited"),
        (_delete, 70, "missing"),
        (_insert, 250, "signed head file"),  # its head names the record that was there
        (_reorder, 30, "edited"),
        (_truncate, 151, "truncated"),
        (_rewrite, 50, "signed head file"),
    ],
)
def test_tampering_is_found_and_located(
    trail: AuditTrail, repos: Repositories, tamper: Callable[[Repositories], None], where: int, words: str
) -> None:
    intact = verify_trail(repos.audit_log, trail.signer, trail.head.path)
    assert intact.ok and intact.records == 250 and intact.checkpoints == 2
    tamper(repos)
    result = verify_trail(repos.audit_log, trail.signer, trail.head.path)
    assert not result.ok
    assert result.first_bad_seq == where
    assert result.problem is not None and words in result.problem


def test_an_inserted_record_breaks_the_link_to_the_next(trail: AuditTrail, repos: Repositories) -> None:
    _insert(repos)
    result = verify_chain(
        repos.audit_log.audit_records(limit=1000),
        repos.audit_log.audit_checkpoints(),
        trail.signer.public_key,
    )
    assert (result.ok, result.first_bad_seq) == (False, 251)
    assert result.problem is not None and "does not follow" in result.problem


def test_search_by_patient_study_user_and_time(trail: AuditTrail, repos: Repositories) -> None:
    p2 = repos.audit_log.search_audit(AuditFilter(patient_id="P2"))
    assert [r.seq for r in p2] == [k for k in range(1, 251) if k % 7 == 0]
    assert [r.seq for r in repos.audit_log.search_audit(AuditFilter(study_uid="1.2.3.42"))] == [42]
    assert len(repos.audit_log.search_audit(AuditFilter(user="dr.house"))) == 250
    assert repos.audit_log.search_audit(AuditFilter(user="SAFEPACS")) == []  # not a requestor
    since = datetime.now(UTC) - timedelta(minutes=5)
    assert len(repos.audit_log.search_audit(AuditFilter(patient_id="P1", since=since))) == 250 - len(p2)
    assert repos.audit_log.search_audit(AuditFilter(until=since)) == []


def test_search_by_outcome_and_address_newest_first_in_pages(trail: AuditTrail, repos: Repositories) -> None:
    odd = event(251, user="mallory")
    trail.record(
        replace(
            odd,
            outcome=Outcome.MINOR_FAILURE,
            participants=(Participant("mallory", True, address="192.0.2.9"), *odd.participants[1:]),
        ),
        event(252),
    )
    search = repos.audit_log.search_audit
    assert [r.seq for r in search(AuditFilter(failed=True))] == [251]
    assert len(search(AuditFilter(failed=False))) == 251
    assert [r.seq for r in search(AuditFilter(address="192.0.2.9"))] == [251]
    assert len(search(AuditFilter(address="10.0.0.7"))) == 251
    assert search(AuditFilter(address="10.0.0.%")) == search(AuditFilter(address="10.0.0")) == []  # exact
    assert search(AuditFilter(address="viewer/1.0")) == []  # a user agent is not an address
    # Newest first, a page at a time, each continuing before the last one shown.
    assert [r.seq for r in search(AuditFilter(), 3, newest_first=True)] == [252, 251, 250]
    assert [r.seq for r in search(AuditFilter(patient_id="P2"), 2, before=250, newest_first=True)] == [
        245,
        238,
    ]
    assert [r.seq for r in search(AuditFilter(), 2, before=3)] == [1, 2]


def test_a_broken_store_fails_closed(tmp_path: Path) -> None:
    broken = AuditTrail(
        open_repositories(f"sqlite:///{tmp_path / 'unmigrated.sqlite3'}").audit_log,
        Signer.load_or_create(tmp_path),
        tmp_path / "audit-head",
    )
    with pytest.raises(AuditError):
        broken.record(event(1))
    sink = MemoryAuditSink()
    sink.record(event(1))
    sink.fail = True
    with pytest.raises(AuditError):
        sink.record(event(2))
    assert len(sink.events) == 1


def test_cli_verify_query_and_report(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safepacs.config import load_settings

    settings = load_settings(data_dir)
    repos = open_repositories(settings.index_url)
    try:
        trail = AuditTrail(
            repos.audit_log, Signer.load_or_create(settings.keys_dir), settings.audit_head_file
        )
        trail.record(event(1), event(2, patient="P9"))
    finally:
        repos.close()
    assert run_cli("audit", "verify", "--data", str(data_dir)) == 0
    assert "Audit trail intact: 2 records" in capsys.readouterr().err
    assert run_cli("audit", "query", "--patient", "P9", "--format", "json", "--data", str(data_dir)) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["patients"], r["who"], r["from"], r["device"]) for r in rows] == [
        ("P9", "dr.house", "10.0.0.7", "viewer/1.0")
    ]
    assert run_cli("audit", "report", "--patient", "P1", "--data", str(data_dir)) == 0
    report = capsys.readouterr().out
    assert "1 events" in report and "dr.house" in report and "1.2.3.1" in report and "1.2.3.2" not in report
    assert run_cli("audit", "query", "--format", "csv", "--since", "2020-01-01", "--data", str(data_dir)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("seq,time,event")
    # The two events, the verify and the three reads of the trail were themselves recorded (110101).
    assert len(lines) == 1 + 2 + 4
    assert sum("110101" in line for line in lines) == 4
    assert run_cli("audit", "query", "--since", "yesterday", "--data", str(data_dir)) == 2
    assert "not an ISO date" in capsys.readouterr().err
    # Tamper with the file directly: verify fails with exit 1 and names the record.
    engine = sa.create_engine(settings.index_url)
    with engine.begin() as c:
        body = c.execute(sa.text("SELECT body FROM audit_log WHERE seq = 2")).scalar_one()
        forged = body.replace('"outcome":0', '"outcome":4')
        c.execute(sa.text("UPDATE audit_log SET outcome = 4, body = :b WHERE seq = 2"), {"b": forged})
    engine.dispose()
    assert run_cli("audit", "verify", "--data", str(data_dir)) == 1
    assert "TAMPERED at record 2" in capsys.readouterr().err


def test_auditors_read_the_trail_over_https(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.server import start_server
    from tests.support.web import _client, _token, _user

    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        _user(srv.data, "privacy", "auditor", capsys)
        _user(srv.data, "rad", "radiologist", capsys)
        auditor, rad = _token(srv.data, "privacy", capsys), _token(srv.data, "rad", capsys)
        with _client(srv) as anonymous:
            assert anonymous.get("/api/audit").status_code == 401
        with _client(srv, rad) as client:
            assert client.get("/api/audit").status_code == 404  # not an auditor: nothing here
        with _client(srv, auditor) as client:
            assert client.get("/api/audit", params={"since": "never"}).status_code == 400
            first = client.get("/api/audit", params={"user": "privacy"})
            assert first.status_code == 200, first.text
            second = client.get("/api/audit", params={"user": "privacy"}).json()
            reads = [r for r in second if r["event"].startswith("110101")]
            assert len(reads) == len([r for r in first.json() if r["event"].startswith("110101")]) + 1
            assert reads[-1]["from"] == "127.0.0.1"
            # An auditor may read the trail but not the images.
            assert client.get("/dicomweb/studies").status_code == 404
    finally:
        srv.stop()


def test_reads_recorded_without_waiting_for_the_sync_join_the_same_chain(
    repos: Repositories, tmp_path: Path
) -> None:
    trail = AuditTrail(repos.audit_log, Signer.load_or_create(tmp_path), tmp_path / "audit-head")
    for k in range(1, 7):
        trail.record(event(k), durable=k % 2 == 1)  # a store, a query, a store, ...
    result = verify_trail(repos.audit_log, trail.signer, trail.head.path)
    assert result.ok and result.records == 6
    assert [from_canonical(r.body).study_uids for r in repos.audit_log.audit_records()] == [
        (f"1.2.3.{k}",) for k in range(1, 7)
    ]


def test_a_read_record_is_synced_to_disk_within_a_second(data_dir: Path) -> None:
    from safepacs.config import load_settings

    settings = load_settings(data_dir)
    repos = open_repositories(settings.index_url)
    try:
        trail = AuditTrail(
            repos.audit_log, Signer.load_or_create(settings.keys_dir), settings.audit_head_file
        )
        trail.record(event(1), durable=False)
        sync = repos.db._relaxed  # the SQLite writer without a sync per commit, and its WAL-sync thread
        assert sync is not None and sync._pending.is_set()
        deadline = time.monotonic() + 1.5
        while sync._pending.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sync._pending.is_set()  # the thread fsynced the WAL
        trail.record(event(2))  # a synced record: the normal writer
        assert [r.seq for r in repos.audit_log.audit_records()] == [1, 2]
    finally:
        repos.close()
    assert repos.db._relaxed is None
