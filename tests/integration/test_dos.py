"""Connection-level denial of service on the DIMSE, DICOM TLS and HTTPS listeners, and stopping.

A stranger who can reach a port and holds or churns connections - bare TCP, a PDU header, a rejected
A-ASSOCIATE-RQ kept open, a TLS handshake never finished, an HTTP request head never finished - must
not keep a registered peer or a real client out, and SIGTERM stops every process within the bound
(``server.shutdown_grace`` plus 5 s).  Real servers, real sockets on 127.0.0.1, every wait bounded.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import resource
import select
import signal
import socket
import ssl
import struct
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import CTImageStorage, Verification

import safepacs
from safepacs.app import open_repositories
from safepacs.audit import EventID
from safepacs.config import load_settings
from safepacs.errors import ConfigError
from tests.support.audit_capture import AuditCapture
from tests.support.corpus import make_ct
from tests.support.dicom_client import associate, rejection
from tests.support.server import Server, start_server
from tests.support.tls import context, issue, tls
from tests.support.web import _client, _token, _user

ASSOCIATE_TIMEOUT = 5.0  # server.associate_timeout's default
HEAD_TIMEOUT = 5.0  # server.http_head_timeout's default
PER_ADDRESS = 16  # server.max_pending_per_address's default
LOCAL_LIMIT = (0x02, 0x03, 0x02)
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
PACKAGE = Path(safepacs.__file__).resolve().parent


# Helpers -----------------------------------------------------------------------------------------------
def associate_rq(calling: str, called: str = "SAFEPACS") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification, as a requestor would send it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    cx = build_context(Verification)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.826.0.1.3680043.10.1474.99"
    primitive.user_information = [length, uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def closed_by_server(sock: Any) -> bool:
    """Whether the server has closed ``sock`` (EOF or reset), without waiting."""
    if sock.fileno() < 0:
        raise AssertionError("the test closed this socket itself")
    poller = select.poll()  # not select(): the slowloris test holds more than 1024 descriptors
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        sock.setblocking(False)
        while chunk := sock.recv(65536):  # an A-ABORT or A-ASSOCIATE-RJ may come before the EOF
            del chunk
    except (BlockingIOError, ssl.SSLWantReadError):  # nothing more yet (TLS: a record not complete)
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
    return True


def wait_closed(socks: list[Any], timeout: float) -> dict[int, float]:
    """{index: seconds until the server closed it} for the sockets closed within ``timeout``."""
    start = time.monotonic()
    closed: dict[int, float] = {}
    while len(closed) < len(socks) and time.monotonic() - start < timeout:
        for i, sock in enumerate(socks):
            if i not in closed and closed_by_server(sock):
                closed[i] = time.monotonic() - start
        time.sleep(0.05)
    return closed


def wait_for_log(srv: Server, pattern: str, timeout: float = 10.0) -> re.Match[str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(pattern, srv.stderr_text()):
            return match
        time.sleep(0.05)
    return None


def reported(srv: Server, reason: str) -> int:
    """How many connections the server's reports say it dropped for ``reason`` (they are summed up
    per address and minute)."""
    return sum(int(n) for n in re.findall(re.escape(reason) + r": (\d+)", srv.stderr_text()))


def echo_as(srv: Server, calling: str, port: int, **kwargs: Any) -> float:
    """Seconds a C-ECHO association of ``calling`` took from connect to release; fails when refused."""
    start = time.monotonic()
    with associate(port, [build_context(Verification)], calling=calling, **kwargs) as assoc:
        assert assoc.is_established, rejection(assoc) if assoc.is_rejected else "aborted or no answer"
        assert assoc.send_c_echo().Status == 0x0000
    return time.monotonic() - start


def node_refusals(srv: Server) -> list[Any]:
    """Node Authentication failures in the audit trail (rejected associations, dropped connections)."""
    repos = open_repositories(f"sqlite:///{(srv.data / 'index.sqlite3').resolve()}")
    try:
        capture = AuditCapture(repos.audit_log)
        capture.start = 0
        return [e for e in capture.events(EventID.SECURITY_ALERT, "110126") if e.outcome_description]
    finally:
        repos.close()


class Stranger:
    """Holds ``hold`` idle connections to ``port`` and opens and closes ``rate`` more a second (every
    other one after sending a 6-byte PDU header) until stopped; at most ``seconds`` of it.  With
    ``tls`` each connection first completes a TLS handshake, without a client certificate."""

    def __init__(
        self, port: int, *, tls: bool = False, hold: int = 500, rate: int = 100, seconds: float = 8.0
    ) -> None:
        self.port, self.hold, self.rate, self.seconds = port, hold, rate, seconds
        self.tls: ssl.SSLContext | None = None
        if tls:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.tls.check_hostname = False
            self.tls.verify_mode = ssl.CERT_NONE
        self.held: list[socket.socket] = []
        self.churned = 0
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stranger:
        self._thread.start()
        assert self.ready.wait(30), "the stranger could not open its connections"
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(15)
        for sock in self.held:
            sock.close()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        return self.tls.wrap_socket(sock) if self.tls is not None else sock

    def _run(self) -> None:
        end = time.monotonic() + 30
        while len(self.held) < self.hold and time.monotonic() < end:
            with suppress(OSError):
                self.held.append(self._connect())
        self.ready.set()
        end = time.monotonic() + self.seconds
        step = 1.0 / self.rate
        while not self._stop.is_set() and time.monotonic() < end:
            started = time.monotonic()
            with suppress(OSError), self._connect() as sock:
                if self.churned % 2:
                    sock.sendall(b"\x01\x00\x00\x00\x01\x00")  # an A-ASSOCIATE-RQ header, then nothing
            self.churned += 1
            time.sleep(max(0.0, step - (time.monotonic() - started)))


# DIMSE: bare connections -------------------------------------------------------------------------------
def test_bare_connections_do_not_take_association_slots(server: Server) -> None:
    """80 connections that send nothing, a PDU header, another PDU or an A-ASSOCIATE-RQ that cannot be
    decoded, and close: a registered peer associates at once (they took a slot each for the ARTIM time
    before)."""
    server.add_peer("CT1", "echo")
    for i in range(80):
        with connect(server.port) as sock:
            if i % 4 == 1:
                sock.sendall(b"\x01\x00\x00\x00\x01\x00")
            elif i % 4 == 2:
                sock.sendall(A_RELEASE_RQ)  # not an A-ASSOCIATE-RQ: an A-ABORT, then closed
            elif i % 4 == 3:
                sock.sendall(b"\x01\x00\x00\x00\x00\x04garb")  # an A-ABORT too
    assert echo_as(server, "CT1", server.port) < 5
    match = wait_for_log(server, r"connections dropped before association.*")
    assert match is not None and "127.0.0.1" in match.group(0)
    assert "Traceback" not in server.stderr_text()
    # Reported per address (and worker) and minute: the first at once, the rest in the next report.
    deadline = time.monotonic() + 5
    while not (records := node_refusals(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 1 <= len(records) <= 2
    for record in records:
        assert re.fullmatch(r"\d+ connection\(s\) closed before association: .+", record.outcome_description)
        (who,) = [p for p in record.participants if p.requestor]
        assert who.address == "127.0.0.1"
        assert dict(record.objects[0].detail)["Transport"] == "DICOM port, before admission"


def test_a_connection_must_associate_within_the_deadline(srv: Server, tmp_path: Path) -> None:
    """An idle connection, one dripping its A-ASSOCIATE-RQ a byte at a time, an unfinished TLS
    handshake and a finished one with no A-ASSOCIATE-RQ are all closed after server.associate_timeout
    (5 s) - one deadline, not one per read."""
    srv.add_peer("CT1", "echo", tls="required")
    ct1 = issue(srv, "CT1", tmp_path / "ct1")
    idle = connect(srv.port)
    drip = connect(srv.port)
    tls_idle = connect(srv.tls_port)
    tls_done = context(srv, ct1).wrap_socket(connect(srv.tls_port), server_hostname="127.0.0.1")
    socks = [idle, drip, tls_idle, tls_done]
    pdu = associate_rq("CT1")
    start = time.monotonic()
    closed: dict[int, float] = {}
    try:
        sent = 0
        while len(closed) < len(socks) and time.monotonic() - start < ASSOCIATE_TIMEOUT + 5:
            if 1 not in closed and sent < len(pdu):
                with suppress(OSError):
                    drip.send(pdu[sent : sent + 1])
                    sent += 1
            for i, sock in enumerate(socks):
                if i not in closed and closed_by_server(sock):
                    closed[i] = time.monotonic() - start
            time.sleep(0.25)
    finally:
        for sock in socks:
            sock.close()
    assert sorted(closed) == [0, 1, 2, 3], closed
    assert all(ASSOCIATE_TIMEOUT - 0.5 < t < ASSOCIATE_TIMEOUT + 5 for t in closed.values()), closed
    srv.stop()  # reports what the last minute's report left out
    assert reported(srv, "no A-ASSOCIATE-RQ within server.associate_timeout") == 3
    assert reported(srv, "TLS handshake not completed within server.associate_timeout") == 1


def test_pending_connections_are_capped_per_address(data_dir: Path) -> None:
    """40 idle connections from one address: the oldest beyond server.max_pending_per_address (16) are
    closed at once, and a registered peer from the same address still associates.  (A long
    server.associate_timeout here, so that on a slow machine no connection is closed for its deadline
    while the test counts those closed for the cap.)"""
    srv = start_server(
        data_dir, env={"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_SERVER__ASSOCIATE_TIMEOUT": "60"}
    )
    srv.add_peer("CT1", "echo")
    socks = []
    try:
        for _ in range(40):
            socks.append(connect(srv.port))
            time.sleep(0.01)  # accepted in this order
        closed = wait_closed(socks, 3.0)
        assert len(closed) == 40 - PER_ADDRESS, sorted(closed)
        assert not set(closed) & set(range(40 - 8, 40)), "the newest connections were closed"
        assert echo_as(srv, "CT1", srv.port) < 5
    finally:
        for sock in socks:
            sock.close()
        srv.stop()
    assert "more connections awaiting admission than server.max_pending_per_address" in srv.stderr_text()


@pytest.mark.parametrize("port_kind", ["plain", "tls"])
def test_a_flood_does_not_keep_a_registered_peer_out(server: Server, tmp_path: Path, port_kind: str) -> None:
    """A stranger holds 500 idle connections and opens and closes 100 a second (on the TLS port each
    completes its TLS handshake, which needs no client certificate); a registered peer keeps
    associating, each association within 1 s (asserted with a margin for a loaded test machine), and
    the audit trail gets a record per address per minute, not per connection."""
    kwargs: dict[str, Any] = {}
    if port_kind == "tls":
        server.add_peer("CT1", "echo", tls="required")
        kwargs["tls_args"] = tls(context(server, issue(server, "CT1", tmp_path / "ct1")))
        port = server.tls_port
    else:
        server.add_peer("CT1", "echo")
        port = server.port
    before = len(node_refusals(server))
    durations = []
    with Stranger(port, tls=port_kind == "tls") as stranger:
        end = time.monotonic() + 4
        while time.monotonic() < end:
            durations.append(echo_as(server, "CT1", port, **kwargs))
            time.sleep(0.2)
        assert stranger.churned > 100
    assert len(durations) >= 5
    assert max(durations) < 5, durations  # every one, with a margin for a loaded test machine
    assert sorted(durations)[len(durations) // 2] < 1, durations  # the promise: within 1 s
    # One record per worker and address so far (each reports its first refusal at once).
    assert len(node_refusals(server)) - before <= 2


def test_rejected_associations_end_at_once_and_take_no_places(srv: Server) -> None:
    """Strangers' A-ASSOCIATE-RQs followed by more PDUs - after the A-ASSOCIATE-RJ, or at once (a
    P-DATA-TF header announcing 1 MB, then a byte now and then): each connection is closed within a
    couple of seconds (they were kept for the ARTIM time, or for ever while a PDU was awaited, each
    counted as an association), and a registered peer never sees 'local limit exceeded' meanwhile."""
    srv.add_peer("CT1", "echo")
    strangers: list[socket.socket] = []
    closed: dict[int, float] = {}
    p_data_header = struct.pack(">BxL", 0x04, 1 << 20)
    try:
        start = time.monotonic()
        for round_ in range(6):  # in batches well under server.max_pending_per_address
            batch = [connect(srv.port) for _ in range(6)]
            strangers += batch
            for sock in batch:
                sock.sendall(associate_rq("NOBODY") + (p_data_header if round_ % 2 else b""))
            for sock in batch:  # A-ASSOCIATE-RJ, or A-ABORT for a PDU sent before the answer
                assert sock.recv(1) == (b"\x07" if round_ % 2 else b"\x03")
        assert echo_as(srv, "CT1", srv.port) < 5
        while len(closed) < len(strangers) and time.monotonic() - start < 10:
            for i, sock in enumerate(strangers):
                if i not in closed:
                    with suppress(OSError):
                        sock.sendall(A_RELEASE_RQ if i // 6 % 2 == 0 else b"\x00")
                    if closed_by_server(sock):
                        closed[i] = time.monotonic() - start
            time.sleep(0.1)
    finally:
        for sock in strangers:
            sock.close()
    assert len(closed) == len(strangers), sorted(closed)
    assert max(closed.values()) < 5, closed
    assert "Traceback" not in srv.stderr_text()


# HTTPS -------------------------------------------------------------------------------------------------
def _children(srv: Server) -> list[int]:
    path = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def test_https_slowloris_does_not_keep_a_real_client_out(
    srv: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """The HTTPS process runs with systemd's default 1024 file descriptors; a slowloris opens 1100 TLS
    connections that send half a request head.  A real client's request still succeeds at once, and
    the slowloris's connections are closed server.http_head_timeout after their accept."""
    _user(srv.data, "alice", "radiologist", capsys)
    token = _token(srv.data, "alice", capsys)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for pid in _children(srv):
        with suppress(ProcessLookupError):  # the purge child, which exits once it has purged
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, hard))
    ctx = ssl.create_default_context(cafile=str(srv.ca_file))
    held: list[ssl.SSLSocket] = []
    opened: list[float] = []
    failures = 0
    try:
        while len(held) + failures < 1100 and failures < 20:
            try:
                conn = ctx.wrap_socket(
                    socket.create_connection(("127.0.0.1", srv.https_port), timeout=2),
                    server_hostname="127.0.0.1",
                )
                conn.sendall(b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            except OSError:
                failures += 1
                continue
            held.append(conn)
            opened.append(time.monotonic())
        with _client(srv, token) as client:
            client.timeout = httpx.Timeout(10)
            assert client.get("/dicomweb/studies").status_code == 200
        last = opened[-1]
        closed = wait_closed(held, max(0.0, last + HEAD_TIMEOUT + 3 - time.monotonic()))
        assert len(closed) == len(held)
    finally:
        for conn in held:
            conn.close()
    assert failures < 20
    srv.stop()  # reports what the last minute's report left out
    log = srv.stderr_text()
    assert "no request head within server.http_head_timeout" in log
    assert "Traceback" not in log


# Settings ----------------------------------------------------------------------------------------------
def test_https_request_bodies_that_never_come_do_not_hold_connections(srv: Server) -> None:
    """A request that announces a large body and then trickles it (one byte a second) is closed after
    server.http_head_timeout; a request answered before its body was read (401 to an upload without a
    credential) closes its connection instead of keeping it alive on a body that never ends."""
    ctx = ssl.create_default_context(cafile=str(srv.ca_file))

    def opened(head: bytes) -> ssl.SSLSocket:
        conn = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", srv.https_port), timeout=2), server_hostname="127.0.0.1"
        )
        conn.sendall(head)
        return conn

    upload = opened(
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Content-Type: multipart/related; type="application/dicom"; boundary=x\r\n'
        b"Content-Length: 100000000\r\n\r\n"
    )
    login = opened(
        b"POST /api/session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n"
    )
    conns = [upload, login]
    try:
        upload.settimeout(10)
        assert upload.recv(4096).startswith(b"HTTP/1.1 401")
        start = time.monotonic()
        closed: dict[int, float] = {}
        while len(closed) < 2 and time.monotonic() - start < HEAD_TIMEOUT * 2 + 5:
            for i, conn in enumerate(conns):
                if i in closed:
                    continue
                with suppress(OSError):
                    conn.sendall(b"{")  # a byte a second: far below any real upload
                if closed_by_server(conn):
                    closed[i] = time.monotonic() - start
            time.sleep(1)
        assert sorted(closed) == [0, 1], closed
        assert closed[0] < HEAD_TIMEOUT, closed  # the 401 ended it
    finally:
        for conn in conns:
            conn.close()
    srv.stop()
    log = srv.stderr_text()
    assert "request body slower than the minimum rate" in log and "Traceback" not in log


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("associate_timeout", 0, "greater than 0"),
        ("max_pending_per_address", 0, "greater than or equal to 1"),
        ("max_pending", 2000, "less than or equal to 768"),
        ("http_head_timeout", -1, "greater than 0"),
        ("http_max_connections", 0, "greater than or equal to 1"),
    ],
)
def test_connection_limits_are_validated_at_start(data_dir: Path, key: str, value: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(data_dir, {"server": {key: value}})
    assert f"setting 'server.{key}' is invalid" in str(info.value) and message in str(info.value)


# Stopping ----------------------------------------------------------------------------------------------
def test_logging_extra_keys_are_not_logrecord_attributes() -> None:
    """``logging`` raises KeyError for an ``extra`` key that names a LogRecord attribute (``process``,
    ``name``, ``msg``...): every ``extra=`` in the package is a dict literal of other keys."""
    record = logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None)
    reserved = set(vars(record)) | {"message", "asctime", "taskName"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            for kw in node.keywords:
                if kw.arg != "extra":
                    continue
                where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
                if not isinstance(kw.value, ast.Dict):
                    found.append(f"{where}: not a dict literal")
                    continue
                for key in kw.value.keys:
                    if not isinstance(key, ast.Constant) or key.value in reserved:
                        found.append(f"{where}: {ast.unparse(key) if key else '**'}")
    assert found == []


def test_sigterm_during_long_requests_stops_every_process_in_time(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker that died is restarted (logged without error); then SIGTERM while a WADO-RS answer is
    stuck on a client that stops reading and an association sits idle: every process has exited within
    server.shutdown_grace (5 s here) + 5 s, and the log has no KeyError and no traceback."""
    grace = 5.0
    srv = start_server(
        data_dir,
        env={"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_SERVER__SHUTDOWN_GRACE": str(grace)},
    )
    with ExitStack() as stack:
        stack.callback(srv.stop)
        children = set(_children(srv))
        stack.callback(_kill_leftovers, children)  # the parent may have died and left them
        srv.add_peer("CT1", "echo,store")
        _user(srv.data, "alice", "radiologist", capsys)
        token = _token(srv.data, "alice", capsys)

        worker = wait_for_log(srv, r"DIMSE worker accepting.*pid=(\d+)")
        assert worker is not None
        os.kill(int(worker.group(1)), signal.SIGKILL)
        assert wait_for_log(srv, r"a SafePACS process exited; restarting") is not None
        assert wait_for_log(srv, r"DIMSE worker accepting(?!.*pid=" + worker.group(1) + r"\b)") is not None

        study = None
        with associate(srv.port, [build_context(CTImageStorage)], calling="CT1") as assoc:
            assert assoc.is_established
            for i in range(12):
                ds = make_ct(512, 512, instance_number=i + 1, study_uid=study, seed=i)
                study = str(ds.StudyInstanceUID)
                assert assoc.send_c_store(ds).Status == 0x0000
        reader = _stalled_wado(srv, token, str(study))
        stack.callback(reader.close)
        idle = stack.enter_context(associate(srv.port, [build_context(Verification)], calling="CT1"))
        assert idle.is_established
        children.update(_children(srv))
        # The DIMSE worker and the HTTPS process: no audit export process without collectors, and the
        # purge child forked at the start has purged and exited.
        deadline = time.monotonic() + 10
        while len(_children(srv)) != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_children(srv)) == 2

        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(grace + 10)
        parent = time.monotonic() - start
        while any(_alive(pid) for pid in children) and time.monotonic() - start < grace + 10:
            time.sleep(0.05)
        everyone = time.monotonic() - start
    assert srv.proc.returncode == 0
    assert parent <= grace + 5 and everyone <= grace + 5, (parent, everyone)
    log = srv.stderr_text()
    assert "KeyError" not in log and "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def _stalled_wado(srv: Server, token: str, study: str) -> ssl.SSLSocket:
    """A WADO-RS request for the whole study whose client reads the first bytes, then nothing."""
    ctx = ssl.create_default_context(cafile=str(srv.ca_file))
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", srv.https_port))
    conn = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    head = f"GET /dicomweb/studies/{study} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
    conn.sendall(head.encode() + b"\r\n")
    assert conn.recv(1024).startswith(b"HTTP/1.1 200")
    return conn


def _kill_leftovers(pids: set[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
