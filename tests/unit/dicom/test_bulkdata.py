"""Frames and bulk data of a stored instance (safepacs.dicom.bulkdata): the media type of each stored
frame, frames as stored or as native little endian pixels, the BulkDataURI paths of metadata and the
elements they name, and one-sentence errors for what cannot be read."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from safepacs.dicom import bulkdata
from safepacs.dicom.transcode import Geometry
from safepacs.errors import RetrieveError


def part10(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def image(frames: int = 2, rows: int = 2, cols: int = 3) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = frames
    ds.PixelData = np.arange(frames * rows * cols, dtype="<u2").tobytes()
    return ds


@pytest.mark.parametrize(
    ("ts", "media"),
    [
        ("1.2.840.10008.1.2.1", "application/octet-stream"),
        ("1.2.840.10008.1.2", "application/octet-stream"),
        ("1.2.840.10008.1.2.4.50", "image/jpeg"),
        ("1.2.840.10008.1.2.4.70", "image/jpeg"),
        ("1.2.840.10008.1.2.4.80", "image/jls"),
        ("1.2.840.10008.1.2.4.90", "image/jp2"),
        ("1.2.840.10008.1.2.4.92", "image/jpx"),
        ("1.2.840.10008.1.2.5", "image/dicom-rle"),
        ("1.2.840.10008.1.2.4.100", "video/mpeg2"),
        ("1.2.840.10008.1.2.4.102", "video/mp4"),
        ("1.2.840.10008.1.2.4.107", "video/H265"),
    ],
)
def test_stored_frames_have_the_media_type_of_their_transfer_syntax(ts: str, media: str) -> None:
    assert bulkdata.stored_media_type(ts) == media
    assert bulkdata.is_video(ts) is media.startswith("video/")
    assert bulkdata.is_encapsulated(ts) is (media != "application/octet-stream")


def test_the_transfer_syntax_defaults_to_explicit_little_endian() -> None:
    ds = Dataset()
    assert bulkdata.transfer_syntax(ds) == ExplicitVRLittleEndian
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50\x00"
    assert bulkdata.transfer_syntax(ds) == "1.2.840.10008.1.2.4.50"


def test_native_frames_are_read_one_at_a_time() -> None:
    ds = bulkdata.load(part10(image()))
    shape = bulkdata.geometry(ds)
    assert shape == Geometry(rows=2, columns=3, samples=1, bits_allocated=16, frames=2)
    assert bulkdata.native_frame(ds, 1, shape) == np.arange(6, 12, dtype="<u2").tobytes()


def test_a_big_endian_frame_is_sent_little_endian() -> None:
    ds = image(frames=1)
    ds.PixelData = np.array([1, 2, 3, 256, 513, 65535], dtype=">u2").tobytes()
    ds["PixelData"].VR = "OW"
    loaded = pydicom.dcmread(BytesIO(part10(ds, ExplicitVRBigEndian)))
    frame = bulkdata.native_frame(loaded, 0, bulkdata.geometry(loaded))
    assert np.frombuffer(frame, "<u2").tolist() == [1, 2, 3, 256, 513, 65535]


def test_a_compressed_frame_is_sent_as_stored() -> None:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    shape = bulkdata.geometry(ds)
    first, second = bulkdata.stored_frame(ds, 0, shape), bulkdata.stored_frame(ds, 1, shape)
    assert first and second and first != second
    assert bulkdata.stored_media_type(bulkdata.transfer_syntax(ds)) == "image/dicom-rle"
    native = bulkdata.native_frame(ds, 1, shape)
    assert len(native) == shape.rows * shape.columns * 3


def test_no_pixels_is_a_retrieve_error() -> None:
    ds = image()
    del ds.PixelData
    assert not bulkdata.has_pixels(ds)
    with pytest.raises(RetrieveError, match="no pixel data"):
        bulkdata.geometry(ds)


def test_a_frame_too_large_to_decode_is_refused() -> None:
    ds = image(frames=1)
    shape = Geometry(rows=20000, columns=20000, samples=1, bits_allocated=16, frames=1)
    with pytest.raises(RetrieveError, match="would decode to more than"):
        bulkdata.native_frame(ds, 0, shape)


def test_load_of_what_is_not_part10_is_a_retrieve_error() -> None:
    with pytest.raises(RetrieveError, match="not a readable DICOM Part 10 file"):
        bulkdata.load(b"\0" * 200)


def test_a_deflated_object_is_read_with_its_syntax_recorded_as_explicit() -> None:
    ds = image(frames=1)
    ds.PatientName = "Doe^Jane"
    loaded = bulkdata.load(part10(ds, DeflatedExplicitVRLittleEndian))
    assert loaded.PatientName == "Doe^Jane"
    assert bulkdata.transfer_syntax(loaded) == ExplicitVRLittleEndian


# Metadata and bulk data -------------------------------------------------------------------------------
def with_bulk() -> Dataset:
    ds = image(frames=1)
    ds.PatientName = "Doe^Jane"
    icon = Dataset()
    icon.Rows = 1
    icon.PixelData = b"\x07" * 2000
    icon["PixelData"].VR = "OB"
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x00091010, "OB", b"\x01\x02")  # small: inline
    return ds


def test_metadata_names_pixels_and_large_binaries_by_path_and_keeps_small_ones_inline() -> None:
    ds = with_bulk()
    out = bulkdata.metadata(ds, lambda path: f"bulk/{path}")
    assert out["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulk/7FE00010"}
    assert out["00880200"]["Value"][0]["7FE00010"] == {"vr": "OB", "BulkDataURI": "bulk/00880200/0/7FE00010"}
    assert out["00091010"] == {"vr": "OB", "InlineBinary": "AQI="}
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert "PixelData" in ds  # put back after the conversion


@pytest.mark.parametrize(
    ("path", "valid"),
    [
        ("7FE00010", True),
        ("00880200/0/7FE00010", True),
        ("00880200/12/00400100/3/7fe00010", True),
        ("7FE0001", False),
        ("00880200/0", False),
        ("00880200//7FE00010", False),
        ("../7FE00010", False),
        ("00880200/1234567/7FE00010", False),
        ("", False),
    ],
)
def test_bulk_data_paths(path: str, valid: bool) -> None:
    assert bulkdata.valid_path(path) is valid


def test_element_at_resolves_the_paths_metadata_gives() -> None:
    ds = with_bulk()
    pixels = bulkdata.element_at(ds, "7FE00010")
    assert pixels is not None and bulkdata.element_bytes(ds, pixels) == ds.PixelData
    icon = bulkdata.element_at(ds, "00880200/0/7FE00010")
    assert icon is not None and bulkdata.element_bytes(ds, icon) == b"\x07" * 2000


@pytest.mark.parametrize(
    "path",
    [
        "00880200/1/7FE00010",  # no such item
        "00100010",  # not binary: no bulk data resource
        "00280010/0/7FE00010",  # not a sequence
        "00880200/0/00280010",  # not binary inside the item
        "7FE00008",  # absent
        "not-a-path",
    ],
)
def test_element_at_finds_nothing_elsewhere(path: str) -> None:
    assert bulkdata.element_at(with_bulk(), path) is None


def test_element_bytes_of_a_big_endian_data_set_are_swapped() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.add_new(0x00281201, "OW", b"\x01\x02\x03\x04\x05")  # odd trailing byte left as it is
    elem = ds[0x00281201]
    assert bulkdata.element_bytes(ds, elem) == b"\x02\x01\x04\x03\x05"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert bulkdata.element_bytes(ds, elem) == b"\x01\x02\x03\x04\x05"
