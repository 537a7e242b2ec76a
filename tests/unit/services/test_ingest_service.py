"""The one ingest path (services/ingest.py) over a fake instances repository: what is stored is what
was sent, sealed, indexed with its audit record in one transaction; refusals leave nothing."""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from safepacs.audit import Action, EventID, Outcome
from safepacs.dicom.transcode import dataset_bytes
from safepacs.errors import AccessDenied, AuditError, InvalidObjectError
from safepacs.services.audit import StoreBatch
from safepacs.services.ingest import IngestService, SopClassMismatch, SopInstanceMismatch
from safepacs.types import IngestOutcome, Service, StoredBlob
from tests.support.corpus import make_ct, part10_bytes
from tests.support.fakes import CT_IMAGE, MR_IMAGE, Archive, FakeInstances, archive, part10, peer

STUDY = "1.2.826.0.3.1"
SERIES = "1.2.826.0.3.1.1"
SOP = "1.2.826.0.3.1.1.1"


def service(a: Archive, instances: FakeInstances, max_object_bytes: int = 2 * 1024**3) -> IngestService:
    # FakeInstances has the methods ingest calls, not the whole db.ports.Instances
    return IngestService(
        instances,  # type: ignore[arg-type]
        a.blobs,
        a.cipher,
        a.audit,
        a.gate,
        max_object_bytes=max_object_bytes,
    )


def sent(sop: str = SOP, **kwargs: str) -> bytes:
    return part10(STUDY, SERIES, sop, **kwargs)


def test_a_stored_file_is_indexed_with_the_blob_of_its_sealed_bytes() -> None:
    a, rows = archive(), FakeInstances()
    data = sent()
    result = service(a, rows).ingest_file(peer(Service.STORE), data)
    assert result.outcome is IngestOutcome.STORED and result.sop_instance_uid == SOP
    ref = rows.rows[SOP]
    assert (ref.study_uid, ref.series_uid, ref.sop_class_uid) == (STUDY, SERIES, CT_IMAGE)
    assert len(a.blobs) == 1
    plain = a.cipher.open(a.blobs.get(ref.blob.blob_id))
    # The stored Part 10 file carries SafePACS's own file meta: the data set is the one sent.
    assert plain[:128] == b"\x00" * 128 and plain[128:132] == b"DICM"
    assert dataset_bytes(plain)[1] == dataset_bytes(data)[1]
    assert ref.blob.sha256 == hashlib.sha256(plain).hexdigest() and ref.blob.size == len(plain)


def test_a_network_data_set_is_stored_as_a_part10_file() -> None:
    a, rows = archive(), FakeInstances()
    ts, encoded = dataset_bytes(sent())
    result = service(a, rows).ingest_dataset(peer(Service.STORE), CT_IMAGE, SOP, ts, encoded)
    assert result.outcome is IngestOutcome.STORED
    plain = a.cipher.open(a.blobs.get(rows.rows[SOP].blob.blob_id))
    assert plain.endswith(encoded) and rows.rows[SOP].transfer_syntax_uid == ExplicitVRLittleEndian


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_a_real_image_is_stored_with_its_pixels(name: str) -> None:
    a, rows = archive(), FakeInstances()
    path = get_testdata_file(name)
    assert path is not None
    data = Path(path).read_bytes()
    header = pydicom.dcmread(path, stop_before_pixels=True)
    result = service(a, rows).ingest_file(peer(Service.STORE), data)
    assert result.outcome is IngestOutcome.STORED
    ref = rows.rows[str(header.SOPInstanceUID)]
    assert (ref.study_uid, ref.sop_class_uid) == (header.StudyInstanceUID, header.SOPClassUID)
    stored = pydicom.dcmread(BytesIO(a.cipher.open(a.blobs.get(ref.blob.blob_id))))
    assert stored.PixelData == pydicom.dcmread(path).PixelData


def test_a_generated_ct_slice_is_stored() -> None:
    a, rows = archive(), FakeInstances()
    ct = make_ct(study_uid=STUDY, series_uid=SERIES, sop_instance_uid=SOP, seed=1)
    result = service(a, rows).ingest_file(peer(Service.STORE), part10_bytes(ct))
    assert result.outcome is IngestOutcome.STORED
    stored = pydicom.dcmread(BytesIO(a.cipher.open(a.blobs.get(rows.rows[SOP].blob.blob_id))))
    assert stored.PixelData == ct.PixelData and stored.PatientID == ct.PatientID


def test_the_audit_record_is_written_in_the_index_transaction() -> None:
    a, rows = archive(), FakeInstances()
    seen: list[int] = []
    add = rows.add_instance

    def add_noting(*args: Any, **kwargs: Any) -> StoredBlob | None:
        seen.append(len(a.events))  # nothing recorded before the transaction
        return add(*args, **kwargs)

    rows.add_instance = add_noting  # type: ignore[method-assign]
    service(a, rows).ingest_file(peer(Service.STORE), sent())
    (call,) = rows.called("add_instance")
    assert call["also"] is True and call["replace"] is False
    assert seen == [0]
    (event,) = a.events  # written by the ``also`` the fake ran with its connection
    assert (event.event_id, event.outcome) == (EventID.IMPORT, Outcome.SUCCESS)
    assert event.participants[0].user_id == "MODALITY1"
    assert any(o.id == STUDY for o in event.objects)


