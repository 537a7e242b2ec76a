"""The parent process of ``safepacs serve``: it binds the listeners, forks the processes that serve
them and those that run the background jobs, restarts any long-lived one that dies, and stops them
all.

Start-up (:func:`prepare`, :func:`bind_https`, :func:`run`): the index is migrated and the archive
opened once here, so that a broken data directory fails with one clear message rather than in every
child; Application Start is recorded before anything is served, Application Stop after everything
stopped.  Then (:func:`supervise`) the DICOM and DICOM TLS ports are bound, and these children are
forked, each a process of its own that opens its own archive after the fork (no engine or file handle
is shared):

* ``server.workers`` DIMSE workers (``protocols/dimse/server.run_worker``), accepting on the shared
  DICOM and DICOM TLS sockets;
* the HTTPS process (``protocols/dicomweb/server.run_https`` serving ``protocols/webui/site.create_site``:
  DICOMweb and the web UI), when an HTTPS socket is given;
* the audit export process (``runtime/jobs.run_export``), only when ``[[audit.collectors]]`` are
  configured;
* a purge child (``runtime/jobs.run_purge``) at the start and then every ``jobs.PURGE_INTERVAL``
  seconds (hourly), which purges the trash and exits, whichever listeners run.  It is reaped like the
  others without the loop ever waiting on it, and a new one is not forked while the last one runs.

A long-lived child that exits is restarted (logged as an error); when they keep dying within 5 s of
their start (more than three times), the supervisor stops everything and exits with status 1.  A purge
child is not restarted: the next purge is due an hour after the last one began (or once it ended, if
it took longer).  The supervisor runs no
threads of its own: it forks while they would run, and a lock one of them held at the fork would hang
the child.

SIGTERM/SIGINT: the supervisor passes it on to every child, a running purge child included; each gives
what is running ``server.shutdown_grace`` seconds and has exited by itself ``_stop.CHILD_EXIT_MARGIN``
seconds later; a child still there a second after that is killed.  So every process has exited within
the grace plus ``_stop.STOP_MARGIN`` seconds.  Children start with the stop signals blocked until they
have their own handlers, so a signal sent during start-up is not lost.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from safepacs._memory import keep_large_buffers, share_with_children
from safepacs._net import bind_listener
from safepacs._stop import CHILD_EXIT_MARGIN, STOP_SIGNALS, StopRequest
from safepacs.app import Archive, open_archive, upgrade_index
from safepacs.audit.events import Participant
from safepacs.config import Settings
from safepacs.errors import ConfigError, SafePacsError
from safepacs.protocols.dicomweb.server import run_https
from safepacs.protocols.dimse.engine import check_pynetdicom
from safepacs.protocols.dimse.server import run_worker, shared_loads, withdraw_load
from safepacs.protocols.dimse.tls import ensure_client_certificate
from safepacs.runtime.audit_export import check_collectors
from safepacs.runtime.jobs import PURGE_FAILED, PURGE_INTERVAL, run_export, run_purge
from safepacs.services.audit import operator
from safepacs.types import Peer

if TYPE_CHECKING:
    from starlette.types import ASGIApp

__all__ = ["Address", "bind_https", "prepare", "run", "supervise"]

log = logging.getLogger(__name__)

#: (host, port) of a listening socket
Address = tuple[str, int]
OpenArchive = Callable[[Settings], Archive]
#: ``ready(dicom, dicom_tls)``: called once the DICOM listeners listen and the children are started
Ready = Callable[[Address, Address], None]

QUICK_DEATH_SECONDS = 5.0  # a child that exits sooner after its start counts as failing at start
MAX_QUICK_DEATHS = 3  # more than this many, and the supervisor stops


def prepare(settings: Settings) -> list[Peer]:
    """What ``serve`` checks and sets up before it listens: the allocator (inherited by the children),
    the index schema, the archive opened once (fails here, once, with a clear message, not in every
    child), the audit trail's disk reserve, the client certificate for C-MOVE to TLS peers and the
    audit collectors' files.  Returns the registered peers.  Before all that, the DICOM engine's check of
    the pynetdicom installed (it relies on pynetdicom's internals): nothing is started or recorded with
    one it was not checked with, unless ``server.unchecked_pynetdicom`` says so."""
    check_pynetdicom(allow_unchecked=settings.server.unchecked_pynetdicom)
    keep_large_buffers()  # before the workers fork: they inherit it
    upgrade_index(settings)
    archive = open_archive(settings)
    try:
        peers = archive.directory.list_peers()
        if archive.reserve is not None:
            archive.reserve.ensure()  # the audit trail's disk space: created, or refilled after use
    finally:
        archive.close()
    ensure_client_certificate(settings.keys_dir, settings.server.ae_title)  # for C-MOVE to TLS peers
    check_collectors(settings)  # the audit collectors' CA and client certificate files
    return peers


def bind_https(settings: Settings) -> socket.socket:
    """The HTTPS listening socket (:class:`ConfigError` when the address cannot be had)."""
    s = settings.server
    try:
        return bind_listener(s.bind, s.http_port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {s.bind}:{s.http_port} ({exc.strerror}); choose another --bind or --http-port"
        ) from exc


def run(
    settings: Settings,
    *,
    https: socket.socket | None,
    setup: Callable[[], None] = lambda: None,
    ready: Ready | None = None,
    purge_interval: float = PURGE_INTERVAL,
) -> int:
    """Record Application Start, :func:`supervise` until SIGTERM/SIGINT, record Application Stop;
    returns the exit status.  Nothing is served unless the start is recorded."""
    launcher = operator("serve")
    _record_activity(settings, launcher, start=True)
    try:
        return supervise(
            settings, open_archive, https=https, setup=setup, ready=ready, purge_interval=purge_interval
        )
    finally:
        _record_activity(settings, launcher, start=False)


def _record_activity(settings: Settings, launcher: Participant, *, start: bool) -> None:
    """Application Start or Stop (110100), checkpointed.  A start that cannot be recorded stops
    ``serve`` (SafePacsError); a stop that cannot be recorded is logged (it has stopped anyway)."""
    try:
        archive = open_archive(settings)
        try:
            archive.auditor.application(launcher, start=start)
        finally:
            archive.close()
    except SafePacsError as exc:
        if start:
            raise
        logging.getLogger("safepacs.audit").error(
            "the application stop could not be recorded", extra={"error": type(exc).__name__}
        )


@dataclass(frozen=True)
class _Child:
    """One process the supervisor keeps running: its name and what it runs."""

    name: str
    target: Callable[[], None]
    slot: int | None = None  # a DIMSE worker's place in the shared load array


def _bind_dicom(settings: Settings) -> tuple[socket.socket, socket.socket]:
    """The DICOM and DICOM TLS listening sockets (:class:`ConfigError` when one cannot be had)."""
    s = settings.server
    bound: list[socket.socket] = []
    try:
        for port, option in ((s.dicom_port, "--dicom-port"), (s.dicom_tls_port, "--dicom-tls-port")):
            try:
                bound.append(bind_listener(s.bind, port))
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {s.bind}:{port} ({exc.strerror}); choose another --bind or {option}"
                ) from exc
    except ConfigError:
        for sock in bound:
            sock.close()
        raise
    return bound[0], bound[1]


def _site(archive: Archive) -> ASGIApp:
    """The HTTPS process's application: DICOMweb and the web UI, with the posture page's review.
    Imported here, in the HTTPS process only: the supervisor and the DIMSE workers never carry
    FastAPI, Jinja2 and the pages (about 11 MB a process tree, issue 17's memory target)."""
    from safepacs.protocols.webui.site import create_site
    from safepacs.runtime.posture import configuration_review

    return create_site(archive, review=configuration_review)


def supervise(
    settings: Settings,
    open_archive: OpenArchive,
    *,
    https: socket.socket | None,
    setup: Callable[[], None] = lambda: None,
    ready: Ready | None = None,
    purge_interval: float = PURGE_INTERVAL,
) -> int:
    """Serve DICOM and DICOM TLS, and HTTPS on ``https`` unless it is None, and run the background jobs,
    until SIGTERM/SIGINT; returns the exit status (0, or 1 when children kept failing at start).

    ``open_archive`` builds a child's backends (after the fork); ``setup`` configures logging in each
    child.  ``ready`` is called with the DICOM and the DICOM TLS listener's (host, port) once they
    listen.  A purge child is forked at the start and then every ``purge_interval`` seconds.  The
    listening sockets, ``https`` included, are closed on return.
    """
    s = settings.server
    try:
        listener, tls_listener = _bind_dicom(settings)
    except ConfigError:
        if https is not None:
            https.close()
        raise
    host, port = listener.getsockname()[:2]
    tls_host, tls_port = tls_listener.getsockname()[:2]
    workers = s.workers or (os.cpu_count() or 1)
    stop = StopRequest()
    stop.install()
    ctx = multiprocessing.get_context("fork")
    loads = shared_loads(workers)  # each worker's load, once it accepts

    children = [
        _Child(
            "safepacs-dimse",
            functools.partial(run_worker, settings, listener, tls_listener, open_archive, setup, loads, i),
            slot=i,
        )
        for i in range(workers)
    ]
    if https is not None:
        children.append(
            _Child(
                "safepacs-https",
                functools.partial(
                    run_https,
                    settings,
                    https,
                    open_archive,
                    setup,
                    _site,
                ),
            )
        )
    if settings.audit.collectors:  # no process at all without them
        children.append(
            _Child("safepacs-audit-export", functools.partial(run_export, settings, open_archive, setup))
        )
    purge = _Child("safepacs-purge", functools.partial(run_purge, settings, open_archive, setup))
    started: dict[int | None, float] = {}

    def fork(child: _Child) -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=_logged(child.name, child.target), name=child.name, daemon=False)
        # The child starts with the stop signals blocked until it has its own handlers (StopRequest).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return proc

    def spawn(child: _Child) -> multiprocessing.process.BaseProcess:
        proc = fork(child)
        started[proc.pid] = time.monotonic()
        return proc

    quick_deaths = 0
    share_with_children()  # before the first fork: the children share the parent's modules
    procs = [spawn(child) for child in children]
    purges = _Purges(functools.partial(fork, purge), purge_interval)
    purges.tick()  # the first purge at the start
    log.info(
        "DIMSE listening",
        extra={
            "address": host,
            "port": port,
            "tls_port": tls_port,
            "ae_title": s.ae_title,
            "workers": workers,
        },
    )
    if ready is not None:
        ready((host, port), (tls_host, tls_port))
    while not stop.wait(0.5):
        for i, proc in enumerate(procs):
            if not proc.is_alive():
                if time.monotonic() - started.pop(proc.pid, 0.0) < QUICK_DEATH_SECONDS:
                    quick_deaths += 1
                if quick_deaths > MAX_QUICK_DEATHS:
                    log.error("SafePACS processes keep failing at start; stopping (see the errors above)")
                    stop.requested = True
                    break
                log.error(
                    "a SafePACS process exited; restarting",
                    extra={"child": children[i].name, "exitcode": proc.exitcode},
                )
                slot = children[i].slot
                if slot is not None:
                    withdraw_load(loads, slot)  # until the new worker publishes its own
                proc.close()  # its sentinel descriptor: a restarted child is a new process object
                procs[i] = spawn(children[i])
        if not stop.requested:
            purges.tick()
    _stop_children([*procs, *purges.running()], s.shutdown_grace)
    for sock in (listener, tls_listener, https):
        if sock is not None:
            sock.close()
    log.info("DIMSE stopped")
    return 1 if quick_deaths > MAX_QUICK_DEATHS else 0


class _Purges:
    """When the supervisor forks a purge child: at the start, then ``interval`` seconds after the last
    one was forked, never while one runs.  :meth:`tick` reaps a purge child that has exited without
    waiting for one that has not."""

    def __init__(self, spawn: Callable[[], multiprocessing.process.BaseProcess], interval: float) -> None:
        self._spawn = spawn
        self._interval = interval
        self._due = time.monotonic()
        self._proc: multiprocessing.process.BaseProcess | None = None

    def tick(self) -> None:
        """Reap the last purge child if it has exited; fork the next one if it is due."""
        proc = self._proc
        if proc is not None:
            if proc.is_alive():
                return
            if proc.exitcode not in (0, PURGE_FAILED):  # PURGE_FAILED: the child has logged why
                log.error(
                    "the trash purge process ended abnormally; the next purge tries again",
                    extra={"child": proc.name, "exitcode": proc.exitcode},
                )
            proc.close()
            self._proc = None
        now = time.monotonic()
        if now >= self._due:
            self._due = now + self._interval
            self._proc = self._spawn()

    def running(self) -> list[multiprocessing.process.BaseProcess]:
        """The purge child not yet reaped, if any (to be stopped with the others)."""
        return [] if self._proc is None else [self._proc]


def _stop_children(procs: list[multiprocessing.process.BaseProcess], grace: float) -> None:
    """SIGTERM to every child; each stops within the grace and its margin (``exit_after``), and one
    that has not a second later is killed."""
    for proc in procs:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace + CHILD_EXIT_MARGIN + 1
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            log.warning("a SafePACS process did not stop in time; killed", extra={"child": proc.name})
            proc.kill()
    for proc in procs:
        proc.join(1.0)


def _logged(name: str, target: Callable[[], None]) -> Callable[[], None]:
    """``target`` run in a child process: an exception that ends it is logged (type and frames, see
    :mod:`safepacs._logging`), not printed by multiprocessing with its message; the exit status is 1."""

    def run() -> None:
        try:
            target()
        except Exception:
            log.critical("a SafePACS process failed", extra={"child": name}, exc_info=True)
            raise SystemExit(1) from None

    return run
