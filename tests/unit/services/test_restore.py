"""Undoing a deletion (services/restore.py) over a fake index: every trashed object of the study is
checked before anything changes, the restoration is recorded first, and an instance stored again since
stays in the trash."""

from __future__ import annotations

from datetime import timedelta

import pytest

from safepacs.audit import Action, EventID, ObjectKind, Outcome, Participant
from safepacs.errors import AuditError, IntegrityError, NotFoundError
from safepacs.services.delete import DeleteService
from safepacs.services.restore import RestoreReport, RestoreService
from safepacs.types import Service
from tests.support.fakes import CT_IMAGE, MR_IMAGE, Archive, archive, user

STUDY = "1.2.826.0.3.1"
OTHER = "1.2.826.0.3.2"
ADMIN = Participant("root", requestor=True, user_agent="safepacs restore")


def service(a: Archive) -> RestoreService:
    return RestoreService(a.index, a.blobs, a.cipher, a.audit)  # type: ignore[arg-type]


def deleted(a: Archive) -> None:
    a.instance(STUDY, sop_uid="1.2.826.0.3.1.1", patient_id="P9", patient_name="Roe^Ann")
    a.instance(STUDY, sop_uid="1.2.826.0.3.1.2", sop_class=MR_IMAGE, patient_id="P9", patient_name="Roe^Ann")
    a.instance(OTHER)
    deleter = DeleteService(a.index, a.blobs, a.audit, a.gate, retention=timedelta(days=1))  # type: ignore[arg-type]
    deleter.delete(user(Service.DELETE), STUDY)
    deleter.delete(user(Service.DELETE), OTHER)
    del a.events[:]


def test_a_study_comes_back_from_the_trash_with_its_bytes() -> None:
    a = archive()
    deleted(a)
    assert service(a).restore(STUDY, ADMIN) == RestoreReport(restored=2, kept=0)
    assert {s.ref.sop_instance_uid for s in a.index.instances} == {"1.2.826.0.3.1.1", "1.2.826.0.3.1.2"}
    assert [r.study_instance_uid for r in a.index.trash] == [OTHER]  # other studies stay deleted


def test_the_restoration_is_recorded_with_the_patient_and_every_sop_class() -> None:
    a = archive()
    deleted(a)
    service(a).restore(STUDY, ADMIN)
    (event,) = a.events
    assert (event.event_id, event.action, event.outcome) == (
        EventID.INSTANCES_ACCESSED,
        Action.UPDATE,
        Outcome.SUCCESS,
    )
    assert event.outcome_description == "restored from the trash"
    assert event.participants[0] == ADMIN
    patient, study = event.objects
    assert (patient.id, patient.name) == ("P9", "Roe^Ann")
    assert dict(study.sop_classes) == {CT_IMAGE: 1, MR_IMAGE: 1}


def test_an_instance_stored_again_since_stays_in_the_trash() -> None:
    a = archive()
    deleted(a)
    a.index.restorable = False
    assert service(a).restore(STUDY, ADMIN) == RestoreReport(restored=0, kept=2)
    assert len(a.index.trash) == 3


def test_a_study_not_in_the_trash_is_not_found() -> None:
    a = archive()
    deleted(a)
    with pytest.raises(NotFoundError, match=r"no deleted instance of study 1\.2\.999 is in the trash"):
        service(a).restore("1.2.999", ADMIN)
    assert a.events == []


def test_one_altered_object_stops_the_whole_restoration_before_anything_changes() -> None:
    a = archive()
    deleted(a)
    second = next(r for r in a.index.trash if r.sop_instance_uid == "1.2.826.0.3.1.2")
    a.overwrite(second.blob.blob_id, a.cipher.seal(b"\0" * 132))  # intact, but other bytes
    with pytest.raises(IntegrityError, match="does not match its recorded SHA-256; it was not restored"):
        service(a).restore(STUDY, ADMIN)
    assert a.index.called("restore_from_trash") == [] and a.events == []
    assert len(a.index.trash) == 3


def test_nothing_is_restored_when_it_cannot_be_recorded() -> None:
    a = archive()
    deleted(a)
    a.sink.fail = True
    with pytest.raises(AuditError):
        service(a).restore(STUDY, ADMIN)
    assert a.index.called("restore_from_trash") == []


def test_the_index_gets_each_objects_own_header() -> None:
    a = archive()
    deleted(a)
    service(a).restore(STUDY, ADMIN)
    assert sorted(c["sop"] for c in a.index.called("restore_from_trash")) == [
        "1.2.826.0.3.1.1",
        "1.2.826.0.3.1.2",
    ]
    assert all(o.kind is not ObjectKind.QUERY for o in a.sink.events[0].objects)


def test_the_trash_lists_what_can_be_restored_and_the_reason_is_recorded() -> None:
    a = archive()
    deleted(a)
    assert {r.study_instance_uid for r in service(a).trash()} == {STUDY, OTHER}
    service(a).restore(STUDY, ADMIN, reason="deleted by mistake")
    (event,) = a.events
    assert event.outcome_description == "restored from the trash; reason: deleted by mistake"
    assert {r.study_instance_uid for r in service(a).trash()} == {OTHER}
