"""The one retrieve path (services/retrieve.py) over a fake index and the in-memory blob store and
cipher: what is located for whom, what is recorded before anything is handed out, and that altered,
replaced or missing stored objects are never sent and always recorded."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from safepacs.audit import EventID, ObjectKind, Outcome, Participant
from safepacs.errors import AccessDenied, AuditError, IntegrityError, QueryError
from safepacs.services.retrieve import NOTHING_FOUND, RetrieveService
from safepacs.types import QueryLevel, QueryModel, Scope, Service
from tests.support.fakes import CT_IMAGE, MR_IMAGE, Archive, archive, peer, user

STUDY = "1.2.826.0.1.1"
OTHER = "1.2.826.0.1.2"


def service(a: Archive) -> RetrieveService:
    return RetrieveService(a.index, a.blobs, a.cipher, a.audit, a.gate)  # type: ignore[arg-type]


def ident(level: str = "STUDY", **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def locate(a: Archive, principal: object = None, **kwargs: object) -> list[object]:
    return service(a).locate(  # type: ignore[return-value]
        principal or peer(Service.GET),  # type: ignore[arg-type]
        Service.GET,
        QueryModel.STUDY_ROOT,
        QueryLevel.STUDY,
        ident(StudyInstanceUID=STUDY),
        **kwargs,  # type: ignore[arg-type]
    )


def test_located_instances_are_recorded_per_study_with_patient_and_counts() -> None:
    a = archive()
    refs = [a.instance(STUDY), a.instance(STUDY), a.instance(STUDY, sop_class=MR_IMAGE)]
    a.instance(OTHER)
    assert locate(a) == refs
    (event,) = a.events
    assert (event.event_id, event.outcome) == (EventID.INSTANCES_TRANSFERRED, Outcome.SUCCESS)
    patient, study = event.objects
    assert (patient.kind, patient.id, patient.name) == (ObjectKind.PATIENT, "P1", "Doe^Jane")
    assert (study.kind, study.id) == (ObjectKind.STUDY, STUDY)
    assert dict(study.sop_classes) == {CT_IMAGE: 2, MR_IMAGE: 1}
    archive_side, requestor = event.participants
    assert not archive_side.requestor and requestor.requestor and requestor.user_id == "MODALITY1"


def test_a_move_names_its_destination_and_the_event_asked_for() -> None:
    a = archive()
    a.instance(STUDY)
    dest = Participant("WORKSTATION", requestor=False, ae_title="WORKSTATION")
    service(a).locate(
        peer(Service.MOVE),
        Service.MOVE,
        QueryModel.STUDY_ROOT,
        QueryLevel.STUDY,
        ident(StudyInstanceUID=STUDY),
        event=EventID.BEGIN_TRANSFERRING,
        destination=dest,
    )
    (event,) = a.events
    assert event.event_id == EventID.BEGIN_TRANSFERRING
    assert dest in event.participants and len(event.participants) == 3


def test_nothing_found_is_recorded_as_a_failure_naming_the_study_asked_for() -> None:
    a = archive()
    assert locate(a) == []
    (event,) = a.events
    assert (event.outcome, event.outcome_description) == (Outcome.MINOR_FAILURE, NOTHING_FOUND)
    assert [(o.kind, o.id) for o in event.objects] == [(ObjectKind.STUDY, STUDY)]


@pytest.mark.parametrize("asked", [["1.2.3", "1.2.4"], "", "9" * 65])
def test_a_failed_retrieve_names_no_study_unless_one_plain_uid_was_asked(asked: object) -> None:
    a = archive()
    service(a).locate(
        peer(Service.GET), Service.GET, QueryModel.STUDY_ROOT, QueryLevel.STUDY, ident(StudyInstanceUID=asked)
    )
    (event,) = a.events
    assert event.objects == () and event.outcome == Outcome.MINOR_FAILURE


def test_studies_outside_the_principals_scope_do_not_exist_for_it() -> None:
    a = archive()
    a.instance(STUDY)
    a.index.visible = {OTHER}
    scoped = user(Service.GET, scope=Scope(groups=frozenset({"research"})))
    assert locate(a, scoped) == []
    assert a.index.called("instances_for")[0]["scope"] == scoped.scope
    assert a.events[0].outcome_description == NOTHING_FOUND


def test_a_principal_without_the_service_is_refused_before_the_index_is_asked() -> None:
    a = archive()
    a.instance(STUDY)
    with pytest.raises(AccessDenied):
        locate(a, peer(Service.FIND))
    assert a.index.calls == []
    assert [e.event_id for e in a.events] == [EventID.SECURITY_ALERT]


def test_a_malformed_identifier_is_recorded_and_raised() -> None:
    a = archive()
    a.index.error = QueryError("a retrieve at the STUDY level needs a value for StudyInstanceUID")
    with pytest.raises(QueryError):
        locate(a)
    (event,) = a.events
    assert event.outcome == Outcome.MINOR_FAILURE and "needs a value" in (event.outcome_description or "")


def test_record_false_leaves_the_record_to_the_caller() -> None:
    a = archive()
    refs = [a.instance(STUDY)]
    assert locate(a, record=False) == refs
    assert a.events == []
    service(a).record(peer(Service.GET), refs, EventID.INSTANCES_ACCESSED)
    assert [e.event_id for e in a.events] == [EventID.INSTANCES_ACCESSED]


def test_with_recording_off_the_patients_are_not_even_looked_up() -> None:
    a = archive(audit_enabled=False)
    a.instance(STUDY)
    locate(a)
    assert a.events == [] and a.index.called("study_patients") == []


def test_nothing_is_handed_out_when_the_retrieval_cannot_be_recorded() -> None:
    a = archive()
    a.instance(STUDY)
    a.sink.fail = True
    with pytest.raises(AuditError):
        locate(a)


# Reading -------------------------------------------------------------------------------------------
def test_read_gives_back_the_stored_bytes() -> None:
    a = archive()
    ref = a.instance(STUDY, sop_uid="1.2.826.0.1.1.1")
    data = service(a).read(ref)
    assert data[128:132] == b"DICM" and b"1.2.826.0.1.1.1" in data


def test_an_object_stored_before_tags_were_recorded_is_checked_by_its_sha256() -> None:
    a = archive()
    ref = a.instance(STUDY, tagged=False)
    assert ref.blob.seal_tag is None
    assert service(a).read(ref)[128:132] == b"DICM"


def test_another_intact_object_in_an_instances_place_is_refused() -> None:
    a = archive()
    mine, theirs = a.instance(STUDY), a.instance(OTHER)
    a.overwrite(mine.blob.blob_id, a.blobs.get(theirs.blob.blob_id))  # swapped on disk
    with pytest.raises(IntegrityError, match="not the one its index record names"):
        service(a).read(mine)


def test_an_untagged_object_swapped_for_another_fails_its_sha256() -> None:
    a = archive()
    mine, theirs = a.instance(STUDY, tagged=False), a.instance(OTHER, tagged=False)
    a.overwrite(mine.blob.blob_id, a.blobs.get(theirs.blob.blob_id))
    with pytest.raises(IntegrityError, match="does not match its recorded SHA-256"):
        service(a).read(mine)


def test_an_altered_byte_is_refused() -> None:
    a = archive()
    ref = a.instance(STUDY)
    sealed = bytearray(a.blobs.get(ref.blob.blob_id))
    sealed[len(sealed) // 2] ^= 1
    a.overwrite(ref.blob.blob_id, bytes(sealed))
    with pytest.raises(IntegrityError):
        service(a).read(ref)


def test_a_missing_object_is_an_integrity_failure() -> None:
    a = archive()
    ref = a.instance(STUDY)
    a.blobs.delete(ref.blob.blob_id)
    with pytest.raises(IntegrityError, match="missing from the object store"):
        service(a).read(ref)


def test_fetch_records_a_damaged_object_before_raising() -> None:
    a = archive()
    ref = a.instance(STUDY, patient_id="P7", patient_name="Roe^Ann")
    a.blobs.delete(ref.blob.blob_id)
    with pytest.raises(IntegrityError):
        service(a).fetch(user(Service.GET), ref, EventID.INSTANCES_TRANSFERRED)
    alert, failed = a.events
    assert (alert.event_id, alert.outcome) == (EventID.SECURITY_ALERT, Outcome.SERIOUS_FAILURE)
    assert (failed.event_id, failed.outcome) == (EventID.INSTANCES_TRANSFERRED, Outcome.SERIOUS_FAILURE)
    study = next(o for o in alert.objects if o.kind is ObjectKind.STUDY)
    assert ("SOP Instance UID", ref.sop_instance_uid) in study.detail
    assert next(o for o in alert.objects if o.kind is ObjectKind.PATIENT).id == "P7"


# A retrieval of several instances ------------------------------------------------------------------
def test_a_retrieval_reads_the_first_instance_once_and_records_all() -> None:
    a = archive()
    refs = [a.instance(STUDY), a.instance(STUDY)]
    svc = service(a)
    retrieval = svc.begin(peer(Service.GET), refs, EventID.INSTANCES_TRANSFERRED)
    a.blobs.delete(refs[0].blob.blob_id)  # read already: still handed out
    retrieval.record()
    assert retrieval.first_error is None
    assert retrieval.read(refs[0])[128:132] == b"DICM"
    assert retrieval.read(refs[1])[128:132] == b"DICM"
    with pytest.raises(IntegrityError):
        retrieval.read(refs[0])  # handed out once: read afresh the second time, and now it is gone
    (sent, alert, failed) = a.events
    assert sent.event_id == EventID.INSTANCES_TRANSFERRED and sent.outcome == Outcome.SUCCESS
    assert dict(next(o for o in sent.objects if o.kind is ObjectKind.STUDY).sop_classes) == {CT_IMAGE: 2}
    assert alert.event_id == EventID.SECURITY_ALERT and failed.outcome == Outcome.SERIOUS_FAILURE


def test_a_damaged_first_instance_is_recorded_not_counted_as_sent_and_raised_when_read() -> None:
    a = archive()
    refs = [a.instance(STUDY), a.instance(STUDY), a.instance(STUDY)]
    a.blobs.delete(refs[0].blob.blob_id)
    retrieval = service(a).begin(peer(Service.GET), refs, EventID.INSTANCES_TRANSFERRED)
    assert isinstance(retrieval.first_error, IntegrityError)
    assert [e.event_id for e in a.events] == [EventID.SECURITY_ALERT, EventID.INSTANCES_TRANSFERRED]
    retrieval.record()
    sent = a.events[-1]
    assert sent.outcome == Outcome.SUCCESS
    assert dict(next(o for o in sent.objects if o.kind is ObjectKind.STUDY).sop_classes) == {CT_IMAGE: 2}
    with pytest.raises(IntegrityError):
        retrieval.read(refs[0])


def test_a_retrieval_of_one_damaged_instance_records_nothing_as_sent() -> None:
    a = archive()
    (ref,) = [a.instance(STUDY)]
    a.blobs.delete(ref.blob.blob_id)
    retrieval = service(a).begin(peer(Service.GET), [ref], EventID.INSTANCES_TRANSFERRED)
    count = len(a.events)
    retrieval.record()
    assert len(a.events) == count


def test_when_not_even_the_damage_can_be_recorded_the_retrieval_is_refused() -> None:
    a = archive()
    ref = a.instance(STUDY)
    a.blobs.delete(ref.blob.blob_id)
    a.sink.fail = True
    with pytest.raises(AuditError):
        service(a).begin(peer(Service.GET), [ref], EventID.INSTANCES_TRANSFERRED)


def test_an_empty_retrieval_reads_and_records_nothing() -> None:
    a = archive()
    retrieval = service(a).begin(peer(Service.GET), [], EventID.INSTANCES_TRANSFERRED)
    retrieval.record()
    assert retrieval.refs == [] and retrieval.first_error is None and a.events == []
