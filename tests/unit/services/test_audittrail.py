"""The audit trail as a sink and its search (services/audittrail.py) over a fake audit log: a full disk
releases the trail's reserve once and the record is written again; a search of the trail is for
auditors only, refused on the record, and itself recorded before its records are returned; a person's
own activity needs no role, holds only what they did, and is recorded alike."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from safepacs.audit import AuditEvent, EventID, ObjectKind, Outcome, Participant, Signer, canonical
from safepacs.audit.chain import StoredRecord
from safepacs.audit.events import Action, AuditFilter
from safepacs.errors import AccessDenied, AuditError, DatabaseError, SafePacsError
from safepacs.services.audit import Auditor, Types
from safepacs.services.audittrail import (
    AUDIT_READERS_ONLY,
    PEOPLE_ONLY,
    AuditSearchService,
    AuditTrail,
    MemoryAuditSink,
)
from safepacs.services.gate import Gate
from safepacs.storage.space import AuditReserve
from safepacs.types import Principal, PrincipalKind, Service
from tests.support.fakes import ARCHIVE_AE, EmptyDirectory, FakeAuditLog, user

EVENT = AuditEvent(EventID.AUDIT_LOG_USED, Action.READ, Outcome.SUCCESS, ())


def disk_full() -> SafePacsError:
    """What the repository raises when the database cannot grow: the driver's ENOSPC as its cause."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise DatabaseError("the index cannot be written") from exc
    except DatabaseError as exc:
        return exc


def trail(tmp_path: Path, log: FakeAuditLog, *, reserved: bool = True) -> tuple[AuditTrail, AuditReserve]:
    reserve = AuditReserve(tmp_path / "index.sqlite3-audit-reserve", 4096)
    assert reserve.ensure() and reserve.held() == 4096
    signer = Signer(Ed25519PrivateKey.generate())
    t = AuditTrail(log, signer, tmp_path / "audit-head", reserve if reserved else None)  # type: ignore[arg-type]
    return t, reserve


def test_the_trail_reports_its_commits_to_the_head_file(tmp_path: Path) -> None:
    log = FakeAuditLog()
    t, _ = trail(tmp_path, log)
    assert log.listener is t.head
    t.record(EVENT)
    assert log.appended == [EVENT]


def test_a_full_disk_releases_the_reserve_once_and_the_record_is_written(tmp_path: Path) -> None:
    log = FakeAuditLog(failures=[disk_full()])
    t, reserve = trail(tmp_path, log)
    t.record(EVENT)
    assert log.appended == [EVENT] and log.attempts == 2
    assert reserve.releases == 1 and reserve.held() == 0


def test_the_disk_still_full_after_the_release_refuses(tmp_path: Path) -> None:
    log = FakeAuditLog(failures=[disk_full(), disk_full()])
    t, reserve = trail(tmp_path, log)
    with pytest.raises(AuditError):
        t.record(EVENT)
    assert log.attempts == 2 and reserve.releases == 1 and log.appended == []


def test_a_released_reserve_is_not_released_again(tmp_path: Path) -> None:
    log = FakeAuditLog(failures=[disk_full()])
    t, reserve = trail(tmp_path, log)
    t.record(EVENT)
    log.failures.append(disk_full())
    with pytest.raises(AuditError):
        t.record(EVENT)
    assert log.attempts == 3 and reserve.releases == 1  # no second try: nothing left to give back


def test_other_failures_keep_the_reserve(tmp_path: Path) -> None:
    log = FakeAuditLog(failures=[DatabaseError("the index is locked")])
    t, reserve = trail(tmp_path, log)
    with pytest.raises(AuditError, match="the request is refused"):
        t.record(EVENT)
    assert log.attempts == 1 and reserve.releases == 0 and reserve.held() == 4096


def test_sqlite_full_counts_as_a_full_disk(tmp_path: Path) -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    error = DatabaseError("the index cannot be written")
    error.__cause__ = full
    log = FakeAuditLog(failures=[error])
    t, reserve = trail(tmp_path, log)
    t.record(EVENT)
    assert reserve.releases == 1 and log.appended == [EVENT]


def test_without_a_reserve_a_full_disk_refuses(tmp_path: Path) -> None:
    log = FakeAuditLog(failures=[disk_full()])
    t, reserve = trail(tmp_path, log, reserved=False)
    with pytest.raises(AuditError):
        t.record(EVENT)
    assert log.attempts == 1 and reserve.held() == 4096


def test_nothing_to_record_touches_nothing(tmp_path: Path) -> None:
    log = FakeAuditLog()
    t, _ = trail(tmp_path, log)
    t.record()
    assert log.attempts == 0


# The search ---------------------------------------------------------------------------------------------
AUDITOR = Principal(
    PrincipalKind.USER, "carol", roles=frozenset({"auditor"}), allow=frozenset({Service.AUDIT}), user="carol"
)


def search_service(log: FakeAuditLog) -> tuple[AuditSearchService, MemoryAuditSink]:
    sink = MemoryAuditSink()
    auditor = Auditor(sink, ARCHIVE_AE)
    return AuditSearchService(log, Gate(EmptyDirectory(), auditor), auditor), sink  # type: ignore[arg-type]


