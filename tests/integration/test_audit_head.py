"""The audit trail's signed head outside the index, and what searches use checked against the bodies.

Every test runs real activity on a real data directory (``safepacs import`` of 110 studies, user and
peer commands, searches of the trail: records past the checkpoint at 100), tampers with the index
through plain SQL (and with ``DATA/audit-head`` as a file), and runs ``safepacs audit verify`` as a
user would: exit 1 and a message naming what is missing.  On SQLite and, when SAFEPACS_TEST_POSTGRES
names a server, on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from datetime import UTC, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from safepacs.app import Repositories, initialize, open_repositories
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
)
from safepacs.audit.chain import GENESIS, AuditRow, SignedHead, chain_hash
from safepacs.audit.events import search_keys
from safepacs.config import Settings, load_settings
from safepacs.services.audittrail import verify_trail
from tests.support.corpus import make_ct
from tests.support.dicom_client import associate, c_find
from tests.support.server import run_cli, start_server

STUDIES = 110  # one record each: the trail passes its checkpoint at record 100


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One instance of each of ``STUDIES`` studies, of three patients."""
    source = tmp_path_factory.mktemp("corpus")
    for i in range(STUDIES):
        make_ct(8, 8, patient_id=f"P{i % 3}").save_as(source / f"{i}.dcm", enforce_file_format=True)
    return source


def _activity(data: Path, corpus: Path) -> Path:
    """What an archive records in a day, in small: instances stored, accounts changed, the trail read."""
    assert run_cli("import", str(corpus), "--data", str(data)) == 0
    assert run_cli("user", "add", "rad", "--role", "radiologist", "--data", str(data)) == 0
    assert run_cli("peer", "add", "MOD", "--host", "127.0.0.1", "--allow", "store", "--data", str(data)) == 0
    assert run_cli("audit", "report", "--patient", "P1", "--data", str(data)) == 0
    assert run_cli("audit", "query", "--user", "rad", "--data", str(data)) == 0
    return data


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    data = tmp_path_factory.mktemp("template") / "data"
    initialize(data)
    return _activity(data, corpus)


