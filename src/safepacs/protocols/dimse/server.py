"""The DIMSE listeners: a pre-forked pool of worker processes sharing the listening sockets.

pynetdicom spends its time in Python (a state machine, queues, 1 ms polls) and holds the GIL, so more
associations in one process do not add throughput; more processes do (bench/README.md, "Baseline
measurements"). The supervisor (``runtime/supervisor.py``) binds the port once, forks ``server.workers``
workers, each running :func:`run_worker` and accepting on the shared socket, and restarts a worker that
dies. Whichever worker the kernel wakes first would take a new
connection, so two modalities sending at once often landed on one worker (one GIL) while the other
idled; a worker that has more associations than another lets it take the connection (:class:`_Balance`).
Each worker serves the plain DICOM port and the DICOM TLS port (PS3.15 B.12, ``tls.py``) with the same
handlers and the same gate: the TLS handshake runs in the connection's own thread, so a slow or failed
one holds up nobody, and the association knows what the handshake proved.

A connection becomes an association only once its TLS handshake and its whole A-ASSOCIATE-RQ have
arrived within ``server.associate_timeout`` (``pending.py``); until the gate admits it, it is counted
against its address, never against the ``server.max_associations`` places of admitted associations,
which the gate keeps.  Connections dropped before that are counted and reported once per address per
minute (log and audit trail), not once each.

SIGTERM/SIGINT: the supervisor passes it on; workers stop accepting, let running associations finish for
``server.shutdown_grace`` seconds, then abort the rest; every process has exited within the grace plus
``_stop.STOP_MARGIN`` seconds.  Every acknowledgement was sent only after the object and its index
row were durable, so nothing acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt

from safepacs._memory import freeze_start_up
from safepacs._net import OTHER_ADDRESSES, RefusalTally
from safepacs._stop import CHILD_EXIT_MARGIN, StopRequest, exit_after
from safepacs.auth.oidc import oidc_principal
from safepacs.config import Settings
from safepacs.protocols.dimse import pending
from safepacs.protocols.dimse.admission import SecureAdmission
from safepacs.protocols.dimse.engine.acse import admission_decided
from safepacs.protocols.dimse.engine.fastpath import StoreDUL, StoreHandler, install_store_path
from safepacs.protocols.dimse.engine.raw import enable_raw_store, set_nodelay
from safepacs.protocols.dimse.engine.sendpath import SendDUL
from safepacs.protocols.dimse.engine.transport import (
    EngineAE,
    EngineRequestHandler,
    SharedSocketServer,
    socket_of,
)
from safepacs.protocols.dimse.gate import AssociationGate, install_gate
from safepacs.protocols.dimse.handlers import DimseHandlers
from safepacs.protocols.dimse.tls import DicomTls, certificate_refusal, tls_session_of
from safepacs.services.ingest import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from safepacs.types import Peer, Principal, TlsMode

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from safepacs.app import Archive

__all__ = ["DimseServer", "Loads", "run_worker", "shared_loads", "withdraw_load"]

log = logging.getLogger(__name__)


class _SafeAE(EngineAE):
    """The AE of a worker: associations it requests (C-MOVE sub-operations) send raw and without Nagle,
    and go over DICOM TLS, with SafePACS's client certificate, to a peer registered ``--tls required``
    - whose certificate must then prove it as at admission (``tls.certificate_refusal``)."""

    lookup_peer: Callable[[str], Peer | None] | None = None
    tls: DicomTls | None = None
    revoked: Callable[[str], bool] | None = None

    def associate(self, *args: Any, **kwargs: Any) -> Any:
        peer = self._tls_peer(kwargs.get("ae_title"))
        if peer is not None and self.tls is not None and kwargs.get("tls_args") is None:
            kwargs["tls_args"] = (self.tls.client_context(), None)
        assoc = super().associate(*args, **kwargs)
        sock = socket_of(assoc)
        if peer is not None and assoc.is_established:
            session = tls_session_of(sock)
            refusal = (
                certificate_refusal(peer, session, self.tls.ca, self.revoked or _never_revoked)
                if session is not None and self.tls is not None
                else "the connection is not DICOM TLS"
            )
            if refusal is not None:
                log.warning(
                    "C-MOVE destination refused: %s", refusal, extra={"move_destination": peer.ae_title}
                )
                assoc.abort()
                return assoc
        enable_raw_store(assoc)
        set_nodelay(sock)
        return assoc

    def _tls_peer(self, title: Any) -> Peer | None:
        """The registered peer ``title`` names when it must be reached over DICOM TLS."""
        if self.lookup_peer is None or not title:
            return None
        name = (title.decode("ascii", "replace") if isinstance(title, bytes) else str(title)).strip()
        peer = self.lookup_peer(name)
        return peer if peer is not None and peer.tls is TlsMode.REQUIRED else None


def _never_revoked(_sha256: str) -> bool:
    return False


# How long a busier worker leaves a waiting connection to the others before taking it itself (one of
# them may be stopping, or too busy to accept promptly).
_DEFER_SECONDS = 0.1
_DEFER_STEP = 0.002
_UNAVAILABLE = 1 << 30  # the load a worker that is not accepting shows the others


class _Balance:
    """Spreads associations over the worker processes through a shared array of their loads.

    Each worker publishes its load (associations running, and connections accepted but not yet
    associations) in its slot: when it accepts, and at every turn of its accept loop (at least every
    0.1 s).  When a connection waits, a worker whose load exceeds another's leaves it for up to
    ``_DEFER_SECONDS`` to the less loaded one, which the kernel wakes too; if nobody took it by then,
    it accepts it itself.  Nothing here refuses a connection, it only chooses who accepts it.
    """

    def __init__(self, loads: Any, slot: int, ae: AE) -> None:
        self._loads = loads
        self._slot = slot
        self._ae = ae
        self._pending = 0
        self._lock = threading.Lock()
        self._withdrawn = False

    def publish(self) -> int:
        with self._lock:
            load = self._pending + len(self._ae.active_associations)
            self._loads[self._slot] = _UNAVAILABLE if self._withdrawn else load
        return load

    def withdraw(self) -> None:
        """This worker accepts no more connections: the others stop leaving any to it."""
        with self._lock:
            self._withdrawn = True
            self._loads[self._slot] = _UNAVAILABLE

    def my_turn(self, listener: socket.socket) -> bool:
        """Whether this worker should accept the connection waiting on ``listener``; False when a less
        loaded worker took it meanwhile."""
        deadline = time.monotonic() + _DEFER_SECONDS
        poller: select.poll | None = None
        while self.publish() > self._least_other() and time.monotonic() < deadline:
            time.sleep(_DEFER_STEP)
            try:
                if poller is None:
                    poller = select.poll()
                    poller.register(listener, select.POLLIN)
                if not poller.poll(0):
                    return False
            except (OSError, ValueError):
                return True  # cannot tell: never leave a connection stranded
        return True

    def _least_other(self) -> int:
        others = [self._loads[i] for i in range(len(self._loads)) if i != self._slot]
        return min(others, default=_UNAVAILABLE)

    def accepted(self) -> None:
        with self._lock:
            self._pending += 1
        self.publish()

    def settled(self) -> None:
        """An accepted connection became an association (or was closed): counted as such from now.
        Published at once: for a moment it was counted twice (pending, and its association's thread)."""
        with self._lock:
            self._pending -= 1
        self.publish()


@dataclass(frozen=True)
class _Admission:
    """What a worker's listeners share before admission: the connections not admitted yet, and the
    deadline for a connection's TLS handshake and A-ASSOCIATE-RQ."""

    pending: pending.PendingConnections
    timeout: float


class _RequestHandler(EngineRequestHandler):
    """One accepted connection, in its own thread: admission first (``pending.py``), then pynetdicom."""

    _preface: bytes | None = None  # the A-ASSOCIATE-RQ read before admission, handed to pynetdicom

    def handle(self) -> None:
        server = cast(_Server, self.server)
        try:
            self._handle(server)
        except Exception:
            log.exception("a DICOM connection failed before its association started")
            with contextlib.suppress(OSError):
                cast(socket.socket, self.request).close()
        finally:
            if server.balance is not None:
                server.balance.settled()

    def _handle(self, server: _Server) -> None:
        raw = cast(socket.socket, self.request)
        address = str(self.client_address[0]) if isinstance(self.client_address, tuple) else ""
        ticket = server.pending.enter(address, raw)
        if ticket is None:
            server.refused(address, pending.REFUSED)
            raw.close()
            return
        try:
            preface = self._receive(server, ticket, address)
            if preface is None:
                return
            if not server.pending.handed_over(ticket):  # closed to make room meanwhile
                self._drop(server, ticket, address, cast(socket.socket, self.request), "")
                return
            self._preface = preface
            assoc = self.start_association()
            # Counted against this address until the gate has decided: an admitted association holds
            # a place among the admitted ones instead, and a rejected one ends at once and holds none
            # (a stranger's rejected connections, still closing, must not crowd out the next ones).
            decided = admission_decided(assoc)
            while not decided.wait(0.05) and assoc.is_alive():
                pass
        finally:
            server.pending.leave(ticket)

    def _receive(self, server: _Server, ticket: pending.Ticket, address: str) -> bytes | None:
        """The connection's A-ASSOCIATE-RQ, after its TLS handshake on the TLS port, all by the one
        deadline; None when the connection was dropped instead (counted, reported, closed)."""
        deadline = time.monotonic() + server.associate_timeout
        sock = cast(socket.socket, self.request)
        sock.setblocking(False)
        try:
            if server.tls is not None:
                conn = server.tls.server_context().wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
                self.request = ticket.sock = sock = conn
                pending.tls_handshake(conn, deadline)
            pdu = pending.receive_associate_rq(sock, deadline)
        except pending.Dropped as exc:
            if exc.abort is not None and ticket.evicted is None:
                pending.send_abort(sock, exc.abort)
            self._drop(server, ticket, address, sock, exc.reason)
            return None
        except (ssl.SSLError, OSError) as exc:
            reason = f"TLS handshake failed ({getattr(exc, 'reason', None) or type(exc).__name__})"
            self._drop(server, ticket, address, sock, reason)
            return None
        sock.setblocking(True)
        return pdu

    @staticmethod
    def _drop(server: _Server, ticket: pending.Ticket, address: str, sock: socket.socket, why: str) -> None:
        server.pending.leave(ticket)  # before the socket closes (PendingConnections._evict)
        sock.close()
        server.refused(address, ticket.evicted or why)

    def prepare(self, assoc: Association) -> None:
        server = cast(_Server, self.server)
        install_gate(assoc, server.gate)
        install_store_path(
            assoc,
            server.store,
            server.max_object_bytes,
            preface=self._preface,
            pdu_timeout=server.associate_timeout,
            dul_type=SendDUL if getattr(server.ae, "send_path", False) else StoreDUL,
        )
        enable_raw_store(assoc)


class _Server(SharedSocketServer):
    """An association server of a worker on a shared socket: admission and balance of its connections."""

    def __init__(
        self,
        ae: AE,
        listener: socket.socket,
        ae_title: str,
        handlers: list[Any],
        gate: AssociationGate,
        store: StoreHandler,
        max_object_bytes: int,
        admission: _Admission,
        refusals: RefusalTally,
        tls: DicomTls | None = None,
        balance: _Balance | None = None,
    ) -> None:
        self.balance = balance  # spreads associations over the workers (None: a single process)
        self.gate = gate
        self.store = store
        self.max_object_bytes = max_object_bytes
        self.tls = tls  # DICOM TLS on this listener
        self.pending = admission.pending
        self.refusals = refusals  # this listener's connections dropped before admission
        self.associate_timeout = admission.timeout
        super().__init__(ae, listener, ae_title, handlers, _RequestHandler)

    def may_accept(self, listener: socket.socket) -> bool:
        # False when a less loaded worker took it
        return self.balance is None or self.balance.my_turn(listener)

    def accepted(self) -> None:
        if self.balance is not None:
            self.balance.accepted()

    def between_requests(self) -> None:
        """The worker's load is published for the others (:class:`_Balance`), and the connections dropped
        before admission are reported when their interval is over (``RefusalTally``)."""
        if self.balance is not None:
            self.balance.publish()
        self.refusals.flush_due()

    def refused(self, address: str, reason: str) -> None:
        """A connection closed before admission: counted now, reported per address per interval."""
        self.refusals.add(address, reason)


class DimseServer:
    """One worker: an AE, its handlers and an association server on each shared socket (plain DICOM,
    and DICOM TLS when ``tls_listener`` is given)."""

    def __init__(
        self,
        archive: Archive,
        listener: socket.socket,
        tls_listener: socket.socket | None = None,
        *,
        loads: Any = None,
        slot: int = 0,
    ) -> None:
        """``loads``: the workers' shared load array (``serve``), ``slot`` this worker's place in it."""
        s = archive.settings.server
        self.archive = archive
        self.ae = _SafeAE(ae_title=s.ae_title)
        self.ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # The gate counts admitted associations against server.max_associations; pynetdicom's own
        # count includes connections still being negotiated or rejected (each holds a pending place),
        # so its limit is set where they can never make it refuse an admitted peer.
        self.ae.maximum_associations = s.max_associations + s.max_pending
        self.ae.maximum_pdu_size = s.max_pdu_size
        self.ae.network_timeout = s.network_timeout
        self.ae.acse_timeout = s.acse_timeout
        self.ae.dimse_timeout = s.dimse_timeout
        self.ae.require_called_aet = False  # the gate checks it, with the right rejection reason
        gate = archive.gate  # the peer table, users, pinned and revoked certificates
        self.tls = DicomTls(archive.settings.keys_dir, gate.pinned_certificates) if tls_listener else None
        if self.tls is not None:
            self.tls.server_context()  # unreadable keys fail the worker now, not every connection
        oidc = archive.oidc

        def verify_jwt(token: str, address: str | None) -> Principal:
            person = oidc.verify(token)
            return oidc_principal(person, gate.user(person.name), address=address)

        secure = SecureAdmission(
            tls=self.tls,
            revoked=gate.certificate_revoked,
            authenticate=archive.logins.authenticate,
            verify_jwt=verify_jwt if oidc else None,
        )
        self.ae.lookup_peer = gate.peer  # C-MOVE destinations registered --tls required get TLS
        self.ae.tls = self.tls
        self.ae.revoked = gate.certificate_revoked
        self.ae.send_path = s.dimse_send_path
        self.gate = AssociationGate(
            s.ae_title,
            gate.peer,
            gate.user,
            secure=secure,
            audit=archive.auditor,
            max_associations=s.max_associations,
        )
        self.admission = _Admission(
            pending.PendingConnections(s.max_pending_per_address, s.max_pending), s.associate_timeout
        )
        h = DimseHandlers(archive.ingest, archive.query, archive.retrieve, gate)
        handlers = [
            (evt.EVT_C_ECHO, h.on_echo),
            (evt.EVT_C_STORE, h.on_store),
            (evt.EVT_C_FIND, h.on_find),
            (evt.EVT_C_GET, h.on_get),
            (evt.EVT_C_MOVE, h.on_move),
            (evt.EVT_CONN_CLOSE, h.on_close),
        ]
        max_bytes = archive.settings.storage.max_object_bytes
        self.balance = _Balance(loads, slot, self.ae) if loads is not None else None
        common = (s.ae_title, handlers, self.gate, h.store, max_bytes, self.admission)
        plain = RefusalTally(functools.partial(self._report_refusals, "DICOM"))
        self.servers = [_Server(self.ae, listener, *common, plain, balance=self.balance)]
        if tls_listener is not None:
            tally = RefusalTally(functools.partial(self._report_refusals, "DICOM TLS"))
            self.servers.append(
                _Server(self.ae, tls_listener, *common, tally, tls=self.tls, balance=self.balance)
            )
        self.server = self.servers[0]
        self.ae.serve_on(self.servers)
        self._threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            for server in self.servers
        ]

    def _report_refusals(self, port: str, address: str, counts: dict[str, int]) -> None:
        """Log and record (110113, failure) the connections from ``address`` to the ``port`` listener
        dropped before admission since its last report: one line and one audit record per address
        and interval, however many connections."""
        total = sum(counts.values())
        summary = "; ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
        log.warning(
            "connections dropped before association",
            extra={
                "port": port,
                "peer_address": address,
                "connections": total,
                "reasons": summary,
                "dropped_total": sum(sum(s.refusals.totals.values()) for s in self.servers),
            },
        )
        why = f"{total} connection(s) closed before association: {summary}"
        where = "" if address == OTHER_ADDRESSES else address
        self.gate.record(None, "", where, None, why, transport=f"{port} port, before admission")

    def start(self) -> None:
        if self.balance is not None:
            self.balance.publish()
        for thread in self._threads:
            thread.start()

    def stop(self, grace: float) -> None:
        """Stop accepting; give running associations ``grace`` seconds, then abort them."""
        if self.balance is not None:
            self.balance.withdraw()
        for server in self.servers:
            server.shutdown()
        self.admission.pending.close_all()
        deadline = time.monotonic() + grace
        while any(server.active_associations for server in self.servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        for server in self.servers:
            for assoc in server.active_associations:
                assoc.abort()
            server.refusals.flush_due(force=True)


OpenArchive = Callable[[Settings], "Archive"]


#: Each worker's load, shared by the workers (:class:`_Balance`).
Loads = ctypes.Array[ctypes.c_int]


def shared_loads(workers: int) -> Loads:
    """The workers' shared load array, for processes forked after this call; every slot shows an
    unavailable worker until its worker accepts."""
    return multiprocessing.get_context("fork").RawArray(ctypes.c_int, [_UNAVAILABLE] * workers)


def withdraw_load(loads: Loads, slot: int) -> None:
    """The worker of ``slot`` is gone: the others leave it nothing until its successor publishes."""
    loads[slot] = _UNAVAILABLE


def run_worker(
    settings: Settings,
    listener: socket.socket,
    tls_listener: socket.socket | None,
    open_archive: OpenArchive,
    setup: Callable[[], None],
    loads: Loads,
    slot: int,
) -> None:
    """The body of one DIMSE worker process, forked by the supervisor (``runtime/supervisor.py``) with
    the stop signals blocked: serve ``listener`` (and ``tls_listener``) until SIGTERM/SIGINT, then
    stop within ``server.shutdown_grace`` plus ``CHILD_EXIT_MARGIN`` seconds."""
    stop = StopRequest()
    stop.install()
    setup()
    # sys.setswitchinterval stays at Python's 5 ms: 0.5 ms measured no better, and worse for 0.5 MB
    # instances over 4 associations (bench/README.md, "Baseline measurements").
    archive = open_archive(settings)
    server = DimseServer(archive, listener, tls_listener, loads=loads, slot=slot)
    freeze_start_up()
    server.start()
    log.info("DIMSE worker accepting", extra={"worker": slot, "pid": os.getpid()})
    stop.wait()
    exit_after(settings.server.shutdown_grace + CHILD_EXIT_MARGIN, "DIMSE worker")
    server.stop(settings.server.shutdown_grace)
    archive.close()
