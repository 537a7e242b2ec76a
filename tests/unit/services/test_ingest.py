"""The ingest service: its own encoding of what it stores, and what it reads of a data set."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from safepacs.config import load_settings
from safepacs.db.write import read_header
from safepacs.dicom.attributes import HEADER_TAGS
from safepacs.dicom.transcode import dataset_bytes
from safepacs.errors import InvalidObjectError
from safepacs.services.ingest import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, file_meta
from safepacs.types import Principal, PrincipalKind, Service
from tests.support.corpus import make_ct, part10_bytes, storable_files

uids = st.lists(st.integers(0, 99999), min_size=2, max_size=12).map(lambda p: ".".join(map(str, p)))


def _pydicom_meta(sop_class: str, sop_instance: str, ts: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


@given(sop_class=uids, sop_instance=uids)
def test_file_meta_is_byte_identical_to_pydicoms(sop_class: str, sop_instance: str) -> None:
    """Stored bytes must not change with the encoder: a re-sent instance is recognised by its SHA-256."""
    for ts in (ExplicitVRLittleEndian, JPEG2000Lossless):
        assert file_meta(sop_class, sop_instance, ts) == _pydicom_meta(sop_class, sop_instance, ts)


@pytest.mark.parametrize("odd", [True, False])
def test_file_meta_reads_back(odd: bool) -> None:
    uid: str = generate_uid()
    uid = uid[:-1] if (len(uid) % 2 == 1) != odd else uid
    data = b"\x00" * 128 + b"DICM" + file_meta("1.2.840.10008.5.1.4.1.1.2", uid, ExplicitVRLittleEndian)
    ds = pydicom.dcmread(BytesIO(data))
    assert ds.file_meta.MediaStorageSOPInstanceUID == uid
    assert ds.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert ds.file_meta.FileMetaInformationGroupLength == len(data) - 132 - 12


def test_the_elements_read_for_the_index_give_the_rows_of_the_whole_data_set() -> None:
    """Ingest reads only HEADER_TAGS (the pixel data and the rest are skipped unread): over every
    storable file of the corpus, that yields exactly the index rows of the whole data set."""
    compared = 0
    for path in storable_files():
        ts, body = dataset_bytes(path.read_bytes())
        uid = UID(ts)
        if uid.is_deflated:
            continue  # read whole (pydicom inflates it)
        full = read_dataset(BytesIO(body), uid.is_implicit_VR, uid.is_little_endian)
        part = read_dataset(
            BytesIO(body), uid.is_implicit_VR, uid.is_little_endian, specific_tags=list(HEADER_TAGS)
        )
        assert read_header(part) == read_header(full), path.name
        compared += 1
    assert compared > 50


@pytest.mark.parametrize("cut", ["in the pixel data", "in an indexed value"])
def test_a_truncated_data_set_is_refused_and_not_stored(data_dir: Path, cut: str) -> None:
    from safepacs.app import open_archive

    ds = make_ct(patient_name="Truncated^Test")
    ts, body = dataset_bytes(part10_bytes(ds))
    if cut == "in the pixel data":
        body = body[:-10]
    else:  # keep the header of (0010,0010) Patient Name and half its value
        at = body.index(b"Truncated^Test")
        body = body[: at + 5]
    archive = open_archive(load_settings(data_dir))
    try:
        principal = Principal(kind=PrincipalKind.PEER, name="CT1", allow=frozenset({Service.STORE}))
        with pytest.raises(InvalidObjectError, match="truncated"):
            archive.ingest.ingest_dataset(principal, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, body)
        assert archive.instances.get_instance(str(ds.SOPInstanceUID)) is None
        # Nor one whose data set names another instance than the request (its object was staged).
        with pytest.raises(InvalidObjectError, match="differs from the request"):
            archive.ingest.ingest_dataset(principal, str(ds.SOPClassUID), "1.2.3.4", ts, _whole(ds))
        # Nor a file whose meta names another instance than its data set.
        other = make_ct()
        uid = str(other.SOPInstanceUID).encode()
        changed = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
        data = part10_bytes(other).replace(uid, changed, 1)  # the first one: the file meta's
        with pytest.raises(InvalidObjectError, match="file meta's SOP Class/Instance UID differs"):
            archive.ingest.ingest_file(principal, data)
    finally:
        archive.close()
    assert not [p for p in (data_dir / "objects").rglob("*") if p.is_file()]
    assert not list((data_dir / "tmp").iterdir())


def _whole(ds: Dataset) -> bytes:
    return dataset_bytes(part10_bytes(ds))[1]
