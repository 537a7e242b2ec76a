"""Listening sockets, bound once in the parent process and shared with the workers it forks, and the
tally of connections they refuse."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["OTHER_ADDRESSES", "RefusalTally", "bind_listener"]


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free port), non-blocking so that
    workers racing to accept on it never hang.

    Created with protocol ``IPPROTO_TCP`` explicitly: asyncio (uvicorn) turns TCP_NODELAY on for
    accepted sockets only when their protocol says TCP, and without it every HTTPS answer written in
    two parts waits ~40 ms for the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()  # not left open until the garbage collector finds it
        raise
    sock.setblocking(False)
    return sock


#: ``report(address, {reason: count})``: what a :class:`RefusalTally` hands on, at most once per address
#: per interval.
Report = Callable[[str, dict[str, int]], None]

OTHER_ADDRESSES = "(other addresses)"


class RefusalTally:
    """Connections a listener closed before they did anything (no association, no request), counted
    per source address and reported at most once per address per ``interval`` seconds.

    Each refusal is counted at once (``add`` returns the running total of its reason); ``report`` is
    called with an address's counts when its first refusal arrives and then at most once per
    interval (``flush_due``, called from the accept loop), so a flood of bare connections costs one
    log line and one audit record per address per interval, not one per connection.  Past
    ``max_addresses`` addresses in one interval the rest are counted together under
    :data:`OTHER_ADDRESSES`.
    """

    def __init__(self, report: Report, *, interval: float = 60.0, max_addresses: int = 64) -> None:
        self._report = report
        self._interval = interval
        self._max_addresses = max_addresses
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}
        self._next: dict[str, float] = {}  # an address's next report, once its first was made
        self.totals: Counter[str] = Counter()

    def add(self, address: str, reason: str) -> int:
        """Count one refusal; reports it at once when nothing was reported for ``address`` lately."""
        now = time.monotonic()
        with self._lock:
            self.totals[reason] += 1
            total = self.totals[reason]
            if address not in self._counts and address not in self._next:
                if len(self._next) >= self._max_addresses:
                    address = OTHER_ADDRESSES
            self._counts.setdefault(address, Counter())[reason] += 1
            due = self._take(address, now) if self._next.get(address, 0.0) <= now else None
        if due is not None:
            self._report(address, due)
        return total

    def flush_due(self, *, force: bool = False) -> None:
        """Report every address whose interval has passed (``force``: every address with counts)."""
        now = time.monotonic()
        with self._lock:
            for address, until in list(self._next.items()):
                if until <= now and address not in self._counts:
                    del self._next[address]  # quiet for a whole interval: forgotten
            due = [
                (address, self._take(address, now))
                for address in list(self._counts)
                if force or self._next.get(address, 0.0) <= now
            ]
        for address, counts in due:
            self._report(address, counts)

    def _take(self, address: str, now: float) -> dict[str, int]:
        self._next[address] = now + self._interval
        return dict(self._counts.pop(address, Counter()))