def test_a_non_auditor_is_refused_on_the_record() -> None:
    log = FakeAuditLog()
    service, sink = search_service(log)
    with pytest.raises(AccessDenied, match=AUDIT_READERS_ONLY):
        service.search(user(Service.FIND, Service.GET), AuditFilter(), 10, asked="patient=P1")
    assert log.searches == []
    (event,) = sink.events
    assert (event.event_id, event.outcome) == (EventID.SECURITY_ALERT, Outcome.MINOR_FAILURE)
    assert event.type_code == Types.RESTRICTED_FUNCTION and event.outcome_description == AUDIT_READERS_ONLY
    assert event.participants[0].user_id == "alice"


def test_the_refusal_is_recorded_before_access_denied() -> None:
    log = FakeAuditLog()
    service, sink = search_service(log)
    sink.fail = True
    with pytest.raises(AuditError):
        service.admit(user(Service.FIND))
    assert log.searches == []


def test_a_search_is_recorded_before_its_records_are_returned() -> None:
    records = [StoredRecord(1, "{}", "0" * 64, "1" * 64), StoredRecord(2, "{}", "1" * 64, "2" * 64)]
    log = FakeAuditLog(records=list(records))
    service, sink = search_service(log)
    seen: list[list[EventID]] = []
    log.on_search = lambda: seen.append([e.event_id for e in sink.events])
    where = AuditFilter(patient_id="P1")
    assert service.search(AUDITOR, where, 10, asked="patient=P1") == records
    assert seen == [[EventID.AUDIT_LOG_USED]] and log.searches == [(where, 10)]
    (event,) = sink.events
    assert event.event_id is EventID.AUDIT_LOG_USED and event.participants[0].user_id == "carol"
    (trail_object,) = event.objects
    assert (trail_object.kind, trail_object.query) == (ObjectKind.AUDIT_LOG, "patient=P1")


def test_a_search_that_cannot_be_recorded_returns_nothing() -> None:
    log = FakeAuditLog(records=[StoredRecord(1, "{}", "0" * 64, "1" * 64)])
    service, sink = search_service(log)
    sink.fail = True
    with pytest.raises(AuditError):
        service.search(AUDITOR, AuditFilter(), None, asked="")
    assert log.searches == []


# One's own activity -------------------------------------------------------------------------------------
RAD = Principal(
    PrincipalKind.USER, "rad", roles=frozenset({"radiologist"}), allow=frozenset({Service.GET}), user="rad"
)


def _stored(seq: int, *requestors: Participant) -> StoredRecord:
    event = AuditEvent(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS, requestors)
    return StoredRecord(seq, canonical(event), "0" * 64, "1" * 64)


def test_own_activity_needs_no_role_and_keeps_only_the_persons_own_records() -> None:
    log = FakeAuditLog(
        records=[
            _stored(1, Participant("rad", True, address="10.0.0.1")),  # rad at a browser
            _stored(2, Participant("rad", True, ae_title="rad")),  # a peer whose AE title is "rad"
            _stored(3, Participant("CT1", True, ae_title="CT1", user_name="rad")),  # a peer acting for rad
            _stored(4, Participant("rad", False), Participant("carol", True)),  # rad named, carol acting
        ]
    )
    service, sink = search_service(log)
    seen: list[list[EventID]] = []
    log.on_search = lambda: seen.append([e.event_id for e in sink.events])
    found, older = service.activity(RAD, 10)
    assert [r.seq for r in found] == [3, 1] and older is None  # newest first
    assert seen == [[EventID.AUDIT_LOG_USED]]  # recorded before the trail is read
    assert log.searches == [(AuditFilter(user="rad"), 11)]
    (event,) = sink.events
    assert event.participants[0].user_id == "rad" and event.objects[0].query == "own activity"
    # A page of 2: two records read, one of them rad's; the next page continues before the second.
    found, older = service.activity(RAD, 2)
    assert [r.seq for r in found] == [3] and older == 3
    found, older = service.activity(RAD, 2, before=older)
    assert [r.seq for r in found] == [1] and older is None


def test_only_a_person_has_an_activity_of_their_own() -> None:
    log = FakeAuditLog(records=[_stored(1, Participant("CT1", True, ae_title="CT1"))])
    service, sink = search_service(log)
    peer = Principal(PrincipalKind.PEER, "CT1", allow=frozenset({Service.FIND}))
    with pytest.raises(AccessDenied, match=PEOPLE_ONLY):
        service.activity(peer, 10)
    assert log.searches == [] and [e.event_id for e in sink.events] == [EventID.SECURITY_ALERT]


def test_one_record_is_read_on_the_record_by_auditors_only() -> None:
    log = FakeAuditLog(records=[_stored(1, Participant("rad", True)), _stored(2, Participant("rad", True))])
    service, sink = search_service(log)
    assert service.record(AUDITOR, 2) == log.records[1]
    assert service.record(AUDITOR, 3) is None and service.record(AUDITOR, 0) is None
    assert [e.objects[0].query for e in sink.events] == ["record=2", "record=3", "record=0"]
    with pytest.raises(AccessDenied):
        service.record(RAD, 1)
    with pytest.raises(AuditError, match="cannot verify"):
        service.verify(AUDITOR)  # built without a trail to verify
