"""Low-level probing: the global rate limit, TLS contexts, and telling DICOM, HTTP and TLS apart.

The DICOM sniff is a minimal A-ASSOCIATE-RQ for Verification (PS3.8 9.3.2); an A-ASSOCIATE-AC is
followed by an A-RELEASE-RQ and the wait for its A-RELEASE-RP (PS3.8 9.3.6/9.3.7), so no association
is left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass

__all__ = [
    "DicomAnswer",
    "ProbeTimeout",
    "RateLimiter",
    "ServerHello",
    "connect",
    "observe_tls",
    "permissive_context",
    "sniff",
    "sniff_dicom",
    "sniff_http",
    "sniff_tls",
]

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1474.2"  # SafePACS scanner (under the SafePACS root)
IMPLEMENTATION_VERSION_NAME = "SAFEPACS_SCAN"


class RateLimiter:
    """A global limit on new connections and requests per second, shared by threads and coroutines.

    Each caller reserves the next free slot and waits for it; ``rate`` 0 means no limit.
    """

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def _reserve(self) -> float:
        if not self._interval:
            return 0.0
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
            return slot - now

    def wait(self) -> None:
        delay = self._reserve()
        if delay > 0:
            time.sleep(delay)

    async def wait_async(self) -> None:
        delay = self._reserve()
        if delay > 0:
            await asyncio.sleep(delay)


def permissive_context(
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A client context that verifies nothing: for observing what a server offers, never for trusting it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def connect(address: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _wrap(
    sock: socket.socket, ctx: ssl.SSLContext | None, server_name: str | None
) -> socket.socket | ssl.SSLSocket:
    if ctx is None:
        return sock
    return ctx.wrap_socket(sock, server_hostname=server_name)


class ProbeTimeout(Exception):
    """A probe step did not finish within its overall deadline (a peer that answers byte by byte).

    Not an :class:`OSError`, so that it is never mistaken for "not this protocol": it ends the probe of
    the endpoint, which is then reported with an error.
    """


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes, fewer when the peer closes; past ``deadline`` (monotonic) :class:`TimeoutError` when
    nothing came (a silent peer, as before) and :class:`ProbeTimeout` when part of it did.

    The socket's own timeout bounds each read only: a peer that sends one byte a second would keep a
    64 KB PDU coming for 18 hours, hence one deadline for the whole step.
    """
    buf = b""
    previous = sock.gettimeout()

    def late() -> Exception:
        if not buf:
            return TimeoutError("no answer by the deadline")
        return ProbeTimeout(f"{len(buf)} of {n} bytes by the deadline")

    try:
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise late()
            sock.settimeout(remaining if previous is None else min(previous, remaining))
            try:
                chunk = sock.recv(n - len(buf))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise late() from None
                raise
            if not chunk:
                break
            buf += chunk
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    return buf


def sniff_http(
    address: str, port: int, timeout: float, ctx: ssl.SSLContext | None = None, server_name: str | None = None
) -> bool:
    """Whether ``HEAD /`` is answered with an HTTP status line."""
    try:
        with connect(address, port, timeout) as raw, _wrap(raw, ctx, server_name) as sock:
            host = f"[{address}]" if ":" in address else address
            sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: safepacs-scan\r\n\r\n".encode())
            return _recv_exact(sock, 5, time.monotonic() + timeout) == b"HTTP/"
    except (OSError, ValueError):
        return False


_TLS_VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
_MAX_FLIGHT = 256 * 1024  # bytes of the server's first flight looked at, at most


@dataclass
class ServerHello:
    """What a TLS server showed during one handshake attempt.

    When the handshake completes, what the client saw; when it does not (a server that asks for a client
    certificate and then fails the handshake without one, TLS 1.2 and older), what the server sent in
    clear before: the version and cipher suite of its ServerHello, its certificate, its
    CertificateRequest, and the alert it ended with."""

    completed: bool = False
    version: str = ""  # as ``SSLSocket.version()`` names it: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3
    cipher: str = ""  # OpenSSL name
    certificate: bytes | None = None  # the server's own certificate, DER
    asked_client_cert: bool = False
    alert: int | None = None  # the description of an alert the server sent in clear (70: protocol_version)
    error: str = ""  # why our side ended the handshake

    @property
    def answered(self) -> bool:
        """The server speaks TLS and took the handshake as far as its ServerHello."""
        return self.completed or bool(self.version)


