"""The audit trail: who touched which patient's data, when, from where, on what device.

:class:`AuditTrail` records :class:`~safepacs.audit.events.AuditEvent` values durably in the index
database, hash-chained and checkpointed (``audit/chain.py``), *before* the response they describe
is sent; when it cannot, it raises :class:`~safepacs.errors.AuditError` and the caller refuses the
access.  The signed head of the chain is kept outside the index, in the head file
(``db/headfile.py``).  :class:`MemoryAuditSink` is the in-memory stand-in that tests use.
:func:`verify_trail` checks the whole trail; :class:`AuditSearchService` is the trail's search for
the adapters (``/api/audit``): the policy, then the record of the search, then the records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepacs.audit.chain import SignedHead, Signer, Verification, verify_chain
from safepacs.audit.events import AuditEvent, AuditFilter
from safepacs.auth.policy import decide
from safepacs.db.auditlog import append_events
from safepacs.db.headfile import HeadFile, read_head_lines
from safepacs.db.ports import AuditLog
from safepacs.errors import AccessDenied, AuditError, DataDirError, SafePacsError
from safepacs.services.audit import Auditor, actor
from safepacs.services.gate import Gate
from safepacs.storage.space import is_disk_full
from safepacs.types import Principal, Service

if TYPE_CHECKING:
    from safepacs.audit.chain import StoredRecord
    from safepacs.storage.space import AuditReserve

_log = logging.getLogger(__name__)

__all__ = ["AuditSearchService", "AuditTrail", "MemoryAuditSink", "verify_trail"]


class AuditTrail:
    """The audit trail in the index database; its signed head in ``head_file`` (the data directory's
    ``audit-head``), written after each commit that appends to it (``db/headfile.py``).

    ``reserve`` (SQLite): the disk space kept for the trail; when a record fails because the disk is
    full, the reserve is released and the record written again, so that reads go on being served and
    recorded (:mod:`safepacs.storage.space`)."""

    def __init__(
        self, audit_log: AuditLog, signer: Signer, head_file: Path, reserve: AuditReserve | None = None
    ) -> None:
        self._audit_log = audit_log
        self.signer = signer
        self._reserve = reserve
        self.head = HeadFile(head_file, signer, audit_log)
        audit_log.set_audit_listener(self.head)

    def record(self, *events: AuditEvent, checkpoint: bool = False, durable: bool = True) -> None:
        if not events:
            return
        try:
            try:
                self._audit_log.append_audit(events, self.signer, checkpoint=checkpoint, durable=durable)
            except SafePacsError as exc:
                if not self._released_for(exc):
                    raise
                self._audit_log.append_audit(events, self.signer, checkpoint=checkpoint, durable=durable)
        except SafePacsError as exc:
            raise AuditError("the audit trail cannot be written; the request is refused") from exc

    def _released_for(self, exc: SafePacsError) -> bool:
        """Whether ``exc`` is a full disk and the reserve gave space back for one more try."""
        if self._reserve is None or not is_disk_full(exc) or not self._reserve.release():
            return False
        _log.error(
            "the disk is full: the space reserved for the audit trail was released so that accesses "
            "can still be recorded; free disk space now",
            extra={"reserve": str(self._reserve.path)},
        )
        return True

    def writer(self, events: Sequence[AuditEvent]) -> Callable[[Any], None]:
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


def verify_trail(
    audit_log: AuditLog,
    signer: Signer,
    head_file: Path,
    against: Sequence[SignedHead] = (),
    *,
    now: datetime | None = None,
) -> Verification:
    """Check the whole chain, its checkpoints, the columns and search keys searches use, the signed
    head file and the heads in ``against`` (exported earlier), streamed in one read transaction.
    ``now``: the time records that no signed head names yet are judged by (default: now)."""
    try:
        return _verify(audit_log, signer, head_file, against, now)
    except OSError as exc:
        raise DataDirError(
            f"the audit head file {head_file} cannot be read ({exc.strerror or type(exc).__name__})"
        ) from exc


def _verify(
    audit_log: AuditLog, signer: Signer, head_file: Path, against: Sequence[SignedHead], now: datetime | None
) -> Verification:
    try:
        size: int | None = head_file.stat().st_size  # before the snapshot: every line read names a
    except FileNotFoundError:  # record that the snapshot holds (a head follows its record's commit)
        size = None
    with audit_log.audit_snapshot() as snapshot:
        checkpoints, holdings = snapshot.checkpoints(), snapshot.holdings()
        heads = None if size is None else read_head_lines(head_file, size)
        with closing(snapshot.rows()) as rows, closing(snapshot.refs()) as refs:
            try:
                return verify_chain(
                    rows,
                    checkpoints,
                    signer.public_key,
                    refs=refs,
                    heads=heads,
                    against=against,
                    holdings=holdings,
                    now=now,
                )
            finally:
                if heads is not None:
                    heads.close()


#: Why a search of the trail is refused (the Security Alert's description).
AUDIT_READERS_ONLY = "reading the audit trail needs the auditor or admin role"


class AuditSearchService:
    """The trail's search for the adapters (``GET /api/audit``): auditors and administrators only, each
    search itself recorded (110101 Audit Log Used) before its records are returned."""

    def __init__(self, audit_log: AuditLog, gate: Gate, auditor: Auditor) -> None:
        self._audit_log = audit_log
        self._gate = gate
        self._audit = auditor

    def admit(self, principal: Principal) -> None:
        """:class:`~safepacs.errors.AccessDenied` (the refusal recorded first) unless ``principal`` may
        read the trail."""
        if not decide(principal, Service.AUDIT):
            self._gate.refused(principal, AUDIT_READERS_ONLY)
            raise AccessDenied(AUDIT_READERS_ONLY)

    def search(
        self, principal: Principal, where: AuditFilter, limit: int | None, *, asked: str
    ) -> list[StoredRecord]:
        """The records matching ``where`` (at most ``limit``), oldest first; ``asked``: the search as
        the requestor put it, for the record of the search."""
        self.admit(principal)
        self._audit.audit_used(actor(principal), asked)
        return self._audit_log.search_audit(where, limit)
