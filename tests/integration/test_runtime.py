"""The supervisor of ``safepacs serve`` and its background jobs: the trash purge and the audit export run
in a process of their own, whichever listeners run.

There is no setting that turns the HTTPS listener off, so the tests without it start the supervisor
(``runtime.supervisor.run``) with no HTTPS socket, as ``safepacs serve`` would if one were added.
"""

from __future__ import annotations

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

from safepacs.app import Repositories
from safepacs.auth.pki import create_ca, issue_certificate
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
sys.exit(run(settings, https=None, setup=lambda: configure_logging("INFO"), ready=ready))
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


def _trash_one(data_dir: Path, repos: Repositories, tmp_path: Path) -> str:
    """Import an instance and put it in the trash, due for destruction already; its SOP Instance UID."""
    ds = make_ct()
    path = tmp_path / "ct.dcm"
    path.write_bytes(part10_bytes(ds))
    assert run_cli("import", str(path), "--data", str(data_dir)) == 0
    sop = str(ds.SOPInstanceUID)
    assert repos.instances.trash_instances([sop], "admin", datetime.now(UTC) - timedelta(seconds=1)) == 1
    return sop


def _objects(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "objects").rglob("*") if p.is_file()]


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class _Supervisor:
    """The supervisor without HTTPS, in a process of its own, its standard error collected."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.errors = data_dir.parent / "supervisor.log"
        with self.errors.open("w") as errors:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WITHOUT_HTTPS, str(data_dir)],
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

    def start(**env: str) -> _Supervisor:
        started.append(_Supervisor(data_dir, env))
        return started[-1]

    yield start
    for sup in started:
        sup.stop()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_the_trash_is_purged_without_an_https_listener(
    data_dir: Path, repos: Repositories, tmp_path: Path, supervisor: Callable[..., _Supervisor]
) -> None:
    """With no HTTPS listener, the trash whose retention has ended is still purged (it used to be
    purged by the HTTPS process only): at the jobs process's start, bytes and entry, with its audit
    record.  The supervisor runs a DIMSE worker and the jobs process, and stops cleanly."""
    _trash_one(data_dir, repos, tmp_path)
    assert len(_objects(data_dir)) == 1
    sup = supervisor()
    _eventually(lambda: repos.instances.list_trash() == [], "the purge")
    assert _objects(data_dir) == []
    assert len(_children(sup.proc.pid)) == 2  # one DIMSE worker and the jobs process, no HTTPS one
    assert sup.stop() == 0
    log = sup.log()
    assert "trash purged" in log and "instances=1" in log, log
    assert "uvicorn" not in log and "Traceback" not in log, log
    bodies = [r.body for r in repos.audit_log.audit_records()]
    assert any("1 instances destroyed from the trash after the retention period" in b for b in bodies)


def test_the_audit_trail_is_exported_without_an_https_listener(
    data_dir: Path, tmp_path: Path, supervisor: Callable[..., _Supervisor]
) -> None:
    """With no HTTPS listener, the audit trail still goes to the configured collector (it used to be
    forwarded by the HTTPS process only): Application Start arrives over syslog and TLS."""
    ca_cert, ca_key = create_ca("Audit Test CA")
    cert, key = issue_certificate(ca_cert, ca_key, "collector", server_names=["127.0.0.1"])
    for name, pem in (("ca.pem", ca_cert), ("collector.pem", cert), ("collector.key", key)):
        (tmp_path / name).write_bytes(pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "collector.pem", tmp_path / "collector.key")
    receiver = Receiver(context)
    receiver.start()
    try:
        collector = {
            "name": "siem",
            "host": "127.0.0.1",
            "port": receiver.port,
            "ca_file": str(tmp_path / "ca.pem"),
        }
        sup = supervisor(SAFEPACS_AUDIT__COLLECTORS=json.dumps([collector]))
        got = receiver.wait_for(1, timeout=30)
        assert sup.stop() == 0
    finally:
        receiver.stop()
    start = got[0].xml.find("EventIdentification/EventID")
    assert start is not None and start.get("csd-code") == "110100", got[0]  # Application Activity
    assert "uvicorn" not in sup.log() and "Traceback" not in sup.log(), sup.log()


def _jobs_pid(srv: Server) -> int:
    """The jobs process of ``srv``: its child that is neither a DIMSE worker nor the HTTPS process."""
    _eventually(lambda: "Application startup complete" in srv.stderr_text(), "the HTTPS process")
    others = {int(pid) for pid in re.findall(r"(?:pid=|Started server process \[)(\d+)", srv.stderr_text())}
    (jobs,) = set(_children(srv.proc.pid)) - others
    return jobs


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")
def test_serve_restarts_its_jobs_process_which_purges_at_start(
    data_dir: Path, repos: Repositories, tmp_path: Path
) -> None:
    """``safepacs serve`` runs the jobs in a process of its own, restarted like the others when it dies;
    the new one purges the trash at its start."""
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        jobs = _jobs_pid(srv)
        _trash_one(data_dir, repos, tmp_path)
        os.kill(jobs, signal.SIGKILL)
        _eventually(lambda: "child=safepacs-jobs" in srv.stderr_text(), "the restart")
        _eventually(lambda: repos.instances.list_trash() == [], "the purge")
        assert _objects(data_dir) == []
    finally:
        assert srv.stop() == 0
    log = srv.stderr_text()
    assert re.search(r"a SafePACS process exited; restarting.*child=safepacs-jobs", log), log
    assert "Traceback" not in log, log