@functools.cache
def _cipher_names() -> dict[int, str]:
    ctx = permissive_context()
    with contextlib.suppress(ssl.SSLError, ValueError):
        ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return {int(c["id"]) & 0xFFFF: str(c["name"]) for c in ctx.get_ciphers()}


class _ServerFlight:
    """The server's records up to its ChangeCipherSpec (after it everything is encrypted), parsed."""

    def __init__(self, seen: ServerHello) -> None:
        self.seen = seen
        self.records = b""
        self.handshake = b""
        self.clear = True
        self.size = 0

    def feed(self, data: bytes) -> None:
        if not self.clear:
            return
        self.size += len(data)
        if self.size > _MAX_FLIGHT:
            self.clear = False
            return
        self.records += data
        while self.clear and len(self.records) >= 5:
            kind, major, length = self.records[0], self.records[1], struct.unpack(">H", self.records[3:5])[0]
            if kind not in (20, 21, 22) or major != 3:
                self.clear = False  # application data (encrypted) or not TLS at all
                break
            if len(self.records) < 5 + length:
                break
            fragment, self.records = self.records[5 : 5 + length], self.records[5 + length :]
            if kind == 20:
                self.clear = False
            elif kind == 21 and len(fragment) >= 2:
                self.seen.alert = fragment[1]
            elif kind == 22:
                self.handshake += fragment
                self._messages()

    def _messages(self) -> None:
        while len(self.handshake) >= 4:
            kind, length = self.handshake[0], int.from_bytes(self.handshake[1:4], "big")
            if len(self.handshake) < 4 + length:
                return
            body, self.handshake = self.handshake[4 : 4 + length], self.handshake[4 + length :]
            if kind == 2:
                self._server_hello(body)
            elif kind == 11 and len(body) >= 6 and not self.seen.certificate:
                size = int.from_bytes(body[3:6], "big")  # TLS 1.2 and older: no context, no extensions
                if 0 < size <= len(body) - 6:
                    self.seen.certificate = body[6 : 6 + size]
            elif kind == 13:
                self.seen.asked_client_cert = True

    def _server_hello(self, body: bytes) -> None:
        if len(body) < 38:
            return
        version = struct.unpack(">H", body[0:2])[0]
        pos = 35 + body[34]
        if len(body) < pos + 3:
            return
        code = struct.unpack(">H", body[pos : pos + 2])[0]
        pos += 3
        if len(body) >= pos + 2:  # extensions: supported_versions (43) names TLS 1.3
            end = min(len(body), pos + 2 + struct.unpack(">H", body[pos : pos + 2])[0])
            pos += 2
            while pos + 4 <= end:
                ext, size = struct.unpack(">HH", body[pos : pos + 4])
                if ext == 43 and size == 2:
                    version = struct.unpack(">H", body[pos + 4 : pos + 6])[0]
                pos += 4 + size
        self.seen.version = _TLS_VERSIONS.get(version, f"0x{version:04X}")
        self.seen.cipher = _cipher_names().get(code, f"0x{code:04X}")


def observe_tls(
    address: str, port: int, timeout: float, ctx: ssl.SSLContext, server_name: str | None = None
) -> ServerHello:
    """One TLS handshake with ``ctx`` through memory BIOs, so that what the server sent in clear is kept
    even when the handshake then fails (a server that requires a client certificate).

    :class:`OSError` when the connection fails or the handshake is not over by ``timeout``."""
    seen = ServerHello()
    flight = _ServerFlight(seen)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    deadline = time.monotonic() + timeout
    with connect(address, port, timeout) as sock:
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                with contextlib.suppress(OSError):
                    sock.sendall(outgoing.read())  # our alert, if any
                seen.error = str(getattr(exc, "reason", "") or type(exc).__name__)
                return seen
            else:
                with contextlib.suppress(OSError):
                    sock.sendall(outgoing.read())
                seen.completed = True
                cipher = tls.cipher()
                seen.version = tls.version() or seen.version
                seen.cipher = cipher[0] if cipher else seen.cipher
                seen.certificate = tls.getpeercert(binary_form=True) or seen.certificate
                return seen
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the TLS handshake did not finish by the deadline")
            sock.settimeout(remaining)
            chunk = sock.recv(16384)
            if chunk:
                flight.feed(chunk)
                incoming.write(chunk)
            else:
                incoming.write_eof()


