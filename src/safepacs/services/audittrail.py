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
from safepacs.audit.events import AuditEvent, AuditFilter, from_canonical
from safepacs.auth.policy import decide
from safepacs.db.auditlog import append_events
from safepacs.db.headfile import HeadFile, read_head_lines
from safepacs.db.ports import AuditLog
from safepacs.errors import AccessDenied, AuditError, DataDirError, SafePacsError
from safepacs.services.audit import Auditor, actor
from safepacs.services.gate import Gate
from safepacs.storage.space import is_disk_full
from safepacs.types import Principal, PrincipalKind, Service

if TYPE_CHECKING:
    from safepacs.audit.chain import StoredRecord
    from safepacs.storage.space import AuditReserve

_log = logging.getLogger(__name__)

__all__ = [
    "AUDIT_READERS_ONLY",
    "PEOPLE_ONLY",
    "AuditSearchService",
    "AuditTrail",
    "MemoryAuditSink",
    "verify_trail",
]


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
#: Why a principal that is not a person is refused its own activity.
PEOPLE_ONLY = "only a signed-in person has an activity of their own"


class AuditSearchService:
    """The trail's search for the adapters (``GET /api/audit``, the web UI's audit pages): auditors
    and administrators only, each search itself recorded (110101 Audit Log Used) before its records
    are returned.  A person's own activity (:meth:`activity`) needs no role, and is recorded alike.

    ``trail``: the trail whose chain :meth:`verify` checks (None: not offered)."""

    def __init__(
        self, audit_log: AuditLog, gate: Gate, auditor: Auditor, trail: AuditTrail | None = None
    ) -> None:
        self._audit_log = audit_log
        self._gate = gate
        self._audit = auditor
        self._trail = trail

    def admit(self, principal: Principal) -> None:
        """:class:`~safepacs.errors.AccessDenied` (the refusal recorded first) unless ``principal`` may
        read the trail."""
        if not decide(principal, Service.AUDIT):
            self._gate.refused(principal, AUDIT_READERS_ONLY)
            raise AccessDenied(AUDIT_READERS_ONLY)

    def search(
        self,
        principal: Principal,
        where: AuditFilter,
        limit: int | None,
        *,
        asked: str,
        before: int | None = None,
        newest_first: bool = False,
    ) -> list[StoredRecord]:
        """The records matching ``where`` (at most ``limit``), oldest first (``newest_first``: newest
        first; ``before``: before that sequence number); ``asked``: the search as the requestor put
        it, for the record of the search."""
        self.admit(principal)
        self._audit.audit_used(actor(principal), asked)
        return self._audit_log.search_audit(where, limit, before=before, newest_first=newest_first)

    def record(self, principal: Principal, seq: int) -> StoredRecord | None:
        """Record ``seq`` of the trail (None: there is none), its reading recorded first."""
        self.admit(principal)
        self._audit.audit_used(actor(principal), f"record={seq}")
        found = self._audit_log.audit_records(seq - 1, 1) if seq > 0 else []
        return found[0] if found and found[0].seq == seq else None

    def verify(self, principal: Principal) -> Verification:
        """The whole trail checked as ``safepacs audit verify`` checks it (chain, checkpoints, search
        keys, the signed head file), the check recorded right after it, as the CLI's is (so that it
        never changes what it verified)."""
        self.admit(principal)
        if self._trail is None:
            raise AuditError("this process cannot verify the audit trail")
        result = verify_trail(self._audit_log, self._trail.signer, self._trail.head.path)
        self._audit.audit_used(actor(principal), "verify")
        return result

    def activity(
        self, principal: Principal, limit: int, *, before: int | None = None
    ) -> tuple[list[StoredRecord], int | None]:
        """A person's own records on the trail, newest first: those where they acted, by their user
        name (not a peer whose AE title happens to be the same; a peer acting for them is theirs), at
        most ``limit``; and the sequence number to continue before (None: no more).  Reading it is
        recorded first, as every reading of the trail is (so it shows on the page it lists)."""
        name = principal.user or principal.name
        if principal.kind is not PrincipalKind.USER or not name:
            self._gate.refused(principal, PEOPLE_ONLY)
            raise AccessDenied(PEOPLE_ONLY)
        self._audit.audit_used(actor(principal), "own activity")
        found = self._audit_log.search_audit(
            AuditFilter(user=name), limit + 1, before=before, newest_first=True
        )
        page = found[:limit]
        mine = [r for r in page if _acted(from_canonical(r.body), name)]
        return mine, (page[-1].seq if len(found) > limit else None)


def _acted(event: AuditEvent, name: str) -> bool:
    """Whether the person ``name`` acted in ``event``: as the user requesting it, or as the person
    behind the peer requesting it."""
    return any(
        p.requestor and ((p.user_id == name and p.ae_title is None) or p.user_name == name)
        for p in event.participants
    )