@pytest.fixture
def sqlite_archive(sqlite_template: Path, tmp_path: Path) -> Path:
    """A data directory after real activity, on SQLite (a copy of the module's)."""
    data = tmp_path / "data"
    shutil.copytree(sqlite_template, data)
    return data


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def archive(request: pytest.FixtureRequest, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory after real activity, on SQLite or on PostgreSQL (in a fresh schema)."""
    if request.param == "sqlite":
        return Path(request.getfixturevalue("sqlite_archive"))
    monkeypatch.setenv("SAFEPACS_INDEX__URL", request.getfixturevalue("postgres_url"))
    return _activity(request.getfixturevalue("data_dir"), corpus)


def _settings(data: Path) -> Settings:
    return load_settings(data)


@pytest.fixture
def sql_of() -> Iterator[Callable[[Path], sa.Engine]]:
    """The attacker's direct access to the index database of a data directory."""
    engines: list[sa.Engine] = []

    def engine(data: Path) -> sa.Engine:
        engines.append(sa.create_engine(_settings(data).index_url))
        return engines[-1]

    yield engine
    for e in engines:
        e.dispose()


def _rows(repos: Repositories) -> list[AuditRow]:
    with repos.audit_log.audit_snapshot() as snapshot, closing(snapshot.rows()) as rows:
        return [
            replace(r, recorded_at=r.recorded_at.replace(tzinfo=r.recorded_at.tzinfo or UTC)) for r in rows
        ]


def _verify(data: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    status = run_cli("audit", "verify", "--data", str(data), *extra)
    return status, capsys.readouterr().err


def _last(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text("SELECT max(seq) FROM audit_log")).scalar_one())


def _delete_after(engine: sa.Engine, seq: int, *, checkpoints: bool = False) -> None:
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM audit_refs WHERE seq > :s"), {"s": seq})
        if checkpoints:
            c.execute(sa.text("DELETE FROM audit_checkpoints WHERE seq > :s"), {"s": seq})
        c.execute(sa.text("DELETE FROM audit_log WHERE seq > :s"), {"s": seq})


def test_an_untouched_trail_is_intact_and_its_head_file_names_the_last_record(
    sqlite_archive: Path, sql_of: Callable[[Path], sa.Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    archive = sqlite_archive
    sql = sql_of(archive)
    status, err = _verify(archive, capsys)
    assert status == 0, err
    last = _last(sql) - 1  # the verify itself was recorded after checking
    assert f"Audit trail intact: {last} records, 1 signed checkpoints" in err
    assert f"the signed head file names record {last}." in err
    heads = [SignedHead.parse(line) for line in _settings(archive).audit_head_file.read_text().splitlines()]
    public = Signer.load_or_create(_settings(archive).keys_dir).public_key
    assert all(h.signed_by(public) for h in heads)
    assert [h.seq for h in heads] == sorted({h.seq for h in heads}) and heads[-1].seq == last + 1
    assert (_settings(archive).audit_head_file.stat().st_mode & 0o777) == 0o600


def test_the_last_records_deleted_with_their_checkpoints_are_missing(
    archive: Path, sql_of: Callable[[Path], sa.Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    sql = sql_of(archive)
    last = _last(sql)
    _delete_after(sql, 90, checkpoints=True)
    status, err = _verify(archive, capsys)
    assert status == 1
    assert "TAMPERED at record 91" in err and f"records 91-{last} are missing (truncated)" in err


def test_fewer_than_100_records_deleted_after_the_last_checkpoint_are_missing(
    sqlite_archive: Path, sql_of: Callable[[Path], sa.Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    archive = sqlite_archive
    sql = sql_of(archive)
    last = _last(sql)
    assert last > 105
    _delete_after(sql, last - 2)
    status, err = _verify(archive, capsys)
    assert status == 1
    assert f"records {last - 1}-{last} are missing (truncated)" in err


def test_a_wiped_trail_is_never_intact(
    archive: Path, sql_of: Callable[[Path], sa.Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    sql = sql_of(archive)
    last = _last(sql)
    _delete_after(sql, 0, checkpoints=True)
    status, err = _verify(archive, capsys)
    assert status == 1
    assert f"the trail is empty but the signed head file names record {last}" in err
    assert f"records 1-{last} are missing" in err
    # Without the head file either, the archive's instances still say that there was a trail.
    _delete_after(sql, 0, checkpoints=True)
    _settings(archive).audit_head_file.unlink()
    status, err = _verify(archive, capsys)
    assert status == 1
    assert f"the trail is empty but the archive holds {STUDIES} instances" in err


def test_a_deleted_head_file_is_a_finding_and_is_not_started_again_silently(
    sqlite_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = sqlite_archive
    head_file = _settings(archive).audit_head_file
    head_file.unlink()
    status, err = _verify(archive, capsys)
    assert status == 1
    assert "record 1 started the signed head file, which is missing" in err
    # The verify was recorded, and a new head file begun, at another record: still a finding.
    assert head_file.exists()
    status, err = _verify(archive, capsys)
    assert status == 1
    assert "the signed head file begins at record" in err and "but record 1 says it began there" in err


def test_a_head_file_deleted_with_the_mark_of_where_it_began_is_a_finding(
    sqlite_archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = sa.create_engine(_settings(sqlite_archive).index_url)
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM audit_refs WHERE kind = 'anchor'"))
    engine.dispose()
    _settings(sqlite_archive).audit_head_file.unlink()
    status, err = _verify(sqlite_archive, capsys)
    assert status == 1
    assert "records since 1 were made with a signed head file, but there is none" in err


def test_an_edited_head_file_is_a_finding(sqlite_archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = sqlite_archive
    head_file = _settings(archive).audit_head_file
    lines = head_file.read_text().splitlines()
    seq, digest, time, signature = lines[-1].split()
    lines[-1] = " ".join((str(int(seq) + 5), digest, time, signature))  # claims a longer trail
    head_file.write_text("\n".join(lines) + "\n")
    status, err = _verify(archive, capsys)
    assert status == 1
    assert f"line {len(lines)} of the signed head file has a bad signature" in err


def test_records_the_head_file_does_not_name_are_allowed_only_while_they_are_fresh(
    sqlite_archive: Path,
) -> None:
    settings = _settings(sqlite_archive)
    head_file = settings.audit_head_file
    lines = head_file.read_text().splitlines()
    head_file.write_text("\n".join(lines[:-2]) + "\n")  # as if the last two heads were still to come
    repos = open_repositories(settings.index_url)
    try:
        signer = Signer.load_or_create(settings.keys_dir)
        recorded = max(r.recorded_at for r in _rows(repos))
        assert verify_trail(repos.audit_log, signer, head_file, now=recorded + timedelta(seconds=1)).ok
        late = verify_trail(repos.audit_log, signer, head_file, now=recorded + timedelta(minutes=1))
    finally:
        repos.close()
    assert not late.ok and late.problem is not None
    first = int(lines[-3].split()[0]) + 1
    assert f"records {first}-" in late.problem and "are not named by the signed head file" in late.problem


def test_a_trail_cut_together_with_its_head_file_fails_against_an_exported_head(
    archive: Path, sql_of: Callable[[Path], sa.Engine], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sql = sql_of(archive)
    exported = tmp_path / "head-2026-12-07.txt"
    assert run_cli("audit", "head", "--out", str(exported), "--data", str(archive)) == 0
    head = SignedHead.parse(exported.read_text())
    assert head.seq == _last(sql)
    status, err = _verify(archive, capsys, "--against", str(exported))
    assert status == 0, err
    assert f"the exported head of record {head.seq} matches" in err
    # Someone with the data directory cuts the trail and the head file back to record 100.
    _delete_after(sql, 100, checkpoints=True)
    head_file = _settings(archive).audit_head_file
    kept = [line for line in head_file.read_text().splitlines() if int(line.split()[0]) <= 100]
    head_file.write_text("\n".join(kept) + "\n")
    status, err = _verify(archive, capsys)
    assert status == 0, err  # consistent in itself: what an exported head (or a collector) is for
    status, err = _verify(archive, capsys, "--against", str(exported))
    assert status == 1
    assert f"but the head exported at {head.time} names record {head.seq}" in err
    # An exported head that is not one is refused with a sentence, not taken as proof.
    exported.write_text("nonsense\n")
    status, err = _verify(archive, capsys, "--against", str(exported))
    assert status == 2 and "is not a signed head" in err


def test_deleting_a_patients_search_keys_is_found(
    archive: Path, sql_of: Callable[[Path], sa.Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    sql = sql_of(archive)
    data = str(archive)
    assert run_cli("audit", "report", "--patient", "P2", "--format", "json", "--data", data) == 0
    assert len(json.loads(capsys.readouterr().out)) > 30
    with sql.begin() as c:
        first = c.execute(
            sa.text("SELECT min(seq) FROM audit_refs WHERE kind = 'patient' AND value = 'P2'")
        ).scalar_one()
        c.execute(sa.text("DELETE FROM audit_refs WHERE kind = 'patient' AND value = 'P2'"))
    assert run_cli("audit", "report", "--patient", "P2", "--format", "json", "--data", data) == 0
    assert json.loads(capsys.readouterr().out) == []  # what the attacker wanted
    status, err = _verify(archive, capsys)
    assert status == 1
    assert f"TAMPERED at record {first}: record {first}'s search keys (audit_refs) do not match" in err
    assert "a patient key is missing" in err and "P2" not in err  # no patient data in the message


@pytest.mark.parametrize(
    ("column", "value"),
    [("recorded_at", "'2001-01-01 00:00:00'"), ("event_id", "'110112'"), ("outcome", "4")],
)
def test_a_changed_search_column_is_found(
    archive: Path,
    sql_of: Callable[[Path], sa.Engine],
    capsys: pytest.CaptureFixture[str],
    column: str,
    value: str,
) -> None:
    sql = sql_of(archive)
    with sql.begin() as c:
        c.execute(sa.text(f"UPDATE audit_log SET {column} = {value} WHERE seq = 42"))  # noqa: S608
    status, err = _verify(archive, capsys)
    assert status == 1
    assert f"TAMPERED at record 42: record 42's {column} column does not match its body" in err


_APPENDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from safepacs.audit import Action, AuditEvent, AuditObject, EventID, ObjectKind, Outcome
    from safepacs.audit import Participant, Signer
    from safepacs.services.audittrail import AuditTrail
    from safepacs.config import load_settings
    from safepacs.app import Repositories, open_repositories

    settings = load_settings(Path(sys.argv[1]))
    name = sys.argv[2]
    index = open_repositories(settings.index_url)
    trail = AuditTrail(index.audit_log, Signer.load_or_create(settings.keys_dir), settings.audit_head_file)
    try:
        for n in range(40):
            event = AuditEvent(
                EventID.QUERY if n % 2 else EventID.INSTANCES_ACCESSED,
                Action.EXECUTE if n % 2 else Action.CREATE,
                Outcome.SUCCESS,
                (Participant(name, True, address="127.0.0.1"),),
                (AuditObject(ObjectKind.PATIENT, f"{name}-{n % 5}"),),
            )
            trail.record(event, durable=n % 2 == 0)  # reads within a second, changes at once
    finally:
        index.close()
    """
)


def test_concurrent_appends_by_several_processes_verify_intact(
    archive: Path, sql_of: Callable[[Path], sa.Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    sql = sql_of(archive)
    before = _last(sql)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(archive), f"proc{i}"], env=env)
        for i in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    assert _last(sql) == before + 4 * 40
    status, err = _verify(archive, capsys)
    assert status == 0, err
    assert f"Audit trail intact: {before + 160} records" in err
    lines = _settings(archive).audit_head_file.read_text().splitlines()
    seqs = [int(line.split()[0]) for line in lines]
    assert seqs == sorted(set(seqs)) and seqs[-1] == before + 161  # every process's last head is in


def test_a_running_archive_serving_concurrent_clients_verifies_intact(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DIMSE workers, the HTTPS process and CLI commands append to one trail at once."""
    srv = start_server(archive, env={"SAFEPACS_SERVER__WORKERS": "2"})
    try:
        srv.add_peer("CLIENT", "store,find")
        failures: list[BaseException] = []

        def client(n: int) -> None:
            try:
                with associate(srv.port, [build_context(CTImageStorage)], calling="CLIENT") as assoc:
                    for _ in range(3):
                        assert assoc.send_c_store(make_ct(8, 8, patient_id=f"C{n}")).Status == 0x0000
                for _ in range(3):
                    ident = Dataset()
                    ident.QueryRetrieveLevel, ident.PatientID, ident.StudyInstanceUID = "STUDY", f"C{n}", ""
                    results, final = c_find(srv.port, ident, calling="CLIENT")
                    assert len(results) == 3 and final.Status == 0x0000
                verify = ssl.create_default_context(cafile=str(srv.ca_file))
                with httpx.Client(base_url=srv.base_url, verify=verify, timeout=20) as web:
                    assert web.get("/dicomweb/studies").status_code == 401  # recorded by the HTTPS process
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for _ in range(3):
            assert run_cli("audit", "query", "--user", "CLIENT", "--data", str(archive)) == 0
        for t in threads:
            t.join(120)
        assert not failures, failures
    finally:
        assert srv.stop() == 0, srv.stderr_text()
    status, err = _verify(archive, capsys)
    assert status == 0, err
    assert "Audit trail intact" in err


def test_a_trail_from_before_the_head_file_verifies_and_is_anchored_from_then_on(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records made by an earlier SafePACS (no recording time in the body, no head file) still verify;
    the head file begins at the next record, and verify says what it cannot check."""
    settings = _settings(data_dir)
    engine = sa.create_engine(settings.index_url)
    prev = GENESIS
    with engine.begin() as c:  # what the earlier append wrote
        for seq in range(1, 4):
            event = AuditEvent(
                EventID.QUERY,
                Action.EXECUTE,
                Outcome.SUCCESS,
                (Participant("rad", True),),
                (AuditObject(ObjectKind.PATIENT, f"P{seq}"),),
            )
            body = canonical(event)
            digest = chain_hash(prev, seq, body)
            c.execute(
                sa.text(
                    "INSERT INTO audit_log (seq, recorded_at, event_id, outcome, body, prev_hash, hash) "
                    "VALUES (:s, CURRENT_TIMESTAMP, '110112', 0, :b, :p, :h)"
                ),
                {"s": seq, "b": body, "p": prev, "h": digest},
            )
            for kind, value in search_keys(event):
                c.execute(
                    sa.text("INSERT INTO audit_refs (seq, kind, value) VALUES (:s, :k, :v)"),
                    {"s": seq, "k": kind, "v": value},
                )
            prev = digest
    status, err = _verify(data_dir, capsys)
    assert status == 0, err
    assert "no signed head file yet" in err and "the recording times of the 3 records" in err
    # That verify was recorded as record 4, and the head file began there.
    assert SignedHead.parse(settings.audit_head_file.read_text().splitlines()[0]).seq == 4
    status, err = _verify(data_dir, capsys)
    assert status == 0, err
    assert "the signed head file names record 4 (it began at record 4" in err
    # A record in the earlier form after records that carry their recording time was put there.
    with engine.begin() as c:
        row = c.execute(sa.text("SELECT body, prev_hash FROM audit_log WHERE seq = 5")).one()
        body = json.dumps({k: v for k, v in json.loads(row[0]).items() if k != "recorded"}, sort_keys=True)
        c.execute(
            sa.text("UPDATE audit_log SET body = :b, hash = :h WHERE seq = 5"),
            {"b": body, "h": chain_hash(row[1], 5, body)},
        )
    engine.dispose()
    status, err = _verify(data_dir, capsys)
    assert status == 1
    assert "record 5 lacks the recording time that every record since 4 carries" in err
