"""The shared test corpus: pydicom's and pydicom-data's files, split into what a PACS must store and reject.

``storable`` files are what a DICOM sender could C-STORE (PS3.10 7.1 File Meta Information with a
Transfer Syntax UID and SOP Class/Instance UIDs that are valid UIDs, PS3.5 9.1); ``unreadable`` files
are everything else, which a PACS must refuse cleanly.  :func:`make_ct` builds a synthetic CT Image
Storage instance for tests that need a controlled data set.

Import it as ``from tests.support.corpus import ...``.  Nothing here touches the network: the files are found
in the installed ``pydicom`` and ``data_store`` (pydicom-data) packages, never downloaded.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "Kind",
    "all_test_files",
    "classify",
    "make_ct",
    "part10_bytes",
    "storable_files",
    "unreadable_files",
]

Kind = Literal["storable", "unreadable"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SKIP_SUFFIXES = {".py", ".pyc", ".json", ".txt", ".md", ".dump", ".icc", ".gz", ".bz2", ".xz", ".zip"}


def _corpus_dirs() -> list[Path]:
    dirs = [Path(pydicom.data.__file__).resolve().parent / "test_files"]
    try:
        import data_store  # type: ignore[import-untyped]  # pydicom-data, from the test extra
    except ImportError:  # pragma: no cover - pydicom-data is in the test extra
        return dirs
    dirs.append(Path(data_store.__file__).resolve().parent / "data")
    return dirs


@functools.cache
def all_test_files() -> list[Path]:
    """Every file of pydicom's test files and of pydicom-data, sorted, one path per distinct content.

    Obvious non-DICOM side files (Python, JSON, text dumps, ICC profiles, archives) are left out;
    everything else, including files without a DICOM preamble, is kept.
    """
    paths = sorted(
        p
        for base in _corpus_dirs()
        if base.is_dir()
        for p in base.rglob("*")
        if p.is_file() and p.suffix.lower() not in _SKIP_SUFFIXES and "__pycache__" not in p.parts
    )
    seen: set[str] = set()
    unique: list[Path] = []
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(path)
    return unique


def _valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


@functools.cache
def classify(path: Path) -> Kind:
    """``storable`` or ``unreadable`` (see the module docstring).

    storable: ``dcmread`` without ``force`` reads it without hitting the end of the file early, its
    SOP class is a Storage SOP class, it has a file meta group with a Transfer Syntax UID and
    SOP Class/Instance UIDs that are syntactically valid UIDs and agree with the data set's, the
    data set has valid Study and Series Instance UIDs, and no element is shorter than its length:
    what a DICOM sender could C-STORE and an archive can index.  Anything else is unreadable.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
            meta = ds.file_meta
            ts = meta.get("TransferSyntaxUID")
            sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
            sop_instance = meta.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID")
    except Exception:  # pydicom raises many kinds (InvalidDicomError, ValueError, EOFError...); all mean no
        return "unreadable"
    if any("End of file" in str(w.message) for w in caught):
        return "unreadable"  # pydicom read a truncated file leniently; a PACS must not store half an object
    if str(sop_class) not in _storage_classes():
        return "unreadable"  # e.g. a DICOMDIR: not an instance anyone can C-STORE
    if not all(_valid_uid(v) for v in (ts, sop_class, sop_instance)):
        return "unreadable"
    # A composite instance the archive can place in its patient/study/series hierarchy, whose file
    # meta agrees with its data set (PS3.10 7.1) and whose elements are all as long as they say.
    identity = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    if not all(_valid_uid(str(v)) if v is not None else False for v in identity):
        return "unreadable"
    if (str(identity[0]), str(identity[1])) != (str(sop_class), str(sop_instance)):
        return "unreadable"
    if _truncated(path, str(ts)):
        return "unreadable"
    return "storable"


def _truncated(path: Path, ts: str) -> bool:
    """Whether a top-level element's value is shorter than its declared length (pydicom reads those)."""
    from pydicom.filereader import data_element_generator
    from pydicom.uid import UID

    uid = UID(ts)
    if uid.is_deflated or not uid.is_transfer_syntax:
        return False
    from safepacs.dicom.transcode import dataset_bytes

    try:
        body = dataset_bytes(path.read_bytes())[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for raw in data_element_generator(BytesIO(body), uid.is_implicit_VR, uid.is_little_endian):
                length = getattr(raw, "length", None)
                if length not in (None, 0xFFFFFFFF) and raw.value is not None and len(raw.value) != length:
                    return True
    except Exception:
        return True
    return False


@functools.cache
def _storage_classes() -> frozenset[str]:
    from safepacs.protocols.dimse.contexts import storage_sop_classes

    return frozenset(storage_sop_classes())


def storable_files() -> list[Path]:
    """The corpus files a PACS must accept."""
    return [p for p in all_test_files() if classify(p) == "storable"]


def unreadable_files() -> list[Path]:
    """The corpus files a PACS must refuse cleanly."""
    return [p for p in all_test_files() if classify(p) == "unreadable"]


def make_ct(
    rows: int = 64,
    cols: int = 64,
    *,
    patient_id: str = "SP-0001",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    seed: int | None = None,
    **overrides: Any,
) -> Dataset:
    """A synthetic CT Image Storage instance with Explicit VR Little Endian file meta and random pixels.

    ``overrides`` are set by keyword (``Modality="MR"``); a value of ``None`` removes the attribute.
    UIDs left as ``None`` are generated.  ``seed`` makes the pixel data reproducible.
    """
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    now = datetime.datetime(2024, 1, 2, 3, 4, 5)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = now.strftime("%H%M%S")
    ds.SeriesTime = ds.StudyTime
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "SafePACS Test"
    ds.ReferringPhysicianName = "Referrer^Ruth"
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = "AXIAL 5mm"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = "5.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, float(5 * instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = float(5 * instance_number)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"

    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file (zeroed preamble, file meta, data set) in its meta's transfer syntax."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def phantom_pixels(rows: int, cols: int, position: float) -> bytes:
    """Pixel data (the stored values of :func:`make_ct`, HU + 1024) of a head-like phantom: air, a
    skull ring, brain, and two ventricles whose size follows ``position`` (0 to 1 through the
    series), so that the slices of a series differ visibly and a screenshot shows an image."""
    y, x = np.mgrid[0:rows, 0:cols]
    u, v = (x - cols / 2) / (cols * 0.42), (y - rows / 2) / (rows * 0.47)
    r = np.sqrt(u**2 + v**2)
    hu = np.full((rows, cols), -1000.0)
    hu[r < 1.0] = 800.0  # skull
    hu[r < 0.9] = 35.0  # brain
    size = 0.05 + 0.12 * np.sin(np.pi * min(max(position, 0.0), 1.0))
    for side in (-0.22, 0.22):
        hu[np.sqrt(((u - side) / 1.6) ** 2 + (v / 2.2) ** 2) < size] = 5.0  # ventricles
    hu[np.sqrt((u + 0.35) ** 2 + (v + 0.4) ** 2) < 0.06] = 70.0  # a small bright lesion
    return np.clip(hu + 1024, 0, 4095).astype("<u2").tobytes()
