"""WADO-RS series metadata through the route (in-process, on a real data directory): the answer's bytes
are exactly those the slow path (pydicom's reader and converter over every stored object) gives, for a
series mixing instances the fast path writes (Explicit and Implicit VR, a VOI LUT in a sequence) and one
it declines (big endian), which goes through the slow path on its own."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from safepacs.app import Archive
from safepacs.audit.events import EventID
from safepacs.dicom import bulkdata
from safepacs.dicom.fastjson import metadata_json
from safepacs.protocols.dicomweb.requests import DICOM_JSON
from safepacs.protocols.dicomweb.retrieval import locate
from safepacs.types import Principal, PrincipalKind
from tests.support.corpus import make_ct, storable_files
from tests.support.ui import sign_in
from tests.support.webapp import AppClient, add_user, inprocess, store

SYSTEM = Principal(kind=PrincipalKind.SYSTEM, name="test")


@pytest.fixture
def app(data_dir: Path) -> Iterator[tuple[AppClient, Archive]]:
    with inprocess(data_dir) as pair:
        add_user(pair[1], "rad", "radiologist")
        yield pair


def _series(archive: Archive) -> tuple[str, str]:
    study, series = generate_uid(), generate_uid()
    common: dict[str, Any] = {"study_uid": study, "series_uid": series, "patient_id": "META-1"}
    for number in range(1, 4):
        store(archive, make_ct(32, 32, instance_number=number, seed=number, **common))
    implicit = make_ct(32, 32, instance_number=4, seed=4, **common)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    voi = Dataset()
    voi.LUTDescriptor = [2, 0, 16]
    voi.add_new(0x00283006, "OW", struct.pack("<2H", 0, 4095))  # LUT Data: US or OW, OW for 2 entries
    implicit.VOILUTSequence = Sequence([voi])
    implicit.SmallestImagePixelValue = 0  # US or SS: from the Pixel Representation
    store(archive, implicit)
    big = pydicom.dcmread(next(p for p in storable_files() if p.name == "MR_small_bigendian.dcm"))
    big.StudyInstanceUID, big.SeriesInstanceUID, big.PatientID = study, series, "META-1"
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    store(archive, big)
    return study, series


def test_series_metadata_is_byte_for_byte_what_the_slow_path_gives(app: tuple[AppClient, Archive]) -> None:
    client, archive = app
    study, series = _series(archive)
    rad = sign_in(client, "rad")
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/metadata", headers=rad)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(DICOM_JSON)

    refs = locate(archive.retrieve, SYSTEM, (study, series), event=EventID.INSTANCES_ACCESSED, record=False)
    expected, declined = [], 0
    for ref in refs:
        part10 = archive.retrieve.fetch(SYSTEM, ref, EventID.INSTANCES_ACCESSED)
        prefix = (
            f"https://testserver/dicomweb/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_instance_uid}/bulkdata/"
        )
        expected.append(bulkdata.metadata(bulkdata.load(part10), lambda path, p=prefix: p + path))
        declined += metadata_json(part10, lambda path: path) is None
    assert len(refs) == 5 and declined == 1  # the big endian one went through the slow path
    assert r.content == JSONResponse(expected, media_type=DICOM_JSON).body
    implicit = next(item for item in r.json() if "00283010" in item)
    assert implicit["00283010"]["Value"][0]["00283006"] == {"vr": "OW", "InlineBinary": "AAD/Dw=="}
    assert implicit["00280106"] == {"vr": "US", "Value": [0]}
