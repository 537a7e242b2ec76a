"""The HTTPS listener: one process running uvicorn on a socket the parent bound, TLS 1.2 or newer,
with the server certificate ``safepacs init`` issued.

Connections are bounded here, not by uvicorn's ``limit_concurrency`` (which counts idle connections
and answers 503 to a real client once a slowloris holds enough of them):

* a connection has ``server.http_head_timeout`` seconds from its accept to complete the TLS handshake
  and send a request head, and a kept-alive one as long from the first byte of its next head (RFC 9112
  9.8 lets a server close an idle connection at any time); otherwise it is closed;
* a request body must keep coming: at least ``MIN_BODY_BYTES`` in every ``server.http_head_timeout``
  seconds once the head is in, or the connection is closed (a client that announces a large body and
  trickles it would otherwise hold its connection, and a connection place, for ever); and a response
  sent before its request's body was read (a 401 before an upload) closes the connection, whose
  unread body would otherwise keep it open;
* at most ``server.http_max_connections`` connections at once: a further one closes the connection
  that has waited longest for a request head, so a slowloris cannot keep a real client out; when
  every connection is busy with a request the new one is closed;
* on SIGTERM, requests get ``server.shutdown_grace`` seconds, then their connections are closed
  (which ends a streamed answer cleanly); the process has exited ``CHILD_EXIT_MARGIN`` seconds later
  whatever still runs (``_stop.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import socket
import ssl
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, ClassVar

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from safepacs._memory import freeze_start_up
from safepacs._net import RefusalTally
from safepacs._stop import CHILD_EXIT_MARGIN, exit_after
from safepacs.config import Settings

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["run_https"]

log = logging.getLogger(__name__)


def run_https(
    settings: Settings,
    sock: socket.socket,
    open_archive: Callable[[Settings], Archive],
    setup: Callable[[], None],
    make_app: Callable[[Archive], ASGIApp],
) -> None:
    """The body of the HTTPS process, forked by the supervisor (``runtime/supervisor.py``) with the stop
    signals blocked: serve ``make_app(archive)`` (DICOMweb and the web UI) on ``sock`` until
    SIGTERM/SIGINT (uvicorn finishes the requests in progress)."""
    setup()
    archive = open_archive(settings)
    keys = settings.keys_dir
    s = settings.server
    connections = _Connections(s.http_max_connections, RefusalTally(_report_refusals))
    config = uvicorn.Config(
        make_app(archive),
        ssl_certfile=str(keys / "server.pem"),
        ssl_keyfile=str(keys / "server.key"),
        log_config=None,
        access_log=False,  # URLs carry patient names and IDs in their query strings
        server_header=False,
        proxy_headers=False,
        loop="asyncio",
        http=_protocol(connections, s.http_head_timeout),
        timeout_keep_alive=5,
        # Requests are ended at the grace (_Server.shutdown); uvicorn cancels what is left a second later.
        timeout_graceful_shutdown=math.ceil(s.shutdown_grace) + 1,
        h11_max_incomplete_event_size=64 * 1024,
    )
    config.load()
    freeze_start_up()
    assert config.ssl is not None
    config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    config.ssl.set_ciphers("ECDHE+AESGCM")  # TLS 1.2: the BCP 195 / PS3.15 B.12 suites only
    server = _Server(config, connections, s.http_head_timeout, s.shutdown_grace)
    exit_after(s.shutdown_grace + CHILD_EXIT_MARGIN, "HTTPS", once=lambda: server.should_exit)
    try:
        server.run(sockets=[sock])
    finally:
        archive.close()


def _report_refusals(address: str, counts: dict[str, int]) -> None:
    summary = "; ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
    log.warning(
        "HTTPS connections closed before a request",
        extra={"peer_address": address, "connections": sum(counts.values()), "reasons": summary},
    )


_NO_HEAD = "no request head within server.http_head_timeout"
_EVICTED = "closed to make room: server.http_max_connections connections at once"
_REFUSED = "refused: server.http_max_connections connections busy with requests"
_SLOW_BODY = "request body slower than the minimum rate"

#: The least a request body must deliver in each ``server.http_head_timeout`` window (a real client
#: sends its body as fast as the network allows; this only stops a trickle).
MIN_BODY_BYTES = 1024


class _Connections:
    """This process's HTTPS connections, and which of them wait for a request head (since when).
    Used from the event loop's thread only."""

    def __init__(self, limit: int, refusals: RefusalTally) -> None:
        self.limit = limit
        self.refusals = refusals
        self._open: set[_GuardedH11] = set()
        self._waiting: dict[_GuardedH11, float] = {}

    def opened(self, conn: _GuardedH11) -> bool:
        """Count a new connection, closing the one that has waited longest for a request head when
        the limit is reached; False when every connection is busy (the caller closes the new one)."""
        if len(self._open) >= self.limit:
            oldest = min(self._waiting, key=self._waiting.__getitem__, default=None)
            if oldest is None:
                return False
            self.drop(oldest, _EVICTED)
        self._open.add(conn)
        self._waiting[conn] = time.monotonic()
        return True

    def waiting(self, conn: _GuardedH11) -> None:
        if conn in self._open:
            self._waiting.setdefault(conn, time.monotonic())

    def busy(self, conn: _GuardedH11) -> None:
        self._waiting.pop(conn, None)

    def closed(self, conn: _GuardedH11) -> None:
        self._open.discard(conn)
        self._waiting.pop(conn, None)

    def drop(self, conn: _GuardedH11, why: str) -> None:
        self.closed(conn)
        self.refusals.add(conn.peer_host, why)
        conn.transport.abort()

    def close_busy(self) -> int:
        """Stopping: close every connection (their requests end); how many there were."""
        doomed = list(self._open)
        for conn in doomed:
            self.closed(conn)
            conn.transport.abort()
        return len(doomed)


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the request head deadline and the connection limit (see the
    module docstring).  An instance is made when the connection is accepted, before its TLS handshake."""

    guard: ClassVar[_Connections]
    head_timeout: ClassVar[float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # From the accept: the TLS handshake and the first request head share the one deadline.
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._no_head)
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0  # received since the body timer last looked

    @property
    def peer_host(self) -> str:
        return str(self.client[0]) if self.client else ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.opened(self):
            self.guard.refusals.add(self.peer_host, _REFUSED)
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            # the first byte of the next request on a kept-alive connection: its head has the deadline
            self._head_timer = self.loop.call_later(self.head_timeout, self._no_head)
        self._body_bytes += len(data)
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and self.transport is not None:
            # Answered before its body was read (e.g. 401 to an upload): the rest is never read, so the
            # connection is closed rather than kept alive on a body that may never end.
            self.transport.close()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self)
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _track(self) -> None:
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self.guard.waiting(self)
        else:
            self._cancel_head_timer()
            self.guard.busy(self)
        if self.conn.their_state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_bytes = 0
                self._body_timer = self.loop.call_later(self.head_timeout, self._body_check)
        else:
            self._cancel_body_timer()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        """Every ``head_timeout`` seconds while a request body is being received: close the connection
        when less than :data:`MIN_BODY_BYTES` arrived since the last look."""
        self._body_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.conn.their_state is not h11.SEND_BODY:
            return
        if self._body_bytes < MIN_BODY_BYTES and not self.flow.read_paused:  # paused: we are the slow one
            self.guard.drop(self, _SLOW_BODY)
            return
        self._body_bytes = 0
        self._body_timer = self.loop.call_later(self.head_timeout, self._body_check)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _no_head(self) -> None:
        self._head_timer = None
        if self.transport is None or self.transport.is_closing():
            return  # the TLS handshake never completed (asyncio closed it), or it is closed already
        if self.conn.their_state is h11.IDLE:
            self.guard.drop(self, _NO_HEAD)


def _protocol(connections: _Connections, head_timeout: float) -> type[_GuardedH11]:
    """The protocol class uvicorn instantiates per connection, bound to this process's connections."""
    return type("GuardedH11", (_GuardedH11,), {"guard": connections, "head_timeout": head_timeout})


