"""DICOM JSON (PS3.18 F.2) in WADO-RS metadata and QIDO-RS answers: no Group Length elements (F.2.2),
empty values as F.2.5 says, person names by their non-empty groups.

Checked three ways: against the reference of tests/support/dicom_json.py on every file of the test
corpus, on a data set holding every case, and with dicomweb-client against a running
``safepacs serve`` that was sent an object carrying group lengths (at the top and inside a sequence
item) over DIMSE.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from safepacs.dicom import bulkdata
from safepacs.dicom.dicomjson import dataset_json
from safepacs.errors import RetrieveError
from tests.support.corpus import make_ct, storable_files
from tests.support.dicom_client import store_files
from tests.support.dicom_json import group_length_keys, reference_json
from tests.support.server import Server, run_cli, start_server


def _no_uris(model: Any) -> Any:
    """``model`` with every BulkDataURI the same string (the reference does not build URIs)."""
    if isinstance(model, list):
        return [_no_uris(v) for v in model]
    if isinstance(model, dict):
        return {k: "uri" if k == "BulkDataURI" else _no_uris(v) for k, v in model.items()}
    return model


def _group_lengths(ds: Dataset) -> int:
    found = 0
    for elem in ds:
        found += elem.tag.element == 0
        if elem.VR == "SQ":
            found += sum(_group_lengths(item) for item in elem.value)
    return found


def test_metadata_of_every_corpus_file_is_the_ps3_18_reference() -> None:
    """WADO-RS metadata (``bulkdata.metadata``) of each storable corpus file equals the reference; the
    corpus holds Group Length elements, which neither has."""
    compared = lengths = 0
    for path in storable_files():
        try:
            ds = bulkdata.load(path.read_bytes())
        except RetrieveError:
            continue
        lengths += _group_lengths(ds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ours = bulkdata.metadata(ds, lambda element_path: f"bulk/{element_path}")
            except RetrieveError:  # a value pydicom cannot convert: the reference cannot either
                with pytest.raises(Exception):  # noqa: B017 - pydicom raises several types
                    reference_json(ds, lambda elem: "uri", bulkdata.BULK_THRESHOLD)
                continue
            pixels = ds.pop(0x7FE00010, None)
            expected = reference_json(ds, lambda elem: "uri", bulkdata.BULK_THRESHOLD)
        if pixels is not None:
            expected["7FE00010"] = {"vr": ours["7FE00010"]["vr"], "BulkDataURI": "uri"}
        assert _no_uris(ours) == expected, path.name
        assert not group_length_keys(ours), path.name
        compared += 1
    assert compared > 150
    assert lengths > 20  # the corpus does exercise the rule


def _every_case() -> Dataset:
    """One attribute of each case (none that SafePACS indexes, but the Patient's Name)."""
    ds = Dataset()
    ds.add_new(0x00080000, "UL", 200)  # group lengths, at the top and in an item: left out (F.2.2)
    ds.add_new(0x00080008, "CS", ["ORIGINAL", "", "AXIAL"])  # an empty value among others: null (F.2.5)
    ds.add_new(0x00080064, "CS", "")  # empty: no Value (F.2.5)
    item = Dataset()
    item.add_new(0x00080000, "UL", 8)
    item.add_new(0x00081150, "UI", "1.2.3")
    ds.add_new(0x00081110, "SQ", Sequence())  # an empty sequence: no Value (F.2.5)
    ds.add_new(0x00081140, "SQ", Sequence([item, Dataset()]))  # an empty item: {} (F.2.5)
    ds.add_new(0x00100000, "UL", 40)
    ds.add_new(0x00100010, "PN", "Doe^John\\\\Roe^Rita")
    ds.add_new(0x00101001, "PN", "=Yamada^Tarou")  # only non-empty groups (F.2.2)
    ds.add_new(0x00101040, "LO", ["", ""])
    ds.add_new(0x00101060, "PN", "")
    ds.add_new(0x00181164, "DS", "1.5\\\\3")
    ds.add_new(0x00181310, "US", None)
    ds.add_new(0x00201002, "IS", "\\5")
    return ds


EVERY_CASE_JSON = {
    "00080008": {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]},
    "00080064": {"vr": "CS"},
    "00081110": {"vr": "SQ"},
    "00081140": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.3"]}}, {}]},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}, None, {"Alphabetic": "Roe^Rita"}]},
    "00101001": {"vr": "PN", "Value": [{"Ideographic": "Yamada^Tarou"}]},
    "00101040": {"vr": "LO", "Value": [None, None]},
    "00101060": {"vr": "PN"},
    "00181164": {"vr": "DS", "Value": [1.5, None, 3.0]},
    "00181310": {"vr": "US"},
    "00201002": {"vr": "IS", "Value": [None, 5]},
}


