"""The background jobs of ``safepacs serve``: the trash purge and the audit export.

Both run in processes of their own that the supervisor forks beside the listeners' processes and
stops with them, whichever listeners are enabled: the trash is purged and the audit trail forwarded to
its collectors even while no HTTPS listener runs (or its process is being restarted).  Neither keeps a
process at rest that has nothing to do, since each process costs memory of its own (about 12 MB, and a
share of the pages all of them share: bench/README.md, "Memory benchmark"):

* The purge (:func:`run_purge`) runs in a short-lived child, ``safepacs-purge``, that the supervisor
  forks at its start and then every :data:`PURGE_INTERVAL` seconds, never while the last one runs: it
  opens the archive, destroys the trash whose retention has ended, and exits.  A purge that fails is
  logged (without a traceback) and the child exits with status 1; the next one, an hour later, tries
  again.  A child that dies is not restarted: the next purge is.
* The audit export (:func:`run_export`) is a long-lived child, ``safepacs-audit-export``, forked only
  when ``[[audit.collectors]]`` are configured, and restarted like the listeners' processes when it
  dies: one thread per collector (``runtime/audit_export.py``).  One process runs them, so the trail
  goes to each collector from one place only.

The supervisor holds no threads of its own for them: it forks restarted children while they would run,
and a lock held by one of its threads at the fork would stay held, forever, in the child.

SIGTERM/SIGINT: a purge or a forwarding round in progress gets ``server.shutdown_grace`` plus
``CHILD_EXIT_MARGIN`` seconds (the forwarders one less), after which the process exits anyway
(``_stop.exit_after``).  The next start carries on where they were cut short: the trash entries not yet
forgotten are purged again, and each collector's cursor only moves past what it acknowledged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from safepacs._stop import CHILD_EXIT_MARGIN, StopRequest, exit_after
from safepacs.config import Settings
from safepacs.runtime.audit_export import start_forwarders

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["PURGE_FAILED", "PURGE_INTERVAL", "run_export", "run_purge"]

log = logging.getLogger(__name__)

PURGE_INTERVAL = 3600.0  # seconds between purges of the trash whose retention has ended
PURGE_FAILED = 1  # the purge child's exit status when the purge failed (it has logged why)


def run_purge(
    settings: Settings,
    open_archive: Callable[[Settings], Archive],
    setup: Callable[[], None],
) -> None:
    """The body of one purge child, forked by the supervisor with the stop signals blocked: destroy the
    trash whose retention has ended, then exit (status :data:`PURGE_FAILED` when that failed).  A stop
    requested before the purge begins skips it; one requested during it leaves it the grace."""
    stop = StopRequest()
    stop.install()
    exit_after(settings.server.shutdown_grace + CHILD_EXIT_MARGIN, "purge", once=lambda: stop.requested)
    setup()
    if stop.requested:
        return
    try:
        archive = open_archive(settings)
        try:
            archive.delete.purge()
        finally:
            archive.close()
    except Exception as exc:  # noqa: BLE001 - a failed purge is retried next hour; serving goes on
        log.error(  # no traceback: it could carry the values of the statement that failed
            "purging the trash failed; retrying in an hour", extra={"error": type(exc).__name__}
        )
        raise SystemExit(PURGE_FAILED) from None


def run_export(
    settings: Settings,
    open_archive: Callable[[Settings], Archive],
    setup: Callable[[], None],
) -> None:
    """The body of the audit export process, forked by the supervisor with the stop signals blocked when
    collectors are configured: forward the audit trail to each (one thread each) until SIGTERM/SIGINT."""
    stop = StopRequest()
    stop.install()
    setup()
    archive = open_archive(settings)
    done = threading.Event()
    try:
        forwarders = start_forwarders(archive.audit_log, settings, done)
        log.info("audit export running", extra={"collectors": len(forwarders), "pid": os.getpid()})
        stop.wait()
        margin = settings.server.shutdown_grace + CHILD_EXIT_MARGIN
        exit_after(margin, "audit export")
        done.set()
        deadline = time.monotonic() + margin - 1
        for thread in forwarders:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        done.set()
        archive.close()
