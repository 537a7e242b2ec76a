"""Catching the events an action records, for tests: what a path audits, read back from the trail.

>>> capture = AuditCapture(audit_log)      # remembers where the trail ends now
>>> ...                                    # do something against the archive
>>> [e.event_id for e in capture.events()] # what was recorded since, oldest first

It reads the trail in the database (any process may have written it), so it sees exactly what
``safepacs audit query`` would.
"""

from __future__ import annotations

from safepacs.audit.events import AuditEvent, EventID, from_canonical
from safepacs.db.ports import AuditRecords

__all__ = ["AuditCapture"]


class AuditCapture:
    """The events appended to the audit trail since the capture was made (or last ``reset``)."""

    def __init__(self, audit_log: AuditRecords) -> None:
        self._audit_log = audit_log
        self.start = 0
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded so far: later calls see only newer events."""
        seq = self.start
        while chunk := self._audit_log.audit_records(seq, 5000):
            seq = chunk[-1].seq
        self.start = seq

    def events(self, event_id: EventID | None = None, type_code: str | None = None) -> list[AuditEvent]:
        """The events since the start, oldest first; only those of ``event_id`` / EventTypeCode if given."""
        out: list[AuditEvent] = []
        seq = self.start
        while chunk := self._audit_log.audit_records(seq, 5000):
            out += [from_canonical(r.body) for r in chunk]
            seq = chunk[-1].seq
        return [
            e
            for e in out
            if (event_id is None or e.event_id is event_id)
            and (type_code is None or (e.type_code is not None and e.type_code[0] == type_code))
        ]
