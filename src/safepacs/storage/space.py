"""Disk space: stop storing before the disk is full, and keep some for the audit trail.

An archive whose disk fills up must still serve what it has, and every read must be recorded first
(the audit trail refuses an access it cannot record).  Two things keep that possible:

* :class:`FreeSpace`, the low-water mark ``storage.min_free_bytes``: while the file system of the
  object store or of the SQLite index has less space available (``statvfs`` ``f_bavail``: what an
  unprivileged writer may still use) than that, every store is refused (C-STORE 0xA700, STOW-RS 507,
  ``import`` stops).  What is left stays for the audit records of reads and for the index.
* :class:`AuditReserve`, ``storage.audit_reserve_bytes`` preallocated in a file beside the SQLite
  index (``index.sqlite3-audit-reserve``), created by ``serve`` at start.  When something else fills
  the disk after all and an audit record fails for lack of space, the file is truncated to nothing,
  which gives its blocks back, and the record is written again; the empty file stays as the sign that
  the reserve was used (``safepacs doctor`` reports it; ``serve`` refills it at its next start).  On a
  copy-on-write file system (btrfs, ZFS) preallocated blocks are not a promise of space, so the
  reserve helps less there; the low-water mark works everywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from safepacs.errors import StorageFullError

__all__ = ["AuditReserve", "FreeSpace", "available_bytes", "is_disk_full"]

log = logging.getLogger(__name__)

_CHECK_INTERVAL = 1.0  # seconds a free-space answer is reused: one statvfs per file system per second
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_PG_DISK_FULL = "53100"


def available_bytes(path: Path) -> int:
    """The bytes an unprivileged writer may still use on ``path``'s file system (OSError if none)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class FreeSpace:
    """The low-water mark on the file systems stores write to (see the module docstring).

    With a ``reserve``, space the reserve gave back counts as taken on its file system: stores stay
    refused until the disk has room for the mark *and* the refilled reserve; the first check that
    finds that room refills it (a released reserve only: creating one is ``serve``'s start-up)."""

    def __init__(
        self,
        paths: Iterable[Path],
        minimum: int,
        *,
        reserve: AuditReserve | None = None,
        interval: float = _CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = tuple(dict.fromkeys(Path(p) for p in paths))
        self.minimum = minimum
        self.reserve = reserve
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._releases = 0  # the reserve's releases seen at the last look: a new one means look again
        self._short = False  # below the mark at the last look

    def _reserve_deficit(self) -> tuple[int, int | None]:
        """(bytes the reserve lacks, its file system) - (0, None) without a reserve file."""
        if self.reserve is None:
            return 0, None
        held = self.reserve.held()
        if held is None or held >= self.reserve.size:
            return 0, None
        try:
            return self.reserve.size - held, os.stat(self.reserve.path.parent).st_dev
        except OSError:
            return 0, None

    def below(self) -> list[tuple[Path, int, int]]:
        """Each file system (by its first path) that has less space available now than it needs:
        ``(path, available, needed)``; needed is the mark, plus what a released reserve lacks."""
        out = []
        devices: set[int] = set()
        deficit, reserve_device = self._reserve_deficit()
        for path in self.paths:
            try:
                device = os.stat(path).st_dev
                free = available_bytes(path)
            except OSError:  # gone or unreadable: the write itself will say what is wrong
                continue
            needed = self.minimum + (deficit if device == reserve_device else 0)
            if free < needed and device not in devices:
                out.append((path, free, needed))
            devices.add(device)
        return out

    def _refill(self) -> None:
        """Refill a released reserve once its file system has room for it and the mark."""
        deficit, _ = self._reserve_deficit()
        if deficit <= 0 or self.reserve is None:
            return
        try:
            room = available_bytes(self.reserve.path.parent)
        except OSError:
            return
        if room >= self.minimum + deficit and self.reserve.ensure():
            log.warning("the disk space reserved for the audit trail is in place again")

    def check(self) -> None:
        """Refuse (:class:`StorageFullError`) while a file system is below the mark; looks at most
        once per ``interval`` seconds, whatever the number of threads asking, and at once after this
        process released the reserve."""
        if self.minimum <= 0 and (self.reserve is None or self.reserve.releases == 0):
            return  # no mark, and no reserve this process released that stores must leave room for
        with self._lock:
            now = self._clock()
            releases = self.reserve.releases if self.reserve is not None else 0
            if now - self._checked_at >= self._interval or releases != self._releases:
                self._refill()
                below = self.below()
                if below and not self._short:
                    path, free, needed = below[0]
                    log.error(
                        "free disk space is below storage.min_free_bytes: stores are refused, reads go on",
                        extra={"path": str(path), "available": free, "needed": needed},
                    )
                elif self._short and not below:
                    log.warning("free disk space is above storage.min_free_bytes again: storing")
                self._short, self._checked_at, self._releases = bool(below), now, releases
            short = self._short
        if short:
            raise StorageFullError(
                "refused: the disk has less free space than storage.min_free_bytes "
                f"({self.minimum} bytes); nothing is stored until space is freed"
            )


class AuditReserve:
    """Space kept for the audit trail in a preallocated file (see the module docstring)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.releases = 0  # how often this process released it
        self._lock = threading.Lock()

    def held(self) -> int | None:
        """The bytes the reserve holds now (0: released); None when there is no reserve file."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return None

    def ensure(self) -> bool:
        """Create or refill the reserve to ``size`` bytes (``posix_fallocate``); whether it holds them.
        A disk too full for it is logged, not an error: the archive still serves."""
        if self.size <= 0:
            return True
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                log.warning("the audit reserve cannot be created", extra={"reason": exc.strerror})
                return False
            try:
                if os.fstat(fd).st_size >= self.size:
                    return True
                try:
                    os.posix_fallocate(fd, 0, self.size)
                    os.fsync(fd)
                except OSError as exc:
                    os.ftruncate(fd, 0)  # nothing half-reserved: it would look like a reserve and not be one
                    log.warning(
                        "no disk space could be reserved for the audit trail",
                        extra={"reason": exc.strerror, "bytes": self.size},
                    )
                    return False
                return True
            finally:
                os.close(fd)

    def release(self) -> bool:
        """Give the reserve's space back (truncate the file to nothing); whether it held any."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                return False
            try:
                if os.fstat(fd).st_size == 0:
                    return False
                os.ftruncate(fd, 0)
                self.releases += 1
                return True
            except OSError:
                return False
            finally:
                os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or what it was raised from (a database driver's error included), says that the
    disk or the database is full: ENOSPC/EDQUOT, SQLite's SQLITE_FULL, PostgreSQL's disk_full."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return True
        if isinstance(current, sqlite3.Error) and (getattr(current, "sqlite_errorcode", 0) & 0xFF) == (
            sqlite3.SQLITE_FULL
        ):
            return True
        if getattr(current, "sqlstate", None) == _PG_DISK_FULL:
            return True
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
        pending += [current.__cause__, current.__context__, orig if isinstance(orig, BaseException) else None]
    return False
