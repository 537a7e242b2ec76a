"""How long stopping may take: every process of ``safepacs serve`` has exited within
``server.shutdown_grace`` plus :data:`STOP_MARGIN` seconds of the SIGTERM.

The parent passes the signal on at once; each child gives running requests and associations the grace,
ends them, and exits by itself :data:`CHILD_EXIT_MARGIN` seconds after the grace at the latest
(:func:`exit_after`: a thread computing a long answer cannot be cancelled, a write can block); the
parent kills any child still there a second later.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CHILD_EXIT_MARGIN", "STOP_MARGIN", "STOP_SIGNALS", "StopRequest", "exit_after"]

log = logging.getLogger(__name__)

CHILD_EXIT_MARGIN = 3.0
#: the children's margin, one second before the parent kills, and a second to notice the signal and reap
STOP_MARGIN = CHILD_EXIT_MARGIN + 2.0


def exit_after(seconds: float, what: str, *, once: Callable[[], bool] | None = None) -> None:
    """End this process ``seconds`` after a stop was requested (``once()`` true, polled; None: now) if
    it is still running.  Whatever was acknowledged was durable before it was acknowledged, so nothing
    acknowledged is lost; a store never acknowledged leaves at most an unnamed temporary file."""

    def watchdog() -> None:
        while once is not None and not once():
            time.sleep(0.2)
        time.sleep(seconds)
        log.warning("still stopping after server.shutdown_grace; exiting now", extra={"child": what})
        os._exit(1)

    threading.Thread(target=watchdog, name="safepacs-stop-watchdog", daemon=True).start()


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class StopRequest:
    """Set by SIGTERM/SIGINT.  The handler only flips a flag: an ``Event.set`` in a signal handler
    can deadlock when a second signal arrives while the first handler holds the event's lock."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        """Handle the stop signals in this process, then let through any that arrived meanwhile
        (children start with them blocked, so one sent during start-up is not lost)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _handle(self, *_: Any) -> None:
        self.requested = True

    def wait(self, timeout: float = float("inf")) -> bool:
        """Sleep up to ``timeout`` seconds (default: until asked) in short steps; whether a stop was
        requested."""
        deadline = time.monotonic() + timeout
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.requested
