"""Connections before admission: what a DICOM connection must do before it becomes an association.

PS3.8 9.2 (Table 9-10): an acceptor that has accepted a transport connection starts the ARTIM timer
and waits for an A-ASSOCIATE-RQ (Sta2); any other PDU is answered with an A-ABORT; when ARTIM expires
the connection is closed.  pynetdicom creates an association - a thread, counted against the AE's
association limit - for every accepted connection and leaves it there for the whole ARTIM time, even
after the peer has closed.  So a stranger's bare ``connect()`` took an association slot for 30 s.

Here each accepted connection first waits, in its own thread and against one deadline
(``server.associate_timeout``, which also covers the DICOM TLS handshake), until its whole
A-ASSOCIATE-RQ PDU has been read; only then is an association made, and the PDU handed to it
(``engine.fastpath.StoreDUL``) as if pynetdicom had read it.  A connection that closes, sends anything
else first, announces an A-ASSOCIATE-RQ longer than :data:`~.engine.pdu.MAX_ASSOCIATE_RQ_BYTES`, sends
one that cannot be decoded or misses the deadline is closed at once (an A-ABORT first for the protocol
errors, PS3.8 9.3.8).

:class:`PendingConnections` counts the connections of a worker that have not been admitted yet (from
the accept until the gate admits their association, or they end), per source address and in all.  A
connection beyond ``server.max_pending_per_address`` from its address, or beyond ``server.max_pending``,
closes the oldest connection still waiting for its A-ASSOCIATE-RQ (from that address, else from the
address with the most): a real peer sends its request within milliseconds of connecting, so it is
never the oldest waiting, even behind the same address as a flood.  When nothing can be closed (all
are being negotiated) the new connection is refused.  Admitted associations are counted apart, by the
gate (``server.max_associations``), so strangers never take their slots.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

from safepacs.protocols.dimse.engine.pdu import MAX_ASSOCIATE_RQ_BYTES, abort_pdu, check_associate_rq

__all__ = [
    "Dropped",
    "PendingConnections",
    "Ticket",
    "receive_associate_rq",
    "send_abort",
    "tls_handshake",
]

_HEADER = struct.Struct(">BxL")
_A_ASSOCIATE_RQ = 0x01
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

# PS3.8 9.3.8 A-ABORT reason/diagnostic values (source: DICOM UL service-provider)
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

# Why a connection was closed before admission (counted, logged and audited per address, no peer data).
CLOSED_EARLY = "closed before sending an A-ASSOCIATE-RQ"
TIMED_OUT = "no A-ASSOCIATE-RQ within server.associate_timeout"
TLS_TIMED_OUT = "TLS handshake not completed within server.associate_timeout"
NOT_ASSOCIATE_RQ = "the first PDU was not an A-ASSOCIATE-RQ"
TOO_LONG = f"the A-ASSOCIATE-RQ was longer than {MAX_ASSOCIATE_RQ_BYTES} bytes"
MALFORMED = "the A-ASSOCIATE-RQ could not be decoded"
EVICTED = "closed to make room: more connections awaiting admission than server.max_pending_per_address"
EVICTED_TOTAL = "closed to make room: more connections awaiting admission than server.max_pending"
REFUSED = "refused: server.max_pending connections are being admitted already"


class Dropped(Exception):
    """The connection is closed before admission; ``reason`` says why, ``abort`` is the A-ABORT
    reason to send first (None: just close)."""

    def __init__(self, reason: str, abort: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort = abort


@dataclass(eq=False)
class Ticket:
    """One connection awaiting admission."""

    address: str
    sock: socket.socket  # the connection's socket object (its TLS socket once wrapped)
    since: float = field(default_factory=time.monotonic)
    waiting: bool = True  # its A-ASSOCIATE-RQ is not read yet: it may be closed to make room
    evicted: str | None = None  # why it was closed to make room


class PendingConnections:
    """The connections of one worker process that are not admitted yet (see the module docstring)."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._lock = threading.Lock()
        self._by_address: dict[str, list[Ticket]] = {}
        self._count = 0
        self._closed = False

    def enter(self, address: str, sock: socket.socket) -> Ticket | None:
        """Count a new connection, closing the oldest waiting one to make room when a cap is reached;
        None when there is no room (the caller closes the connection)."""
        with self._lock:
            if self._closed:
                return None
            mine = self._by_address.get(address, [])
            if len(mine) >= self.per_address and not self._evict(mine, EVICTED):
                return None
            if self._count >= self.total and not self._evict(self._busiest(), EVICTED_TOTAL):
                return None
            ticket = Ticket(address, sock)
            self._by_address.setdefault(address, []).append(ticket)
            self._count += 1
            return ticket

    def handed_over(self, ticket: Ticket) -> bool:
        """Its A-ASSOCIATE-RQ was read: it is negotiated now and no longer closed to make room.  False
        when it was closed to make room meanwhile."""
        with self._lock:
            ticket.waiting = False
            return ticket.evicted is None

    def leave(self, ticket: Ticket) -> None:
        """The connection was admitted or has ended.  Call before closing its socket."""
        with self._lock:
            mine = self._by_address.get(ticket.address)
            if mine is not None and ticket in mine:
                mine.remove(ticket)
                self._count -= 1
                if not mine:
                    del self._by_address[ticket.address]

    def close_all(self) -> None:
        """Stopping: close every connection still waiting for its A-ASSOCIATE-RQ; admit no more."""
        with self._lock:
            self._closed = True
            for mine in list(self._by_address.values()):
                while self._evict(mine, "the server is stopping"):
                    pass

    def count(self, address: str | None = None) -> int:
        with self._lock:
            if address is None:
                return self._count
            return len(self._by_address.get(address, []))

    def _busiest(self) -> list[Ticket]:
        """The tickets of the address with the most waiting connections."""
        lists = [mine for mine in self._by_address.values() if any(t.waiting for t in mine)]
        return max(lists, key=lambda mine: sum(t.waiting for t in mine), default=[])

    def _evict(self, tickets: list[Ticket], why: str) -> bool:
        """Close the oldest waiting connection in ``tickets`` (in arrival order); False when none waits.
        Its thread notices at once (see :func:`_shut_down`) and closes it."""
        for ticket in tickets:
            if ticket.waiting:
                tickets.remove(ticket)
                self._count -= 1
                if not tickets:
                    self._by_address.pop(ticket.address, None)
                ticket.waiting = False
                ticket.evicted = why
                _shut_down(ticket.sock)
                return True
        return False


