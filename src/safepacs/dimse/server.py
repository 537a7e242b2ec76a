"""The DIMSE listener: a pre-forked pool of worker processes sharing one listening socket.

pynetdicom spends its time in Python (a state machine, queues, 1 ms polls) and holds the GIL,
so more associations in one process do not add throughput; more processes do
(PERFORMANCE-NOTES.md).  The parent binds the port once, forks ``server.workers`` workers, each
accepting on the shared socket, and restarts a worker that dies.  SIGTERM/SIGINT: workers stop
accepting, let running associations finish for ``server.shutdown_grace`` seconds, then abort the
rest.  Every acknowledgement was sent only after the object and its index row were durable, so
nothing acknowledged is lost.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from safepacs._net import bind_listener
from safepacs.config import Settings
from safepacs.dimse._raw import enable_raw_store, set_nodelay
from safepacs.dimse.fastpath import StoreHandler, install_store_path
from safepacs.dimse.gate import AssociationGate, install_gate
from safepacs.dimse.handlers import DimseHandlers
from safepacs.services.ingest import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["DimseServer", "serve"]

log = logging.getLogger(__name__)


class _SafeAE(AE):
    """The AE of a worker: associations it requests (C-MOVE sub-operations) send raw and without Nagle."""

    def associate(self, *args: Any, **kwargs: Any) -> Any:
        assoc = super().associate(*args, **kwargs)
        enable_raw_store(assoc)
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        set_nodelay(sock)
        return assoc


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        assoc = super()._create_association()
        server = cast(_Server, self.server)
        install_gate(assoc, server.gate)
        install_store_path(assoc, server.store, server.max_object_bytes)
        enable_raw_store(assoc)
        return assoc


class _Server(ThreadedAssociationServer):
    """pynetdicom's server on a socket bound and listening already (inherited from the parent)."""

    daemon_threads = True

    def __init__(
        self,
        ae: AE,
        listener: socket.socket,
        ae_title: str,
        handlers: list[Any],
        gate: AssociationGate,
        store: StoreHandler,
        max_object_bytes: int,
    ) -> None:
        self._listener = listener
        self.gate = gate
        self.store = store
        self.max_object_bytes = max_object_bytes
        super().__init__(
            ae,
            listener.getsockname()[:2],
            ae_title,
            [],
            evt_handlers=handlers,
            request_handler=_RequestHandler,
        )

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listener
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:  # listening already
        return None

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        # BlockingIOError when another worker won the race: socketserver skips it.
        client, address = self.socket.accept()
        client.setblocking(True)
        set_nodelay(client)
        return client, address

    def server_close(self) -> None:  # the parent owns the listening socket
        return None


class DimseServer:
    """One worker: an AE, its handlers and the association server on the shared socket."""

    def __init__(self, archive: Archive, listener: socket.socket) -> None:
        s = archive.settings.server
        self.archive = archive
        self.ae = _SafeAE(ae_title=s.ae_title)
        self.ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self.ae.maximum_associations = s.max_associations
        self.ae.maximum_pdu_size = s.max_pdu_size
        self.ae.network_timeout = s.network_timeout
        self.ae.acse_timeout = s.acse_timeout
        self.ae.dimse_timeout = s.dimse_timeout
        self.ae.require_called_aet = False  # the gate checks it, with the right rejection reason
        self.gate = AssociationGate(s.ae_title, archive.index.get_peer, archive.index.get_user)
        h = DimseHandlers(archive.ingest, archive.query, archive.retrieve, archive.index.get_peer)
        handlers = [
            (evt.EVT_C_ECHO, h.on_echo),
            (evt.EVT_C_STORE, h.on_store),
            (evt.EVT_C_FIND, h.on_find),
            (evt.EVT_C_GET, h.on_get),
            (evt.EVT_C_MOVE, h.on_move),
        ]
        self.server = _Server(
            self.ae,
            listener,
            s.ae_title,
            handlers,
            self.gate,
            h.store,
            archive.settings.storage.max_object_bytes,
        )
        self.ae._servers.append(self.server)
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float) -> None:
        """Stop accepting; give running associations ``grace`` seconds, then abort them."""
        self.server.shutdown()
        deadline = time.monotonic() + grace
        while self.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.server.active_associations:
            assoc.abort()


