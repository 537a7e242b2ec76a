"""The audit trail: who touched which patient's data, when, from where, on what device (issue 5).

:class:`AuditTrail` records :class:`~safepacs.audit.events.AuditEvent` values durably in the index
database, hash-chained and checkpointed (``audit/chain.py``), *before* the response they describe
is sent; when it cannot, it raises :class:`~safepacs.errors.AuditError` and the caller refuses the
access.  :class:`MemoryAuditSink` is the in-memory stand-in that tests use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from safepacs.audit.chain import Signer, Verification, verify_chain
from safepacs.audit.events import (
    Action,
    AuditEvent,
    AuditObject,
    EventID,
    ObjectKind,
    Outcome,
    Participant,
    canonical,
    from_canonical,
)
from safepacs.errors import AuditError, SafePacsError

if TYPE_CHECKING:
    from safepacs.index import SqlIndex
    from safepacs.storage.space import AuditReserve

_log = logging.getLogger(__name__)

__all__ = [
    "Action",
    "AuditEvent",
    "AuditObject",
    "AuditSink",
    "AuditTrail",
    "EventID",
    "MemoryAuditSink",
    "ObjectKind",
    "Outcome",
    "Participant",
    "Signer",
    "canonical",
    "from_canonical",
    "verify_trail",
]


class AuditSink(Protocol):
    def record(self, *events: AuditEvent, checkpoint: bool = False, durable: bool = True) -> None:
        """Record before returning (synced to disk unless ``durable`` is False: then within a second);
        :class:`AuditError` when that is impossible."""

    def writer(self, events: Sequence[AuditEvent]) -> Callable[[Any], None]:
        """A function that records ``events`` inside an index write transaction it is given (the
        instance row and its audit record commit together, or neither does)."""


class AuditTrail:
    """The audit trail in the index database.

    ``reserve`` (SQLite): the disk space kept for the trail; when a record fails because the disk is
    full, the reserve is released and the record written again, so that reads go on being served and
    recorded (:mod:`safepacs.storage.space`)."""

    def __init__(self, index: SqlIndex, signer: Signer, reserve: AuditReserve | None = None) -> None:
        self._index = index
        self.signer = signer
        self._reserve = reserve

    def record(self, *events: AuditEvent, checkpoint: bool = False, durable: bool = True) -> None:
        if not events:
            return
        try:
            try:
                self._index.append_audit(events, self.signer, checkpoint=checkpoint, durable=durable)
            except SafePacsError as exc:
                if not self._released_for(exc):
                    raise
                self._index.append_audit(events, self.signer, checkpoint=checkpoint, durable=durable)
        except SafePacsError as exc:
            raise AuditError("the audit trail cannot be written; the request is refused") from exc

    def _released_for(self, exc: SafePacsError) -> bool:
        """Whether ``exc`` is a full disk and the reserve gave space back for one more try."""
        from safepacs.storage.space import is_disk_full

        if self._reserve is None or not is_disk_full(exc) or not self._reserve.release():
            return False
        _log.error(
            "the disk is full: the space reserved for the audit trail was released so that accesses "
            "can still be recorded; free disk space now",
            extra={"reserve": str(self._reserve.path)},
        )
        return True

    def writer(self, events: Sequence[AuditEvent]) -> Callable[[Any], None]:
        from safepacs.index.auditlog import append_events  # the index imports audit.chain: not at the top

        signer = self.signer

        def write(conn: Any) -> None:
            try:
                append_events(conn, events, signer)
            except Exception as exc:  # the caller's transaction rolls back; the access is refused
                raise AuditError("the audit trail cannot be written; the request is refused") from exc

        return write


class MemoryAuditSink:
    """Keeps events in a list (``events``): the test double of :class:`AuditTrail`."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self._lock = threading.Lock()
        self.fail = False  # set to make every record() fail, as a broken audit store would

    def record(self, *events: AuditEvent, checkpoint: bool = False, durable: bool = True) -> None:
        if self.fail:
            raise AuditError("the audit trail cannot be written; the request is refused")
        with self._lock:
            self.events.extend(events)

    def writer(self, events: Sequence[AuditEvent]) -> Callable[[Any], None]:
        return lambda _conn: self.record(*events)


def _all_records(index: SqlIndex, batch: int = 5000) -> Iterator[object]:
    after = 0
    while True:
        chunk = index.audit_records(after, batch)
        if not chunk:
            return
        yield from chunk
        after = chunk[-1].seq


def verify_trail(index: SqlIndex, signer: Signer) -> Verification:
    """Check the whole chain and its checkpoints (streamed in batches)."""
    return verify_chain(_all_records(index), index.audit_checkpoints(), signer.public_key)  # type: ignore[arg-type]
