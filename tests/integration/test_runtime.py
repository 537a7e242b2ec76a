"""The supervisor of ``safepacs serve`` and its background jobs, whichever listeners run: the trash purge
in a short-lived child forked at the start and then every interval, the audit export in a process of its
own only when collectors are configured.

There is no setting that turns the HTTPS listener off, so the tests without it start the supervisor
(``runtime.supervisor.run``) with no HTTPS socket, as ``safepacs serve`` would if one were added.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from safepacs._stop import STOP_MARGIN
from safepacs.app import Repositories
from safepacs.auth.pki import create_ca, issue_certificate
from safepacs.runtime.jobs import PURGE_INTERVAL
from tests.support.corpus import make_ct, part10_bytes
from tests.support.server import Server, run_cli, start_server
from tests.support.syslog import Receiver

#: ``safepacs serve`` without its HTTPS listener: the supervisor's own start-up, no HTTPS socket.
WITHOUT_HTTPS = """
import sys
from pathlib import Path

from safepacs.app import configure_logging
from safepacs.config import load_settings
from safepacs.runtime.supervisor import prepare, run

settings = load_settings(Path(sys.argv[1]), {"server": {"dicom_port": 0, "dicom_tls_port": 0}})
configure_logging("INFO")
prepare(settings)
ready = lambda plain, tls: print(f"listening for DICOM on {plain[0]}:{plain[1]}", flush=True)
setup = lambda: configure_logging("INFO")
sys.exit(run(settings, https=None, setup=setup, ready=ready, purge_interval=float(sys.argv[2])))
"""

ENV = {
    "SAFEPACS_SERVER__SHUTDOWN_GRACE": "5",
    "SAFEPACS_SERVER__WORKERS": "1",
    "SAFEPACS_STORAGE__AUDIT_RESERVE_BYTES": "1048576",
}


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _import_one(data_dir: Path, tmp_path: Path) -> str:
    """Import an instance; its SOP Instance UID."""
    ds = make_ct()
    path = tmp_path / "ct.dcm"
    path.write_bytes(part10_bytes(ds))
    assert run_cli("import", str(path), "--data", str(data_dir)) == 0
    return str(ds.SOPInstanceUID)


def _trash(repos: Repositories, sop: str, due_in: float = -1.0) -> None:
    """Put ``sop`` in the trash, due for destruction ``due_in`` seconds from now (already, by default)."""
    due = datetime.now(UTC) + timedelta(seconds=due_in)
    assert repos.instances.trash_instances([sop], "admin", due) == 1


def _trash_one(data_dir: Path, repos: Repositories, tmp_path: Path) -> str:
    """Import an instance and put it in the trash, due for destruction already; its SOP Instance UID."""
    sop = _import_one(data_dir, tmp_path)
    _trash(repos, sop)
    return sop


def _objects(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "objects").rglob("*") if p.is_file()]


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class _Supervisor:
    """The supervisor without HTTPS, in a process of its own, its standard error collected."""

    def __init__(self, data_dir: Path, env: dict[str, str], purge_interval: float) -> None:
        self.errors = data_dir.parent / "supervisor.log"
        with self.errors.open("w") as errors:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WITHOUT_HTTPS, str(data_dir), str(purge_interval)],
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env={**os.environ, **ENV, **env},
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening for DICOM on" in line, (line, self.log())

    def log(self) -> str:
        return self.errors.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def supervisor(data_dir: Path) -> Iterator[Callable[..., _Supervisor]]:
    started: list[_Supervisor] = []

    def start(purge_interval: float = PURGE_INTERVAL, **env: str) -> _Supervisor:
        started.append(_Supervisor(data_dir, env, purge_interval))
        return started[-1]

    yield start
    for sup in started:
        sup.stop()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_the_trash_is_purged_without_an_https_listener_by_a_child_that_exits(
    data_dir: Path, repos: Repositories, tmp_path: Path, supervisor: Callable[..., _Supervisor]
) -> None:
    """With no HTTPS listener, the trash whose retention has ended is still purged (it used to be
    purged by the HTTPS process only): at the start, bytes and entry, with its audit record, by a child
    that then exits.  Without audit collectors there is no export process either, so the supervisor is
    left with its one DIMSE worker (a long-lived jobs process used to stay beside it), and stops
    cleanly."""
    _trash_one(data_dir, repos, tmp_path)
    assert len(_objects(data_dir)) == 1
    sup = supervisor()
    _eventually(lambda: repos.instances.list_trash() == [], "the purge")
    assert _objects(data_dir) == []
    _eventually(lambda: len(_children(sup.proc.pid)) == 1, "the purge child's end", timeout=10)
    time.sleep(1.5)  # three turns of the supervisor's loop: no other child appears
    assert len(_children(sup.proc.pid)) == 1  # the DIMSE worker: no HTTPS, no export, no purge process
    assert sup.stop() == 0
    log = sup.log()
    assert "trash purged" in log and "instances=1" in log, log
    assert "audit export running" not in log, log
    assert "uvicorn" not in log and "Traceback" not in log and "restarting" not in log, log
    bodies = [r.body for r in repos.audit_log.audit_records()]
    assert any("1 instances destroyed from the trash after the retention period" in b for b in bodies)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[Receiver, str]]:
    """A syslog-over-TLS collector on 127.0.0.1 and the ``audit.collectors`` setting naming it (JSON)."""
    ca_cert, ca_key = create_ca("Audit Test CA")
    cert, key = issue_certificate(ca_cert, ca_key, "collector", server_names=["127.0.0.1"])
    for name, pem in (("ca.pem", ca_cert), ("collector.pem", cert), ("collector.key", key)):
        (tmp_path / name).write_bytes(pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "collector.pem", tmp_path / "collector.key")
    receiver = Receiver(context)
    receiver.start()
    try:
        setting = {
            "name": "siem",
            "host": "127.0.0.1",
            "port": receiver.port,
            "ca_file": str(tmp_path / "ca.pem"),
        }
        yield receiver, json.dumps([setting])
    finally:
        receiver.stop()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_the_audit_trail_is_exported_without_an_https_listener(
    collector: tuple[Receiver, str], supervisor: Callable[..., _Supervisor]
) -> None:
    """With no HTTPS listener, the audit trail still goes to the configured collector (it used to be
    forwarded by the HTTPS process only): Application Start arrives over syslog and TLS, from the one
    export process that runs beside the DIMSE worker once the purge child has exited."""
    receiver, setting = collector
    sup = supervisor(SAFEPACS_AUDIT__COLLECTORS=setting)
    got = receiver.wait_for(1, timeout=30)
    _eventually(lambda: len(_children(sup.proc.pid)) == 2, "the purge child's end", timeout=10)
    assert "audit export running" in sup.log() and "collectors=1" in sup.log(), sup.log()
    assert sup.stop() == 0
    start = got[0].xml.find("EventIdentification/EventID")
    assert start is not None and start.get("csd-code") == "110100", got[0]  # Application Activity
    assert "uvicorn" not in sup.log() and "Traceback" not in sup.log(), sup.log()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_a_purge_runs_every_interval_and_one_that_failed_is_retried(
    data_dir: Path, repos: Repositories, tmp_path: Path, supervisor: Callable[..., _Supervisor]
) -> None:
    """Purge children keep coming, one per interval (1 s here): an instance trashed after the start is
    purged by a later one.  One that fails (the object store cannot remove the object: a directory
    stands in its place) is logged without a traceback, is not taken for a process failing at start
    (more than three such would stop the supervisor), and the next one, once the store can, purges."""
    sup = supervisor(purge_interval=1.0)
    sop = _import_one(data_dir, tmp_path)
    (blob,) = _objects(data_dir)
    blob.unlink()
    blob.mkdir()  # unlink() of a directory fails, for root too
    _trash(repos, sop)
    _eventually(lambda: sup.log().count("purging the trash failed") >= 5, "five failed purges")
    assert [r.sop_instance_uid for r in repos.instances.list_trash()] == [sop]
    blob.rmdir()
    _eventually(lambda: repos.instances.list_trash() == [], "the purge after the failures")
    assert sup.proc.poll() is None
    assert sup.stop() == 0
    log = sup.log()
    assert "error=StorageError" in log, log
    assert "Traceback" not in log and "restarting" not in log and "keep failing" not in log, log
    assert "ended abnormally" not in log, log


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_a_purge_in_progress_stops_within_the_grace(
    data_dir: Path, repos: Repositories, tmp_path: Path, supervisor: Callable[..., _Supervisor]
) -> None:
    """SIGTERM reaches a purge child that is running, and it has exited within server.shutdown_grace
    (2 s here) plus _stop.STOP_MARGIN: the purge waits for the index writers' turn, which this test
    holds (an flock on ``index.sqlite3-writers``), so only its own deadline ends it."""
    grace = 2.0
    sup = supervisor(purge_interval=1.0, SAFEPACS_SERVER__SHUTDOWN_GRACE=str(grace))
    worker = _worker(sup)
    _trash(repos, _import_one(data_dir, tmp_path), due_in=3.0)  # due once the lock below is held
    with (data_dir / "index.sqlite3-writers").open("rb") as turns:
        fcntl.flock(turns, fcntl.LOCK_EX)
        time.sleep(3.0)  # the instance is due: the next purge child finds it, waits for the writers' turn
        waiting: list[int] = []

        def stuck() -> bool:  # a purge child there 1.5 s later (one finding nothing is gone in less)
            others = set(_children(sup.proc.pid)) - {worker}
            time.sleep(1.5)
            waiting[:] = others & set(_children(sup.proc.pid))
            return bool(waiting)

        _eventually(stuck, "a purge child waiting for the writers' turn", timeout=20)
        (purging,) = waiting
        start = time.monotonic()
        sup.proc.send_signal(signal.SIGTERM)
        _eventually(lambda: not _alive(purging), "the purge child's exit", timeout=grace + STOP_MARGIN + 5)
        took = time.monotonic() - start
    assert sup.stop() == 0
    assert took <= grace + STOP_MARGIN, took
    log = sup.log()
    assert re.search(r"still stopping after server.shutdown_grace; exiting now.*child=purge", log), log
    assert "Traceback" not in log, log
    assert len(repos.instances.list_trash()) == 1  # cut short before it recorded anything


def _worker(sup: _Supervisor) -> int:
    """The DIMSE worker's pid, from its log line."""
    _eventually(lambda: "DIMSE worker accepting" in sup.log(), "the DIMSE worker")
    match = re.search(r"DIMSE worker accepting.*pid=(\d+)", sup.log())
    assert match is not None
    return int(match.group(1))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie not yet reaped has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _exporter(srv: Server, after: int = 0) -> int:
    """The pid the audit export process of ``srv`` logged; the one after the first ``after`` of them."""
    pids: list[str] = []

    def logged() -> bool:
        pids[:] = re.findall(r"audit export running.*pid=(\d+)", srv.stderr_text())
        return len(pids) > after

    _eventually(logged, "the audit export process")
    return int(pids[after])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_serve_purges_at_start_and_restarts_its_audit_export_process(
    data_dir: Path, repos: Repositories, tmp_path: Path, collector: tuple[Receiver, str]
) -> None:
    """``safepacs serve`` with a collector: the trash past its retention is purged at the start by a
    child that exits, leaving the DIMSE worker, the HTTPS process and the audit export process; the
    export process is restarted like the others when it dies, and the new one forwards."""
    receiver, setting = collector
    _trash_one(data_dir, repos, tmp_path)
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_AUDIT__COLLECTORS": setting})
    try:
        _eventually(lambda: repos.instances.list_trash() == [], "the purge")
        assert _objects(data_dir) == []
        exporter = _exporter(srv)
        _eventually(lambda: len(_children(srv.proc.pid)) == 3, "the purge child's end", timeout=10)
        assert exporter in _children(srv.proc.pid)
        before = len(receiver.wait_for(1, timeout=30))
        os.kill(exporter, signal.SIGKILL)
        successor = _exporter(srv, after=1)
        assert successor in _children(srv.proc.pid) and len(_children(srv.proc.pid)) == 3
        assert run_cli("user", "add", "carol", "--role", "radiologist", "--data", str(data_dir)) == 0
        receiver.wait_for(before + 1, timeout=30)  # the new process forwards what was recorded since
    finally:
        assert srv.stop() == 0
    log = srv.stderr_text()
    assert re.search(r"a SafePACS process exited; restarting.*child=safepacs-audit-export", log), log
    assert "Traceback" not in log, log