OpenArchive = Callable[[Settings], "Archive"]


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class StopRequest:
    """Set by SIGTERM/SIGINT.  The handler only flips a flag: an ``Event.set`` in a signal handler
    can deadlock when a second signal arrives while the first handler holds the event's lock."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        """Handle the stop signals in this process, then let through any that arrived meanwhile
        (children start with them blocked, so one sent during start-up is not lost)."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _handle(self, *_: Any) -> None:
        self.requested = True

    def wait(self, timeout: float = float("inf")) -> bool:
        """Sleep up to ``timeout`` seconds (default: until asked) in short steps; whether a stop was
        requested."""
        deadline = time.monotonic() + timeout
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.requested


def _worker(
    settings: Settings, listener: socket.socket, open_archive: OpenArchive, setup: Callable[[], None]
) -> None:
    stop = StopRequest()
    stop.install()
    setup()
    # sys.setswitchinterval stays at Python's 5 ms: 0.5 ms (PERFORMANCE-NOTES) measured no better here,
    # and 25% worse for 0.5 MB instances over 4 associations (bench/README.md).
    archive = open_archive(settings)
    server = DimseServer(archive, listener)
    server.start()
    stop.wait()
    server.stop(settings.server.shutdown_grace)
    archive.close()


def serve(
    settings: Settings,
    open_archive: OpenArchive,
    *,
    setup: Callable[[], None] = lambda: None,
    ready: Callable[[str, int], None] | None = None,
    companions: Sequence[tuple[str, Callable[[], None]]] = (),
) -> int:
    """Run the DIMSE listener until SIGTERM/SIGINT; returns the exit status.

    ``open_archive`` builds a worker's backends (after the fork: no engine or file handle is shared);
    ``setup`` configures logging in each worker.  ``companions`` are (name, function) pairs run each in
    a process of its own beside the workers (the HTTPS listener), restarted and stopped with them.
    """
    s = settings.server
    listener = bind_listener(s.bind, s.dicom_port)
    host, port = listener.getsockname()[:2]
    workers = s.workers or (os.cpu_count() or 1)
    stop = StopRequest()
    stop.install()
    ctx = multiprocessing.get_context("fork")

    def dimse_worker() -> None:
        _worker(settings, listener, open_archive, setup)

    specs = [("safepacs-dimse", dimse_worker)] * workers + list(companions)

    def spawn(i: int) -> multiprocessing.process.BaseProcess:
        name, target = specs[i]
        proc = ctx.Process(target=target, name=name, daemon=False)
        # The child starts with the stop signals blocked until it has its own handlers (StopRequest).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        started[proc.pid] = time.monotonic()
        return proc

    started: dict[int | None, float] = {}
    quick_deaths = 0

    procs = [spawn(i) for i in range(len(specs))]
    log.info(
        "DIMSE listening", extra={"address": host, "port": port, "ae_title": s.ae_title, "workers": workers}
    )
    if ready is not None:
        ready(host, port)
    while not stop.wait(0.5):
        for i, proc in enumerate(procs):
            if not proc.is_alive():
                if time.monotonic() - started.get(proc.pid, 0.0) < 5:
                    quick_deaths += 1
                if quick_deaths > 3:
                    log.error("SafePACS processes keep failing at start; stopping (see the errors above)")
                    stop.requested = True
                    break
                log.error(
                    "a SafePACS process exited; restarting",
                    extra={"process": specs[i][0], "exitcode": proc.exitcode},
                )
                procs[i] = spawn(i)
    for proc in procs:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + s.shutdown_grace + 5
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("a SafePACS process did not stop in time; killed", extra={"process": proc.name})
            proc.kill()
            proc.join()
    listener.close()
    log.info("DIMSE stopped")
    return 1 if quick_deaths > 3 else 0