class _Server(uvicorn.Server):
    """uvicorn with a TLS handshake deadline, connections cut at the shutdown grace, a watchdog, and the
    stop signals let through only once its own handlers are in place (the process starts with them
    blocked, so a SIGTERM during start-up waits instead of being lost)."""

    def __init__(self, config: uvicorn.Config, connections: _Connections, head_timeout: float, grace: float):
        super().__init__(config)
        self._connections = connections
        self._head_timeout = head_timeout
        self._grace = grace

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up, with ``ssl_handshake_timeout`` on the listening server: uvicorn passes
        none to ``loop.create_server``, and asyncio's default leaves an unfinished handshake 60 s."""
        loop = asyncio.get_running_loop()
        create_server = loop.create_server
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            create_server, ssl_handshake_timeout=self._head_timeout
        )
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server  # the loop's own method again

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:
            self._connections.refusals.flush_due()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown; the connections still busy after ``server.shutdown_grace`` are
        closed, which ends their requests (Starlette stops a streamed answer when its client is gone)."""
        cut = asyncio.get_running_loop().call_later(self._grace, self._cut)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()
            self._connections.refusals.flush_due(force=True)

    def _cut(self) -> None:
        busy = self._connections.close_busy()
        if busy:
            log.warning("shutdown grace over; closing busy HTTPS connections", extra={"connections": busy})
