"""The head file: the audit trail's signed head, kept outside the index (``DATA/audit-head``).

One line per head, ``SEQ HASH TIME SIGNATURE`` (:class:`~safepacs.audit.chain.SignedHead`), appended
by whichever SafePACS process committed the records it names, under an ``flock`` of the file, and
synced (``fdatasync``) before the lock is released.  Sequence numbers strictly increase: a process
whose head is already covered by a later line (another process committed after it and wrote first)
writes nothing, since that later record's hash covers every record before it.

When.  A head is written only once the records it names are durable in the index, so that a power
cut can never leave the file naming a record the index lost:

* a commit that changes data or security (a store, a deletion, a login, an administrative change,
  application start and stop, a refusal) is synced, then its head is written before the call that
  recorded it returns, so before the access is answered;
* records of reads (queries, retrievals, accepted associations) are committed without waiting for a
  sync (the index syncs them within a second): a thread makes them durable and writes one head for
  all of them every ``LAZY_INTERVAL`` seconds.

A head that cannot be written (a full disk) is logged and written by that thread later; the access
is not refused, since its record is in the index already.

The file begins with the head of the record where this process found no head file: its row in
``audit_refs`` (kind ``anchor``) marks that record, so that a head file deleted later is noticed
(:func:`~safepacs.audit.chain.verify_chain`) instead of being started again silently.  Truncation of
the trail before that record cannot be detected from the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Protocol

from safepacs.audit.chain import HeadLine, SignedHead, Signer

__all__ = ["LAZY_INTERVAL", "HeadFile", "TrailDurability", "read_head_lines"]

log = logging.getLogger(__name__)

LAZY_INTERVAL = 0.5  # seconds between the writes of the heads of reads (each after a sync of the index)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TAIL = 4096  # bytes read back from the end of the file to find its last line (a line is ~180)
_sync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def read_head_lines(path: Path, size: int | None = None) -> Generator[HeadLine]:
    """The lines of a head file in order (its first ``size`` bytes only, when given, without a last
    line still being written); a line that is not a signed head has ``head`` None."""
    with path.open("rb") as f:
        read = 0
        for number, raw in enumerate(f, start=1):
            read += len(raw)
            if size is not None and (read > size or (read == size and not raw.endswith(b"\n"))):
                return
            try:
                head: SignedHead | None = SignedHead.parse(raw.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                head = None
            yield HeadLine(number, head)


class TrailDurability(Protocol):
    """What the head file asks of the audit trail's store (the index)."""

    def sync_audit(self) -> None:
        """Make every committed audit record durable."""

    def audit_anchor(self) -> int | None:
        """The record where the head file began; None: not yet."""

    def set_audit_anchor(self, seq: int) -> None:
        """Mark record ``seq`` as where the head file began."""