def test_a_network_store_is_recorded_as_instances_accessed_created() -> None:
    a, rows = archive(), FakeInstances()
    ts, encoded = dataset_bytes(sent())
    service(a, rows).ingest_dataset(peer(Service.STORE), CT_IMAGE, SOP, ts, encoded)
    (event,) = a.events
    assert (event.event_id, event.outcome) == (EventID.INSTANCES_ACCESSED, Outcome.SUCCESS)
    assert event.action is Action.CREATE


def test_a_failing_audit_record_leaves_no_row_and_no_blob() -> None:
    a, rows = archive(), FakeInstances()
    a.sink.fail = True
    with pytest.raises(AuditError):
        service(a, rows).ingest_file(peer(Service.STORE), sent())
    assert rows.rows == {} and len(a.blobs) == 0


def test_a_refused_principal_stores_nothing_and_is_recorded() -> None:
    a, rows = archive(), FakeInstances()
    with pytest.raises(AccessDenied):
        service(a, rows).ingest_file(peer(Service.FIND), sent())
    assert rows.calls == [] and len(a.blobs) == 0
    (event,) = a.events
    assert (event.event_id, event.outcome) == (EventID.SECURITY_ALERT, Outcome.MINOR_FAILURE)
    assert event.outcome_description is not None and event.outcome_description.startswith("store")


def test_a_data_set_whose_sop_instance_uid_differs_is_refused_and_leaves_nothing() -> None:
    a, rows = archive(), FakeInstances()
    ts, encoded = dataset_bytes(sent())
    with pytest.raises(SopInstanceMismatch):
        service(a, rows).ingest_dataset(peer(Service.STORE), CT_IMAGE, SOP + ".9", ts, encoded)
    assert rows.calls == [] and len(a.blobs) == 0
    (event,) = a.events
    assert event.outcome is not Outcome.SUCCESS
    assert event.outcome_description == "the data set's SOP Instance UID differs from the request's"


def test_a_data_set_whose_sop_class_uid_differs_is_refused_and_leaves_nothing() -> None:
    a, rows = archive(), FakeInstances()
    ts, encoded = dataset_bytes(sent())
    with pytest.raises(SopClassMismatch):
        service(a, rows).ingest_dataset(peer(Service.STORE), MR_IMAGE, SOP, ts, encoded)
    assert rows.calls == [] and len(a.blobs) == 0


def test_identical_bytes_twice_succeed_and_change_nothing() -> None:
    a, rows = archive(), FakeInstances()
    svc, data = service(a, rows), sent()
    svc.ingest_file(peer(Service.STORE), data)
    before = dict(rows.rows)
    result = svc.ingest_file(peer(Service.STORE), data)
    assert result.outcome is IngestOutcome.DUPLICATE
    assert rows.rows == before and len(a.blobs) == 1  # the second copy was removed again
    assert [e.outcome for e in a.events] == [Outcome.SUCCESS, Outcome.SUCCESS]


def test_other_bytes_under_a_stored_uid_are_refused_and_the_stored_object_kept() -> None:
    a, rows = archive(), FakeInstances()
    svc = service(a, rows)
    first = sent()
    svc.ingest_file(peer(Service.STORE), first)
    kept = rows.rows[SOP]
    other = sent(patient_name="Roe^Richard")
    result = svc.ingest_file(peer(Service.STORE), other)
    assert result.outcome is IngestOutcome.CONFLICT and result.warnings
    assert rows.rows[SOP] == kept and len(a.blobs) == 1
    assert dataset_bytes(a.cipher.open(a.blobs.get(kept.blob.blob_id)))[1] == dataset_bytes(first)[1]
    conflict = a.events[-1]
    assert conflict.outcome is not Outcome.SUCCESS
    details = dict(d for o in conflict.objects for d in o.detail)
    assert details["Stored SHA-256"] == kept.blob.sha256
    assert details["Received SHA-256"] != kept.blob.sha256


def test_an_object_over_the_size_limit_is_refused_before_anything_is_written() -> None:
    a, rows = archive(), FakeInstances()
    data = sent()
    with pytest.raises(InvalidObjectError, match="max_object_bytes"):
        service(a, rows, max_object_bytes=len(data) - 1).ingest_file(peer(Service.STORE), data)
    assert rows.calls == [] and len(a.blobs) == 0
    (event,) = a.events
    assert event.outcome is not Outcome.SUCCESS


def test_a_batch_records_its_first_instance_and_a_summary_at_its_end() -> None:
    a, rows = archive(), FakeInstances()
    svc, batch = service(a, rows), StoreBatch()
    svc.ingest_file(peer(Service.STORE), sent(), batch=batch)
    svc.ingest_file(peer(Service.STORE), sent("1.2.826.0.3.1.1.2"), batch=batch)
    assert len(rows.rows) == 2
    assert [c["also"] for c in rows.called("add_instance")] == [True, False]  # one record per study
    assert len(a.events) == 1
    svc.end_batch(peer(Service.STORE), batch)
    assert len(a.events) == 2
