"""What one failing request leaves in the server's log: the exception's type and frames, no values."""

from __future__ import annotations

import json
import sqlite3
import ssl
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from safepacs._logging import format_exception
from tests.support.server import Server, run_cli, start_server

USER = "ulrike"
ROW_MARKER = "Mustermann-row-value"  # in the corrupted row; a ValueError's message repeats it
QUERY_VALUE = "Leibniz-query-value"
HEADER_VALUE = "header-value-9f3c"
LOCALS_MARKERS = ("locals", "│", "╭", "credentials =", "scope =")


def _failing_request(srv: Server, token: str) -> httpx.Response:
    """A QIDO-RS request that fails inside the server: the token's row has an unreadable expiry."""
    with closing(sqlite3.connect(srv.data / "index.sqlite3")) as db, db:
        db.execute("UPDATE tokens SET expires_at = ?", (ROW_MARKER,))
    verify = ssl.create_default_context(cafile=str(srv.ca_file))
    with httpx.Client(base_url=srv.base_url, verify=verify, timeout=20) as client:
        return client.get(
            f"/dicomweb/studies?PatientName={QUERY_VALUE}*",
            headers={"Authorization": f"Bearer {token}", "X-Probe": HEADER_VALUE},
        )


def _wait_for(srv: Server, start: int, done: Callable[[str], bool]) -> list[str]:
    """The log lines written since ``start``, once one of them is ``done``."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(done(line.rstrip("\n")) for line in srv.log[start:]):
            time.sleep(0.3)  # anything logged with it
            return [line for line in (line.rstrip("\n") for line in srv.log[start:]) if line]
        time.sleep(0.05)
    raise AssertionError(f"no such log line: {srv.log[start:]!r}")


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_a_failing_request_logs_a_bounded_traceback_without_values(
    data_dir: Path, log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("user", "add", USER, "--role", "radiologist", "--data", str(data_dir)) == 0
    capsys.readouterr()
    assert run_cli("token", "create", "--user", USER, "--data", str(data_dir)) == 0
    token = capsys.readouterr().out.strip()
    _, token_id, secret = token.split("_", 2)
    chosen = ("--log-format", "json") if log_format == "json" else ()  # console: the default
    srv = start_server(data_dir, *chosen, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        start = len(srv.log)
        r = _failing_request(srv, token)
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/problem+json"
        # uvicorn logs the exception Starlette re-raises; its last line names the exception's type.
        if log_format == "json":
            added = _wait_for(srv, start, lambda line: "Exception in ASGI" in line)
        else:  # the traceback's last line
            added = _wait_for(srv, start, lambda line: line.startswith("ValueError"))
    finally:
        srv.stop()
    text = "\n".join(added)
    assert len(added) < 60, text
    for secretive in (token_id, secret[:12], ROW_MARKER, QUERY_VALUE, HEADER_VALUE, USER, *LOCALS_MARKERS):
        assert secretive not in text, secretive
    assert "Invalid isoformat" not in text  # the ValueError's message: not logged
    assert "safepacs/db/directory.py" in text  # the frames are: where it failed
    if log_format == "json":
        records = [json.loads(line) for line in added]  # one JSON object per line, nothing else
        (failure,) = [r for r in records if "exception" in r]
        assert failure["exception"].endswith("\nValueError")
        assert failure["logger"] == "uvicorn.error"
        assert "exc_info" not in text
    else:
        assert "ValueError" in added


def _deep(n: int) -> None:
    if n == 0:
        raise KeyError("Doe^Jane 1.2.840.99")
    _deep(n - 1)


def _chained() -> None:
    """A KeyError 300 frames deep, raised from as a RuntimeError, during whose handling an
    DatabaseError (a SafePACS error) happens: three exceptions, each with patient data but the last."""
    from safepacs.errors import DatabaseError

    try:
        try:
            _deep(300)
        except KeyError as exc:
            raise RuntimeError("while reading Doe^Jane") from exc
    except RuntimeError:
        raise DatabaseError("the index database failed (OperationalError)")  # noqa: B904


def test_a_chain_of_deep_exceptions_renders_in_a_bounded_number_of_lines() -> None:
    try:
        _chained()
    except Exception as exc:
        text = format_exception((type(exc), exc, exc.__traceback__))
    lines = text.splitlines()
    assert "Doe" not in text and "1.2.840" not in text
    assert len(lines) < 60
    assert [line for line in lines if not line.startswith("  ")] == [
        "Traceback (frames only; values and messages are not logged):",
        "KeyError",
        "The above exception was the direct cause of the following exception:",
        "Traceback (frames only; values and messages are not logged):",
        "RuntimeError",
        "During handling of the above exception, another exception occurred:",
        "Traceback (frames only; values and messages are not logged):",
        # SafePACS's own errors say what failed (their messages never carry PHI); others only their type.
        "safepacs.errors.DatabaseError: the index database failed (OperationalError)",
    ]
    assert "frames not shown" in lines[1]
    disk = OSError(28, "No space left on device", "/scans/Doe^Jane.dcm")
    assert format_exception((OSError, disk, None)).splitlines()[-1] == "OSError [ENOSPC]"


def test_a_library_logging_an_exception_as_its_message_logs_its_type_instead() -> None:
    import logging
    import sys

    from safepacs._logging import RedactExceptionText
    from safepacs.errors import StorageError

    for exc, expected in (
        (ValueError("PatientName 'Doe^Jane' cannot be decoded"), "handler failed: <ValueError>"),
        (StorageError("could not read a stored object: Permission denied"), None),
    ):
        try:
            raise exc
        except Exception as caught:
            record = logging.LogRecord(
                "pynetdicom", logging.ERROR, __file__, 1, "handler failed: %s", (caught,), sys.exc_info()
            )
        assert RedactExceptionText().filter(record)
        assert record.getMessage() == (expected or f"handler failed: {exc}")