def test_every_empty_value_and_group_length_case() -> None:
    ds = _every_case()
    assert dataset_json(ds) == EVERY_CASE_JSON
    assert reference_json(ds) == EVERY_CASE_JSON  # the reference says the same


# Against a running server, with dicomweb-client ---------------------------------------------------------


_ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)  # PS3.5 7.5: undefined length
_ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def _encode(ds: Dataset) -> bytes:
    """``ds`` in Explicit VR Little Endian with a Group Length (gggg,0000) before each group, in sequence
    items too; sequences and items of undefined length.  pydicom's writer leaves group lengths out."""
    groups: dict[int, list[bytes]] = {}
    for elem in ds:
        if elem.tag.element == 0:
            continue
        if elem.VR == "SQ":
            items = b"".join(_ITEM + _encode(item) + _ITEM_END for item in elem.value)
            raw = struct.pack("<HH2s2xL", elem.tag.group, elem.tag.element, b"SQ", 0xFFFFFFFF)
            raw += items + _SEQUENCE_END
        else:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, elem)
            raw = fp.getvalue()
        groups.setdefault(elem.tag.group, []).append(raw)
    out = b""
    for group, parts in sorted(groups.items()):
        body = b"".join(parts)
        out += struct.pack("<HH2sHL", group, 0x0000, b"UL", 4, len(body)) + body
    return out


def _part10(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue() + _encode(ds)


@pytest.fixture
def web(data_dir: Path) -> Iterator[Server]:
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        yield srv
    finally:
        srv.stop()


def _dicomweb_client(srv: Server) -> DICOMwebClient:
    assert run_cli("user", "add", "rad", "--role", "radiologist", "--data", str(srv.data)) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli("token", "create", "--user", "rad", "--data", str(srv.data)) == 0
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace our CA
    session.verify = str(srv.ca_file)
    token = out.getvalue().strip()
    return DICOMwebClient(
        url=f"{srv.base_url}/dicomweb", session=session, headers={"Authorization": f"Bearer {token}"}
    )


def test_dicomweb_client_reads_metadata_without_group_lengths_and_with_f25_empty_values(
    web: Server, tmp_path: Path
) -> None:
    ct = make_ct(rows=8, cols=8, patient_id="F2-1")
    for elem in _every_case():
        ct.add(elem)
    ct.ContentCreatorName = "Doe^Jane\\\\=Roe^Jane"  # indexed: QIDO-RS answers it from the index
    plain = make_ct(rows=8, cols=8, patient_id="F2-0")  # group lengths, no empty value
    plain.ReferencedImageSequence = [_every_case()[0x00081140].value[0]]
    paths = [tmp_path / "f2.dcm", tmp_path / "plain.dcm"]
    paths[0].write_bytes(_part10(ct))
    paths[1].write_bytes(_part10(plain))
    assert b"\x08\x00\x00\x00UL" in paths[1].read_bytes()  # the objects do carry group lengths
    web.add_peer("CT1", "store")
    assert store_files(web.port, paths, calling="CT1") == dict.fromkeys(paths, 0x0000)

    client = _dicomweb_client(web)
    uids = (plain.StudyInstanceUID, plain.SeriesInstanceUID, plain.SOPInstanceUID)
    assert group_length_keys(client.retrieve_instance_metadata(*uids)) == []
    study, series, sop = ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
    meta = client.retrieve_instance_metadata(study, series, sop)
    assert group_length_keys(meta) == []
    assert {key: meta.get(key) for key in EVERY_CASE_JSON} == EVERY_CASE_JSON
    assert meta["00700084"]["Value"] == [{"Alphabetic": "Doe^Jane"}, None, {"Ideographic": "Roe^Jane"}]
    assert group_length_keys(client.retrieve_study_metadata(study)) == []
    # What a client builds from it is the stored data set (pydicom's reader of DICOM JSON).
    back = Dataset.from_json(meta)
    assert list(back.ImageType) == ["ORIGINAL", "", "AXIAL"]
    assert [str(n) for n in back.PatientName] == ["Doe^John", "", "Roe^Rita"]
    assert len(back.ReferencedStudySequence) == 0 and len(back.ReferencedImageSequence) == 2

    # QIDO-RS: the same rules for what the index answers, including a group length asked for by tag.
    (found,) = client.search_for_instances(
        study_instance_uid=study, fields=["ContentCreatorName", "PatientName", "00100000", "00080000"]
    )
    assert group_length_keys(found) == []
    assert found["00700084"]["Value"] == meta["00700084"]["Value"]
    assert found["00100010"]["Value"] == meta["00100010"]["Value"]