def sniff_tls(address: str, port: int, timeout: float) -> bool:
    """Whether the peer speaks TLS: a handshake completes (any version, any certificate), or the server
    answers with its ServerHello before failing it (it requires a client certificate)."""
    ctx = permissive_context()
    with contextlib.suppress(ssl.SSLError, ValueError):
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    try:
        return observe_tls(address, port, timeout, ctx).answered
    except (OSError, ValueError):
        return False


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(payload)) + payload


def _associate_rq(calling: str, called: str) -> bytes:
    ctx = struct.pack(">BBBB", 1, 0, 0, 0)
    ctx += _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT_LE.encode())
    user = _item(0x51, struct.pack(">I", 16384))
    user += _item(0x52, IMPLEMENTATION_CLASS_UID.encode()) + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode())
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, ctx) + _item(0x50, user)
    return struct.pack(">BxI", 0x01, len(body)) + body


@dataclass(frozen=True)
class DicomAnswer:
    """What a peer answered to an A-ASSOCIATE-RQ: ``pdu`` 2 (AC), 3 (RJ with result/source/reason),
    7 (A-ABORT); 0 when it is not a DICOM answer."""

    pdu: int
    result: int = 0
    source: int = 0
    reason: int = 0
    called_echo: str = ""  # the called AE title the AC carries (some servers put their own there)
    implementation_class_uid: str = ""
    implementation_version_name: str = ""


def _parse_ac(body: bytes) -> DicomAnswer:
    """The called AE title and the implementation identification of an A-ASSOCIATE-AC (PS3.8 9.3.3)."""
    called = body[4:20].decode("ascii", "replace").strip()
    uid = name = ""
    pos = 68
    while pos + 4 <= len(body):
        item_type, length = body[pos], struct.unpack(">H", body[pos + 2 : pos + 4])[0]
        payload = body[pos + 4 : pos + 4 + length]
        if item_type == 0x50:
            sub = 0
            while sub + 4 <= len(payload):
                sub_type, sub_len = payload[sub], struct.unpack(">H", payload[sub + 2 : sub + 4])[0]
                value = payload[sub + 4 : sub + 4 + sub_len].decode("ascii", "replace").strip("\0 ")
                if sub_type == 0x52:
                    uid = value
                elif sub_type == 0x55:
                    name = value
                sub += 4 + sub_len
        pos += 4 + length
    return DicomAnswer(2, called_echo=called, implementation_class_uid=uid, implementation_version_name=name)


def _finish_dicom(sock: socket.socket, head: bytes, deadline: float) -> DicomAnswer:
    """The rest of an A-ASSOCIATE-AC/RJ or A-ABORT whose 6-byte header is ``head``; an AC is released.

    :class:`ProbeTimeout` when the PDU is not complete by ``deadline``."""
    if len(head) < 6 or head[0] not in (2, 3, 7) or head[1] != 0:
        return DicomAnswer(0)
    pdu_type, length = head[0], struct.unpack(">I", head[2:6])[0]
    if length > 65536:
        return DicomAnswer(0)
    try:
        body = _recv_exact(sock, length, deadline)
    except ProbeTimeout as exc:
        raise ProbeTimeout(f"DICOM answer (PDU type {pdu_type}): {exc}") from None
    if pdu_type == 3 and len(body) >= 4:
        return DicomAnswer(3, body[1], body[2], body[3])
    if pdu_type == 2:
        sock.sendall(struct.pack(">BxI", 0x05, 4) + bytes(4))  # A-RELEASE-RQ
        release_by = max(deadline, time.monotonic() + 1.0)
        with contextlib.suppress(OSError, ProbeTimeout):
            _recv_exact(sock, 10, release_by)  # A-RELEASE-RP: waited for, but its absence is no error
        return _parse_ac(body)
    return DicomAnswer(pdu_type)


