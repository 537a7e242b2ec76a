"""A disk that fills up: stores are refused at the low-water mark, what is stored is still served,
and every read is still recorded."""

from __future__ import annotations

import errno
import json
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from safepacs.app import Repositories, initialize, open_repositories
from safepacs.audit.events import Action, AuditEvent, EventID, Outcome
from tests.support.audit_capture import AuditCapture
from tests.support.corpus import make_ct
from tests.support.dicom_client import associate, c_find, c_get
from tests.support.server import Server, run_cli, start_server
from tests.support.webapp import multipart, part10

CT = "1.2.840.10008.5.1.4.1.1.2"
MARK = str(2**62)  # storage.min_free_bytes above what any disk has free


def _token(data: Path, user: str, role: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert run_cli("user", "add", user, "--role", role, "--data", str(data)) == 0
    capsys.readouterr()
    assert run_cli("token", "create", "--user", user, "--data", str(data)) == 0
    return capsys.readouterr().out.strip()


def _client(srv: Server, token: str) -> httpx.Client:
    verify = ssl.create_default_context(cafile=str(srv.ca_file))
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=srv.base_url, verify=verify, headers=headers, timeout=20)


def _study_query(patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = ""
    return ds


def _store_refusals(events: list[AuditEvent]) -> list[AuditEvent]:
    return [
        e
        for e in events
        if e.event_id in (EventID.INSTANCES_ACCESSED, EventID.IMPORT)
        and e.action is Action.CREATE
        and e.outcome is not Outcome.SUCCESS
    ]


def _queries(capture: AuditCapture, count: int) -> list[AuditEvent]:
    """The query events once there are ``count`` (reads are recorded within a second, not synced)."""
    deadline = time.monotonic() + 10
    while len(found := capture.events(EventID.QUERY)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_below_the_low_water_mark_stores_are_refused_and_reads_go_on(
    data_dir: Path,
    repos: Repositories,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = make_ct(patient_id="DISK-1")
    (tmp_path / "stored.dcm").write_bytes(part10(stored))
    assert run_cli("import", str(tmp_path / "stored.dcm"), "--data", str(data_dir)) == 0
    token = _token(data_dir, "rad", "radiologist", capsys)
    env = {"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_STORAGE__MIN_FREE_BYTES": MARK}
    srv = start_server(data_dir, env=env)
    try:
        srv.add_peer("CT1", "store")
        srv.add_peer("VIEWER", "find,get")
        capture = AuditCapture(repos.audit_log)
        # C-STORE: each instance refused A700 "Refused: Out of Resources" (PS3.4 B.2.3), saying why.
        with associate(srv.port, [build_context(CTImageStorage)], calling="CT1") as assoc:
            for _ in range(3):
                rsp = assoc.send_c_store(make_ct(patient_id="DISK-2"))
                assert rsp.Status == 0xA700
                assert rsp.ErrorComment == "refused: out of disk space (storage.min_free_bytes)"
        with _client(srv, token) as client:
            # STOW-RS: 507 Insufficient Storage, a problem body; the upload is not stored.
            body, ctype = multipart([part10(make_ct(patient_id="DISK-2"))])
            r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 507, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert "storage.min_free_bytes" in r.json()["detail"]
            # Reads: QIDO-RS and WADO-RS answer.
            r = client.get("/dicomweb/studies", params={"PatientID": "DISK-1"})
            assert r.status_code == 200
            assert [s["0020000D"]["Value"][0] for s in r.json()] == [stored.StudyInstanceUID]
            r = client.get(
                f"/dicomweb/studies/{stored.StudyInstanceUID}",
                headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
            )
            assert r.status_code == 200 and bytes(stored.SOPInstanceUID, "ascii") in r.content
        results, final = c_find(srv.port, _study_query("DISK-1"))
        assert final.Status == 0x0000 and len(results) == 1
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = stored.StudyInstanceUID
        received, final = c_get(srv.port, ident, [(CT, ["1.2.840.10008.1.2.1"])])
        assert final.Status == 0x0000 and list(received) == [stored.SOPInstanceUID]
        queries = _queries(capture, 2)
        events = capture.events()
    finally:
        srv.stop()
    # Every read recorded; the refusals once per association and per request, not per instance.
    assert len(queries) == 2 and all(q.outcome is Outcome.SUCCESS for q in queries)
    retrievals = [
        e for e in events if e.event_id is EventID.INSTANCES_TRANSFERRED and e.action is Action.READ
    ]
    assert len(retrievals) == 2  # WADO-RS and C-GET
    refusals = _store_refusals(events)
    assert len(refusals) == 2, [(e.event_id, e.outcome_description) for e in refusals]
    assert all("storage.min_free_bytes" in (e.outcome_description or "") for e in refusals)
    # import: stops at the first file, says why, exit 2; recorded once for the run.
    capture.reset()
    (tmp_path / "more").mkdir()
    for i in range(2):
        (tmp_path / "more" / f"{i}.dcm").write_bytes(part10(make_ct(patient_id="DISK-3")))
    monkeypatch.setenv("SAFEPACS_STORAGE__MIN_FREE_BYTES", MARK)
    capsys.readouterr()
    assert run_cli("import", str(tmp_path / "more"), "--data", str(data_dir)) == 2
    err = capsys.readouterr().err
    assert "safepacs: import stopped, 2 files not imported: refused: the disk has less free space" in err
    assert len(_store_refusals(capture.events())) == 1
    # Nothing refused was stored: the one instance is the one imported before the mark.
    assert (
        repos.instances.count_instances() == 1
        and repos.instances.get_instance(stored.SOPInstanceUID) is not None
    )
    assert run_cli("doctor", "--data", str(data_dir), "--no-network", "--format", "json") == 1
    report = json.loads(capsys.readouterr().out)
    (full,) = [f for f in report["findings"] if f["check"] == "config.disk-full"]
    assert full["severity"] == "high"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB file system of its own (tmpfs), so that it can really fill up; needs CAP_SYS_ADMIN."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30, check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system has no block left (ENOSPC)."""
    with path.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 4096):
            block = b"\xa5" * chunk
            while True:
                try:
                    f.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break


def test_a_full_disk_releases_the_audit_reserve_and_reads_go_on(
    small_disk: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = small_disk / "data"
    initialize(data)
    settings = {
        "SAFEPACS_STORAGE__MIN_FREE_BYTES": str(4 << 20),
        "SAFEPACS_STORAGE__AUDIT_RESERVE_BYTES": str(8 << 20),
        "SAFEPACS_SERVER__WORKERS": "1",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    stored = make_ct(patient_id="FULL-1")
    (tmp_path / "stored.dcm").write_bytes(part10(stored))
    assert run_cli("import", str(tmp_path / "stored.dcm"), "--data", str(data)) == 0
    token = _token(data, "rad", "radiologist", capsys)
    reserve = data / "index.sqlite3-audit-reserve"
    srv = start_server(data, env=settings)
    repos = open_repositories(f"sqlite:///{data / 'index.sqlite3'}")
    try:
        assert reserve.stat().st_size == 8 << 20  # serve reserved it at start
        srv.add_peer("CT1", "store")
        srv.add_peer("VIEWER", "find")
        capture = AuditCapture(repos.audit_log)
        # The disk fills up (another program; a log).  The index's write-ahead log is emptied first,
        # so that the next record needs new blocks rather than reusing the log's.
        with closing(sqlite3.connect(data / "index.sqlite3")) as db:
            assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        _fill(small_disk / "filler")
        with associate(srv.port, [build_context(CTImageStorage)], calling="CT1") as assoc:
            assert assoc.send_c_store(make_ct(patient_id="FULL-2")).Status == 0xA700
        results, final = c_find(srv.port, _study_query("FULL-1"))
        assert final.Status == 0x0000 and len(results) == 1
        with _client(srv, token) as client:
            r = client.get("/dicomweb/studies", params={"PatientID": "FULL-1"})
            assert r.status_code == 200 and len(r.json()) == 1
        queries = _queries(capture, 2)
        assert reserve.stat().st_size == 0  # released, and kept as the sign that it was
        log = srv.stderr_text()
        # The doctor says what happened and what to do.
        capsys.readouterr()
        assert run_cli("doctor", "--data", str(data), "--no-network", "--format", "json") == 1
        report = json.loads(capsys.readouterr().out)
        # Space freed: stores resume, without a restart.
        (small_disk / "filler").unlink()
        time.sleep(1.2)  # past the second for which the archive reuses its look at the free space
        with associate(srv.port, [build_context(CTImageStorage)], calling="CT1") as assoc:
            assert assoc.send_c_store(make_ct(patient_id="FULL-3")).Status == 0x0000
        assert reserve.stat().st_size == 8 << 20  # refilled before that store
    finally:
        srv.stop()
        repos.close()
    assert [q.outcome for q in queries] == [Outcome.SUCCESS, Outcome.SUCCESS]  # C-FIND, QIDO-RS
    assert "the space reserved for the audit trail was released" in log
    checks = {f["check"]: f["severity"] for f in report["findings"]}
    assert checks["config.audit-reserve"] == "high" and checks["config.disk-full"] == "high"