def _shut_down(sock: socket.socket) -> None:
    """Shut a connection down from another thread, which wakes the thread polling it (it reads EOF).

    Through the socket object, never a bare descriptor: a socket its thread has closed meanwhile has
    none (EBADF, ignored), so no later connection that reuses the number is touched.  The plain
    socket's ``shutdown`` also for a TLS socket: ``SSLSocket.shutdown`` would drop the TLS state under
    the thread that is using it.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _wait(sock: socket.socket, events: int, deadline: float, late: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Dropped(late)
    poller = select.poll()
    poller.register(sock, events)
    poller.poll(remaining * 1000)


def tls_handshake(conn: ssl.SSLSocket, deadline: float) -> None:
    """Complete the server side of the TLS handshake of the non-blocking ``conn`` by ``deadline``.
    Raises :class:`Dropped` when it takes too long, ``ssl.SSLError``/``OSError`` when it fails."""
    while True:
        try:
            conn.do_handshake()
            return
        except ssl.SSLWantReadError:
            _wait(conn, select.POLLIN, deadline, TLS_TIMED_OUT)
        except ssl.SSLWantWriteError:
            _wait(conn, select.POLLOUT, deadline, TLS_TIMED_OUT)


def _read(sock: socket.socket, size: int, deadline: float) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        try:
            n = sock.recv_into(view[got:])
        except (BlockingIOError, ssl.SSLWantReadError):
            _wait(sock, select.POLLIN, deadline, TIMED_OUT)
            continue
        except ssl.SSLWantWriteError:
            _wait(sock, select.POLLOUT, deadline, TIMED_OUT)
            continue
        except OSError as exc:  # reset, or a TLS error after the handshake
            raise Dropped(CLOSED_EARLY) from exc
        if n == 0:
            raise Dropped(CLOSED_EARLY)
        got += n
    return buf


def receive_associate_rq(sock: socket.socket, deadline: float) -> bytes:
    """Read one whole A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) from the non-blocking ``sock`` by ``deadline``,
    reading no byte past it; :class:`Dropped` otherwise."""
    header = _read(sock, _HEADER.size, deadline)
    pdu_type, length = _HEADER.unpack(header)
    if pdu_type != _A_ASSOCIATE_RQ:
        known = pdu_type in _KNOWN_PDU_TYPES
        raise Dropped(NOT_ASSOCIATE_RQ, ABORT_UNEXPECTED_PDU if known else ABORT_UNRECOGNIZED_PDU)
    if length > MAX_ASSOCIATE_RQ_BYTES:
        raise Dropped(TOO_LONG, ABORT_INVALID_PARAMETER)
    pdu = bytes(header + _read(sock, length, deadline))
    try:  # as pynetdicom will (AE-6); one it could not read would leave its association waiting
        check_associate_rq(pdu)
    except Exception as exc:  # whatever the decoder trips on, the PDU is malformed
        raise Dropped(MALFORMED, ABORT_INVALID_PARAMETER) from exc
    return pdu


def send_abort(sock: socket.socket, reason: int) -> None:
    """Send an A-ABORT (source: DICOM UL service-provider, PS3.8 9.3.8) if the socket takes it within
    a second; the caller closes the connection either way."""
    try:
        sock.settimeout(1.0)
        sock.sendall(abort_pdu(reason))
    except (OSError, ValueError):
        pass
