"""``safepacs doctor``: a fresh ``init`` has nothing above low, running or not; each weakening shows up."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import run_cli, start_server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def doctor(tmp_path: Path, data: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / f"doctor-{time.monotonic_ns()}.json"
    code = run_cli("doctor", "--data", str(data), *args, "--format", "json", "--out", str(out))
    return code, json.loads(out.read_text())


def by_check(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f in report["findings"]:
        out.setdefault(f["check"], []).append(f)
    return out


PLAINTEXT_INDEX = "config.index-plaintext-phi"


def above_low(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The findings above low, but the plain-text index every installation has until it is encrypted."""
    return [
        f
        for f in report["findings"]
        if f["severity"] not in ("low", "info") and f["check"] != PLAINTEXT_INDEX
    ]


def test_fresh_init_has_nothing_above_low_but_the_plaintext_index(data_dir: Path, tmp_path: Path) -> None:
    # Ports nobody listens on (never the defaults: another server on this machine may use them).
    code, report = doctor(
        tmp_path, data_dir, "--dicom-port", str(_free_port()), "--http-port", str(_free_port())
    )
    assert code == 0
    assert report["summary"]["worst"] == "medium"
    checks = by_check(report)
    assert "doctor.not-running" in checks
    assert {"config.initial-password", "config.admin-no-2fa", "config.audit-local-only"} <= set(checks)
    assert above_low(report) == []


def test_the_plaintext_index_is_reported_prominently(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, report = doctor(tmp_path, data_dir, "--no-network")
    (finding,) = by_check(report)[PLAINTEXT_INDEX]
    assert finding["severity"] == "medium"
    assert finding["target"] == str((data_dir / "index.sqlite3").resolve())
    assert "plain text" in finding["title"] and "not implemented yet" in finding["detail"]
    assert "encrypted storage" in finding["remediation"] and "backup" in finding["remediation"]
    # On the terminal it comes first: the worst finding of a fresh data directory.
    assert run_cli("doctor", "--data", str(data_dir), "--no-network") == 0
    table = capsys.readouterr().out
    rows = re.findall(r"^│ (critical|high|medium|low|info) ", table, re.MULTILINE)
    assert rows[0] == "medium" and rows.count("medium") == 1 and "plain" in table


def test_running_server_has_nothing_above_low(data_dir: Path, tmp_path: Path) -> None:
    server = start_server(data_dir, env={"SAFEPACS_SERVER__SHUTDOWN_GRACE": "0.5"})
    try:
        code, report = doctor(
            tmp_path, data_dir, "--dicom-port", str(server.port), "--http-port", str(server.https_port)
        )
    finally:
        server.stop()
    assert code == 0, above_low(report)
    assert above_low(report) == []
    assert {(e["port"], e["service"], e["product"]) for e in report["endpoints"]} == {
        (server.port, "dicom", "SafePACS"),
        (server.https_port, "https", "SafePACS"),
    }
    (access,) = by_check(report)["dicom.access-control"]
    assert "calling AE title is checked" in access["detail"]  # the called AE was SafePACS's own
    assert "tls.certificate" not in by_check(report)  # trusted through the data directory's CA


def test_weakened_configuration_is_reported(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = data_dir / "safepacs.toml"
    text = toml.read_text()
    text = text.replace("max_results = 500", "max_results = 0")
    text = text.replace('totp_required_roles = ["admin"]', "totp_required_roles = []")
    assert "max_results = 0" in text and "totp_required_roles = []" in text
    toml.write_text(text)
    assert (
        run_cli(
            "peer", "add", "WARD", "--host", "10.20.0.0/16", "--allow", "echo,find", "--data", str(data_dir)
        )
        == 0
    )
    assert (
        run_cli(
            "peer",
            "add",
            "CT1",
            "--host",
            "192.168.7.20",
            "--allow",
            "store",
            "--tls",
            "off",
            "--data",
            str(data_dir),
        )
        == 0
    )
    key = data_dir / "keys" / "server.key"
    key.chmod(0o644)
    capsys.readouterr()

    code, report = doctor(tmp_path, data_dir, "--no-network")
    assert code == 1
    checks = by_check(report)
    severity = {check: {f["severity"] for f in found} for check, found in checks.items()}
    assert severity["config.no-result-limit"] == {"medium"}
    assert severity["config.peer-broad"] == {"high"}
    assert "10.20.0.0/16" in checks["config.peer-broad"][0]["title"]
    assert severity["config.peer-plain"] == {"medium"}
    assert checks["config.peer-plain"][0]["target"] == "peer CT1"
    assert severity["config.peer-unscoped"] == {"low"}
    assert severity["config.key-permissions"] == {"high"}
    assert checks["config.key-permissions"][0]["remediation"] == f"chmod 600 {key}"
    assert "high" in severity["config.admin-no-2fa"]
    assert report["endpoints"] == []

    assert run_cli("doctor", "--data", str(data_dir), "--no-network", "--fail-on", "critical") == 0
    table = capsys.readouterr().out
    assert "Private key" in table and "WARD" in table


def test_doctor_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("doctor", "--data", str(tmp_path / "nothing")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("safepacs: ") and "safepacs init" in err and "\n" not in err


def test_doctor_reads_the_index_without_changing_it(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib
    import sqlite3

    index = data_dir / "index.sqlite3"
    before = hashlib.sha256(index.read_bytes()).hexdigest()
    code, _ = doctor(tmp_path, data_dir, "--no-network")
    assert code == 0
    assert hashlib.sha256(index.read_bytes()).hexdigest() == before
    # An index whose schema is older than this SafePACS: said so, and left as it is (no migration).
    with contextlib.closing(sqlite3.connect(index)) as db, db:
        db.execute("UPDATE alembic_version SET version_num = '0005'")
    capsys.readouterr()
    assert run_cli("doctor", "--data", str(data_dir), "--no-network") == 2
    err = capsys.readouterr().err
    assert "schema" in err and "does not change it" in err
    with contextlib.closing(sqlite3.connect(index)) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0005",)]


@pytest.mark.postgres
def test_doctor_opens_postgresql_read_only(postgres_url: str) -> None:
    """On PostgreSQL the doctor's connection refuses writes, whatever code would try one."""
    from safepacs.app import open_repositories_read_only
    from safepacs.db.database import migrate
    from safepacs.errors import DatabaseError
    from safepacs.types import Peer, Service

    migrate(postgres_url)
    repos = open_repositories_read_only(postgres_url)
    try:
        assert repos.directory.list_peers() == []  # reads work, in the test's own schema (options kept)
        with pytest.raises(DatabaseError):
            repos.directory.add_peer(Peer("CT1", "127.0.0.1", 104, frozenset({Service.STORE})))
    finally:
        repos.close()