class HeadFile:
    """Appends signed heads to the head file for one process (see the module docstring).

    The index calls :meth:`committed` after each commit that appended audit records.  Thread-safe.
    """

    def __init__(self, path: Path, signer: Signer, audit_log: TrailDurability) -> None:
        self.path = path
        self._signer = signer
        self._audit_log = audit_log
        self._mutex = threading.Lock()  # one writer per process at a time (flock is per open file)
        self._state = threading.Lock()  # guards the fields below
        self._fd: int | None = None
        self._written = 0  # the highest seq the file is known to name
        self._wanted: tuple[int, str] | None = None  # a durable head waiting for its turn
        self._lazy: tuple[int, str] | None = None  # a head whose records may not be durable yet
        self._failing = False  # the last write failed (logged once until one succeeds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # What the index reports -----------------------------------------------------------------------
    def committed(self, seq: int, digest: str, *, durable: bool) -> None:
        """Records up to ``seq`` (hash ``digest``) were committed; ``durable``: and synced to disk."""
        if not durable:
            with self._state:
                if self._lazy is None or seq > self._lazy[0]:
                    self._lazy = (seq, digest)
                self._start_thread()
            if self._stop.is_set():  # closed: no thread any more, write it now
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - the record is committed: logged, not refused
                    self._failed(exc)
            return
        with self._state:
            if self._wanted is None or seq > self._wanted[0]:
                self._wanted = (seq, digest)
        try:
            self._write_wanted(seq)
        except Exception as exc:  # noqa: BLE001 - the record is committed: retried, not refused
            self._failed(exc)

    def flush(self) -> None:
        """Make the records of reads durable and write their head now."""
        with self._state:
            lazy, self._lazy = self._lazy, None
        if lazy is None:
            return
        try:
            self._audit_log.sync_audit()
        except Exception:
            with self._state:
                if self._lazy is None or lazy[0] > self._lazy[0]:
                    self._lazy = lazy
            raise
        with self._state:
            if self._wanted is None or lazy[0] > self._wanted[0]:
                self._wanted = lazy
        self._write_wanted(lazy[0])

    def close(self) -> None:
        """Stop the thread, write what is pending, close the file."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(10)
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - closing goes on; the next process's head covers it
            log.error("the audit trail's head could not be written", extra={"error": type(exc).__name__})
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # Writing -------------------------------------------------------------------------------------
    def _write_wanted(self, seq: int) -> None:
        """Write the highest durable head wanted, unless the file names ``seq`` or later already."""
        with self._mutex:
            if self._written >= seq:
                return  # a head written meanwhile (by another thread of this process) covers it
            with self._state:
                head, self._wanted = self._wanted, None
            if head is None:
                return
            try:
                self._append(*head)
                self._failing = False
            except BaseException:
                with self._state:
                    if self._wanted is None or head[0] > self._wanted[0]:
                        self._wanted = head
                raise
            finally:
                if self._stop.is_set() and self._fd is not None:  # closed: a late commit's head
                    os.close(self._fd)
                    self._fd = None

    def _append(self, seq: int, digest: str) -> None:
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, min(size, _TAIL), max(0, size - _TAIL)) if size else b""
            last = _last_seq(tail)
            if size == 0:
                self._begin(seq)
            if seq > last:
                prefix = b"" if not tail or tail.endswith(b"\n") else b"\n"  # after a torn write
                line = self._signer.head(seq, digest).line()
                os.write(fd, prefix + line.encode("ascii") + b"\n")
                _sync(fd)
            self._written = max(seq, last)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _begin(self, seq: int) -> None:
        """The file is new: mark record ``seq`` as where it begins - or, when a record was marked
        before, the file was deleted: say so (``audit verify`` reports it) and go on anchoring."""
        started = self._audit_log.audit_anchor()
        if started is None:
            self._audit_log.set_audit_anchor(seq)
            log.info("the audit trail's signed head file begins", extra={"seq": seq, "path": str(self.path)})
        else:
            log.error(
                "the audit trail's signed head file was missing: it began at another record; "
                "safepacs audit verify reports this",
                extra={"began_at": started, "path": str(self.path)},
            )

    def _open(self) -> int:
        """The open head file; opened again when the path no longer names it (deleted, replaced)."""
        if self._fd is not None:
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                return self._fd
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(
            self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | _O_NOFOLLOW, 0o600
        )
        self._written = 0
        return self._fd

    def _failed(self, exc: Exception) -> None:
        with self._state:
            first, self._failing = not self._failing, True
        if first:  # once per outage, not once per access
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            log.error(
                "the audit trail's head could not be written; retrying every %s seconds",
                LAZY_INTERVAL,
                extra={"reason": reason},
            )
        with self._state:
            wanted, self._wanted = self._wanted, None
            if wanted is not None and (self._lazy is None or wanted[0] > self._lazy[0]):
                self._lazy = wanted
            self._start_thread()

    # The thread that writes the heads of reads ----------------------------------------------------
    def _start_thread(self) -> None:
        """Start the thread on first use (called holding ``_state``)."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="safepacs-audit-head", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(LAZY_INTERVAL):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - logged once per outage, retried
                self._failed(exc)


def _last_seq(tail: bytes) -> int:
    """The sequence number of the last complete line in ``tail`` (0: none)."""
    lines = tail.split(b"\n")
    for raw in reversed(lines[:-1] if not tail.endswith(b"\n") else lines):
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            if raw.strip():
                return SignedHead.parse(raw.decode("ascii")).seq
    return 0
