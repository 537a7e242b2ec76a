"""The background jobs of ``safepacs serve``: the hourly trash purge and the audit export.

They run in a process of their own, ``safepacs-jobs``, that the supervisor forks beside the
listeners' processes and restarts and stops with them, whichever listeners are enabled: the trash is
purged and the audit trail forwarded to its collectors even while no HTTPS listener runs (or its
process is being restarted).  One process runs them, so the trail goes to each collector from one
place only.

SIGTERM/SIGINT: both jobs are told to stop at once; a purge or a forwarding round in progress gets
``server.shutdown_grace`` plus ``CHILD_EXIT_MARGIN`` seconds less one, after which the process exits
anyway (``_stop.exit_after``).  Both are daemon threads, and the next start carries on where they
were cut short.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from safepacs._stop import CHILD_EXIT_MARGIN, StopRequest, exit_after
from safepacs.config import Settings
from safepacs.runtime.audit_export import start_forwarders

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["PURGE_INTERVAL", "purge_loop", "run_jobs"]

log = logging.getLogger(__name__)

PURGE_INTERVAL = 3600.0  # seconds between purges of the trash whose retention has ended


def run_jobs(
    settings: Settings,
    open_archive: Callable[[Settings], Archive],
    setup: Callable[[], None],
) -> None:
    """The body of the jobs process, forked by the supervisor with the stop signals blocked: purge the
    trash at start and then hourly, and forward the audit trail to the configured
    collectors (one thread each), until SIGTERM/SIGINT."""
    stop = StopRequest()
    stop.install()
    setup()
    archive = open_archive(settings)
    done = threading.Event()
    try:
        # The audit trail goes to the configured collectors from this process only (one thread each).
        forwarders = start_forwarders(archive.audit_log, settings, done)
        purger = threading.Thread(target=purge_loop, args=(archive, done), name="safepacs-purge", daemon=True)
        purger.start()
        stop.wait()
        margin = settings.server.shutdown_grace + CHILD_EXIT_MARGIN
        exit_after(margin, "jobs")
        done.set()
        deadline = time.monotonic() + margin - 1
        for thread in (purger, *forwarders):
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        done.set()
        archive.close()


def purge_loop(archive: Archive, stop: threading.Event, interval: float = PURGE_INTERVAL) -> None:
    """Destroy deleted instances once their retention has ended: at start and then every ``interval``
    seconds (hourly), until ``stop`` is set."""
    while not stop.is_set():
        try:
            archive.delete.purge()
        except Exception as exc:  # noqa: BLE001 - a failed purge is retried next hour; serving goes on
            log.error(  # no traceback: it could carry the values of the statement that failed
                "purging the trash failed; retrying in an hour", extra={"error": type(exc).__name__}
            )
        stop.wait(interval)