def sniff_dicom(
    address: str,
    port: int,
    timeout: float,
    *,
    calling: str,
    called: str,
    ctx: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> DicomAnswer:
    """Send a Verification A-ASSOCIATE-RQ and classify the answer; an accepted association is released."""
    try:
        with connect(address, port, timeout) as raw, _wrap(raw, ctx, server_name) as sock:
            deadline = time.monotonic() + timeout
            sock.sendall(_associate_rq(calling, called))
            return _finish_dicom(sock, _recv_exact(sock, 6, deadline), deadline)
    except (OSError, ValueError):
        return DicomAnswer(0)


def sniff(
    address: str,
    port: int,
    timeout: float,
    *,
    calling: str,
    called: str,
    ctx: ssl.SSLContext | None = None,
    server_name: str | None = None,
    prefer: str = "http",
    stagger: float = 0.25,
) -> tuple[str, DicomAnswer | None]:
    """Which protocol answers: ``("http", None)``, ``("dicom", answer)`` or ``("", None)``.

    The ``prefer``-red probe (``HEAD /`` or a Verification A-ASSOCIATE-RQ) goes out first, the other
    ``stagger`` seconds later on a second connection unless the first was answered, and the first
    meaningful answer wins.  Both are needed: a DICOM peer may sit silently on an HTTP request until its
    ARTIM timer expires (pynetdicom does), an HTTP server on the binary RQ until its request timeout.
    """
    host = f"[{address}]" if ":" in address else address
    payloads = {
        "http": f"HEAD / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: safepacs-scan\r\n\r\n".encode(),
        "dicom": _associate_rq(calling, called),
    }
    order = [prefer, "dicom" if prefer == "http" else "http"]
    opened: dict[socket.socket, str] = {}
    buffers: dict[socket.socket, bytes] = {}
    waiting: set[socket.socket] = set()

    def launch(kind: str) -> None:
        try:
            raw = connect(address, port, timeout)
        except OSError:
            return
        try:
            sock = _wrap(raw, ctx, server_name)
            sock.sendall(payloads[kind])
        except (OSError, ValueError):
            raw.close()
            return
        opened[sock] = kind
        buffers[sock] = b""
        waiting.add(sock)

    try:
        launch(order.pop(0))
        second_at = time.monotonic() + stagger
        deadline = time.monotonic() + timeout
        while waiting or order:
            now = time.monotonic()
            if order and (now >= second_at or not waiting):
                launch(order.pop(0))
                deadline = max(deadline, time.monotonic() + timeout)
                continue
            remaining = (min(deadline, second_at) if order else deadline) - now
            if remaining <= 0:
                if order:
                    continue
                break
            ready: list[socket.socket] = [s for s in waiting if isinstance(s, ssl.SSLSocket) and s.pending()]
            if not ready:
                ready = select.select(list(waiting), [], [], remaining)[0]
            for sock in ready:
                try:
                    chunk = sock.recv(6 - len(buffers[sock]))
                except (OSError, ValueError):
                    chunk = b""
                if not chunk:
                    waiting.discard(sock)
                    continue
                buffers[sock] += chunk
                if len(buffers[sock]) < 5 or (opened[sock] == "dicom" and len(buffers[sock]) < 6):
                    continue
                waiting.discard(sock)
                if opened[sock] == "http" and buffers[sock].startswith(b"HTTP/"):
                    return "http", None
                if opened[sock] == "dicom":
                    try:
                        answer = _finish_dicom(sock, buffers[sock], time.monotonic() + timeout)
                    except (OSError, ValueError):
                        answer = DicomAnswer(0)
                    if answer.pdu:
                        return "dicom", answer
        return "", None
    finally:
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.close()
