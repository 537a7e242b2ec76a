"""The one delete path (services/delete.py) over a fake index: soft delete of a study, series or
instance with its record in the same transaction, and the purge that destroys bytes after retention
(recorded first, never the bytes of a live instance)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from safepacs.audit import EventID, ObjectKind, Outcome, Participant
from safepacs.errors import AccessDenied, AuditError, NotFoundError
from safepacs.services.delete import DeleteService, PurgeReport
from safepacs.types import InstanceRef, QueryLevel, Scope, Service
from tests.support.fakes import CT_IMAGE, Archive, archive, user

STUDY = "1.2.826.0.2.1"
SERIES = "1.2.826.0.2.1.1"
OTHER_SERIES = "1.2.826.0.2.1.2"
RETENTION = timedelta(days=30)


def service(a: Archive) -> DeleteService:
    return DeleteService(a.index, a.blobs, a.audit, a.gate, retention=RETENTION)  # type: ignore[arg-type]


def stored(a: Archive) -> list[InstanceRef]:
    return [
        a.instance(STUDY, SERIES, "1.2.826.0.2.1.1.1"),
        a.instance(STUDY, SERIES, "1.2.826.0.2.1.1.2"),
        a.instance(STUDY, OTHER_SERIES, "1.2.826.0.2.1.2.1"),
    ]


def test_deleting_a_study_moves_all_its_instances_to_the_trash() -> None:
    a = archive()
    stored(a)
    before = datetime.now(UTC)
    assert service(a).delete(user(Service.DELETE), STUDY) == 3
    assert a.index.instances == []
    assert {r.sop_instance_uid for r in a.index.trash} == {
        "1.2.826.0.2.1.1.1",
        "1.2.826.0.2.1.1.2",
        "1.2.826.0.2.1.2.1",
    }
    assert len(a.blobs) == 3  # the bytes are kept until the purge
    (call,) = a.index.called("trash_instances")
    assert call["by"] == "alice"
    assert before + RETENTION <= call["purge_after"] <= datetime.now(UTC) + RETENTION
    assert a.index.called("instances_for")[0]["level"] is QueryLevel.STUDY


def test_the_deletion_is_recorded_in_its_transaction_with_patient_and_counts() -> None:
    a = archive()
    stored(a)
    service(a).delete(user(Service.DELETE), STUDY)
    (event,) = a.events
    assert (event.event_id, event.outcome) == (EventID.STUDY_DELETED, Outcome.SUCCESS)
    assert event.participants[0].user_id == "alice" and event.participants[0].requestor
    patient, study = event.objects
    assert (patient.kind, patient.id) == (ObjectKind.PATIENT, "P1")
    assert (study.id, study.sop_classes) == (STUDY, ((CT_IMAGE, 3),))
    purge = (datetime.now(UTC) + RETENTION).strftime("%Y-%m-%d")
    assert event.outcome_description in {
        f"moved to the trash; destroyed after {purge}",
        # just past midnight between the deletion and this line
        f"moved to the trash; destroyed after {(datetime.now(UTC) + RETENTION - timedelta(days=1)):%Y-%m-%d}",
    }


def test_a_series_or_one_instance_can_be_deleted_alone() -> None:
    a = archive()
    stored(a)
    assert service(a).delete(user(Service.DELETE), STUDY, SERIES) == 2
    assert a.index.called("instances_for")[-1]["level"] is QueryLevel.SERIES
    assert service(a).delete(user(Service.DELETE), STUDY, OTHER_SERIES, "1.2.826.0.2.1.2.1") == 1
    assert a.index.called("instances_for")[-1]["level"] is QueryLevel.IMAGE
    assert a.index.instances == []


def test_nothing_there_is_not_found_and_nothing_is_recorded_or_moved() -> None:
    a = archive()
    stored(a)
    with pytest.raises(NotFoundError, match="no such resource"):
        service(a).delete(user(Service.DELETE), "1.2.999")
    with pytest.raises(NotFoundError):
        service(a).delete(user(Service.DELETE), STUDY, "1.2.999")
    assert a.events == [] and a.index.called("trash_instances") == []


def test_a_study_outside_the_scope_is_not_found_rather_than_refused() -> None:
    a = archive()
    stored(a)
    a.index.visible = set()
    with pytest.raises(NotFoundError):
        service(a).delete(user(Service.DELETE, scope=Scope(modalities=frozenset({"MR"}))), STUDY)
    assert len(a.index.instances) == 3


def test_a_user_without_delete_is_refused_and_the_refusal_recorded() -> None:
    a = archive()
    stored(a)
    with pytest.raises(AccessDenied, match="not allowed to use delete"):
        service(a).delete(user(Service.GET, Service.FIND), STUDY)
    assert a.index.calls == [] and [e.event_id for e in a.events] == [EventID.SECURITY_ALERT]


def test_nothing_is_deleted_when_the_deletion_cannot_be_recorded() -> None:
    a = archive()
    stored(a)
    a.sink.fail = True
    with pytest.raises(AuditError):
        service(a).delete(user(Service.DELETE), STUDY)


# Purge ---------------------------------------------------------------------------------------------
def test_purge_destroys_only_what_is_due_and_records_it_first() -> None:
    a = archive()
    stored(a)
    svc = service(a)
    svc.delete(user(Service.DELETE), STUDY, SERIES)
    assert svc.purge() == PurgeReport(0, 0)  # retention not over
    assert len(a.events) == 1
    later = datetime.now(UTC) + RETENTION + timedelta(minutes=1)
    sizes = sum(r.blob.size for r in a.index.trash)
    report = svc.purge(now=later)
    assert report == PurgeReport(2, sizes)
    assert a.index.trash == [] and len(a.blobs) == 1
    purge = a.events[-1]
    assert (purge.event_id, purge.outcome) == (EventID.STUDY_DELETED, Outcome.SUCCESS)
    assert purge.outcome_description == "2 instances destroyed from the trash after the retention period"
    assert [p.user_id for p in purge.participants] == ["SAFEPACS"]  # the archive's own purge
    assert [(o.kind, o.id) for o in purge.objects] == [(ObjectKind.STUDY, STUDY)]


def test_purge_everything_names_who_asked() -> None:
    a = archive()
    stored(a)
    svc = service(a)
    svc.delete(user(Service.DELETE), STUDY)
    admin = Participant("root", requestor=True, user_agent="safepacs purge")
    assert svc.purge(everything=True, who=admin).instances == 3
    purge = a.events[-1]
    assert purge.outcome_description == "3 instances destroyed from the trash"
    assert purge.participants[0] == admin
    assert len(a.blobs) == 0


def test_purge_never_destroys_the_bytes_of_a_live_instance() -> None:
    a = archive()
    (first, *_) = stored(a)
    svc = service(a)
    svc.delete(user(Service.DELETE), STUDY, SERIES, first.sop_instance_uid)
    a.index.add(first)  # stored again with the same bytes (deduplicated to the same blob)
    assert svc.purge(everything=True).instances == 1
    assert a.index.trash == []
    assert a.blobs.exists(first.blob.blob_id)


def test_nothing_is_destroyed_when_the_purge_cannot_be_recorded() -> None:
    a = archive()
    stored(a)
    svc = service(a)
    svc.delete(user(Service.DELETE), STUDY)
    a.sink.fail = True
    with pytest.raises(AuditError):
        svc.purge(everything=True)
    assert len(a.index.trash) == 3 and len(a.blobs) == 3


def test_an_empty_trash_is_purged_without_a_record() -> None:
    a = archive()
    assert service(a).purge(everything=True) == PurgeReport(0, 0)
    assert a.events == []


def test_the_reason_given_ends_the_deletions_record_on_one_line() -> None:
    a = archive()
    stored(a)
    service(a).delete(user(Service.DELETE), STUDY, reason="  wrong patient,\n sent again ")
    (event,) = a.events
    assert event.outcome_description is not None
    assert event.outcome_description.startswith("moved to the trash; destroyed after ")
    assert event.outcome_description.endswith("; reason: wrong patient, sent again")
    b = archive()
    stored(b)
    service(b).delete(user(Service.DELETE), STUDY, reason=" ")  # a blank reason is none
    assert "reason" not in (b.events[0].outcome_description or "")
