"""The audit record model: what an audit record is, how the trail is chained, how it is shown.

* ``events.py``: :class:`~safepacs.audit.events.AuditEvent` (PS3.15 A.5.3), its canonical JSON and
  search keys, and :class:`~safepacs.audit.events.AuditFilter`, a search over those keys;
* ``chain.py``: the hash chain, Ed25519 checkpoints and signed heads, and its verification;
* ``xml.py``: the PS3.15 A.5.1 XML of an event (syslog forwarding);
* ``report.py``: records as the rows ``audit query`` and ``/api/audit`` show.

Pure: nothing here reads the database, the disk or the policy.  Recording events is
:mod:`safepacs.services.audit` (what each access path records) and
:mod:`safepacs.services.audittrail` (the trail in the database); the head file is
:mod:`safepacs.db.headfile`.
"""

from __future__ import annotations

from safepacs.audit.chain import SignedHead, Signer
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

__all__ = [
    "Action",
    "AuditEvent",
    "AuditObject",
    "EventID",
    "ObjectKind",
    "Outcome",
    "Participant",
    "SignedHead",
    "Signer",
    "canonical",
    "from_canonical",
]
