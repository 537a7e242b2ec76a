"""Reading the audit trail: verify it, export its signed head, search it ("who saw this patient?").

Reading the trail is itself recorded (110101 Audit Log Used): before anything is returned, or, for
:meth:`TrailService.verify`, right after the check (so verifying never changes what it verified).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.audit import (
    Action,
    AuditEvent,
    AuditObject,
    EventID,
    ObjectKind,
    Outcome,
    Participant,
    SignedHead,
)
from safepacs.audit.chain import StoredRecord, Verification
from safepacs.services.audittrail import AuditTrail, verify_trail

if TYPE_CHECKING:
    from safepacs.audit.events import AuditFilter
    from safepacs.db.ports import AuditLog

__all__ = ["TrailService"]


class TrailService:
    """The audit trail of one database, read by ``reader`` (see the module docstring)."""

    def __init__(self, audit_log: AuditLog, trail: AuditTrail, head_file: Path) -> None:
        self._audit_log = audit_log
        self._trail = trail
        self._head_file = head_file

    def _used(self, reader: Participant, operation: str, query: str | None = None) -> None:
        self._trail.record(
            AuditEvent(
                EventID.AUDIT_LOG_USED,
                Action.READ,
                Outcome.SUCCESS,
                (reader,),
                (
                    AuditObject(
                        ObjectKind.AUDIT_LOG,
                        "safepacs-audit-trail",
                        query=query,
                        detail=(("operation", operation),),
                    ),
                ),
            )
        )

    def export_head(self, reader: Participant) -> SignedHead | None:
        """The signed head of the trail, recorded first so that it covers its own export (None: the
        trail is empty)."""
        self._used(reader, "head")
        head = self._audit_log.audit_head()
        return None if head is None else self._trail.signer.head(*head)

    def verify(self, reader: Participant, against: Sequence[SignedHead] = ()) -> Verification:
        """Check the chain, its checkpoints, search keys and signed heads (``against``: exported earlier)."""
        result = verify_trail(self._audit_log, self._trail.signer, self._head_file, against)
        self._used(reader, "verify")
        return result

    def search(
        self, reader: Participant, operation: str, where: AuditFilter, asked: str | None
    ) -> list[StoredRecord]:
        """The records matching ``where`` (``asked``: the filters as the reader gave them)."""
        self._used(reader, operation, asked)
        return self._audit_log.search_audit(where)
