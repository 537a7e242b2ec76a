"""Transfer syntax conversion (safepacs.dicom.transcode), the parts that need no codec: reading the
file meta, choosing a syntax, bounded inflation and the checks made on an image's header before any
pixel is decoded.  tests/unit/dicom/test_transcode_corpus.py converts the corpus itself."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from safepacs.dicom.transcode import (
    check_pixel_header,
    choose_transfer_syntax,
    dataset_bytes,
    dataset_offset,
    inflate,
    transcode,
)
from safepacs.errors import InvalidObjectError, RetrieveError


def part10(ts: str = ExplicitVRLittleEndian) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_the_data_set_starts_after_the_meta_group() -> None:
    data = part10()
    ts, offset = dataset_offset(data)
    assert ts == ExplicitVRLittleEndian
    assert data[offset : offset + 2] == b"\x08\x00"  # the first element of group 0008
    assert dataset_bytes(data) == (ts, data[offset:])


def test_a_meta_group_without_a_transfer_syntax_is_refused() -> None:
    data = part10()
    ts_at = data.index(b"\x02\x00\x10\x00")
    length = struct.unpack_from("<H", data, ts_at + 6)[0]
    without = data[:ts_at] + data[ts_at + 8 + length :]
    with pytest.raises(InvalidObjectError, match=r"no Transfer Syntax UID \(0002,0010\)"):
        dataset_offset(without)


@pytest.mark.parametrize("data", [b"", b"\0" * 131, b"\0" * 128 + b"DICX" + b"\0" * 20])
def test_what_has_no_dicm_prefix_is_not_part10(data: bytes) -> None:
    with pytest.raises(InvalidObjectError, match="not a DICOM Part 10 file"):
        dataset_offset(data)


def test_a_meta_group_cut_short_is_refused() -> None:
    data = part10()
    _, offset = dataset_offset(data)
    with pytest.raises(InvalidObjectError, match="truncated"):
        dataset_offset(data[: offset - 3])


def test_the_same_syntax_is_sent_as_stored_and_padding_is_ignored() -> None:
    assert choose_transfer_syntax(JPEGBaseline8Bit, [JPEGBaseline8Bit + "\x00"]) == JPEGBaseline8Bit
    data = part10(ImplicitVRLittleEndian)
    assert transcode(data, ImplicitVRLittleEndian) == dataset_bytes(data)[1]


def test_conversion_to_a_lossy_syntax_is_refused_with_its_name() -> None:
    with pytest.raises(RetrieveError, match="conversion to 'JPEG Baseline"):
        transcode(part10(), JPEGBaseline8Bit)


def test_a_deflated_object_converts_to_explicit_little_endian() -> None:
    deflated = part10(DeflatedExplicitVRLittleEndian)
    plain = part10(ExplicitVRLittleEndian)
    out = transcode(deflated, ExplicitVRLittleEndian)
    assert b"P1" in out and out.startswith(b"\x08\x00\x16\x00")  # SOP Class UID first
    assert len(out) == len(dataset_bytes(plain)[1])


def test_inflate_is_bounded() -> None:
    raw = b"A" * 10_000
    packed = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = packed.compress(raw) + packed.flush()
    assert inflate(data, 10_000) == raw
    with pytest.raises(RetrieveError, match="inflates to more than 9999 bytes"):
        inflate(data, 9_999)
    with pytest.raises(InvalidObjectError, match="cannot be inflated"):
        inflate(b"\xff\xff\xff not deflate", 100, InvalidObjectError)


def image(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 4, 5, 1, 16
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_the_image_header_gives_the_geometry() -> None:
    assert check_pixel_header(image(), ExplicitVRLittleEndian) == (4, 5, 1, 16, 1)
    assert check_pixel_header(image(NumberOfFrames=3), ExplicitVRLittleEndian) == (4, 5, 1, 16, 3)
    assert check_pixel_header(image(BitsAllocated=1), ExplicitVRLittleEndian)[3] == 1


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("Rows", 0, "the image's Rows value is invalid"),
        ("Columns", None, "the image has no Columns"),
        ("SamplesPerPixel", 5, "the image's SamplesPerPixel value is invalid"),
        ("BitsAllocated", 12, "the image's BitsAllocated value is invalid"),
        ("NumberOfFrames", "-1", "the image's NumberOfFrames value is invalid"),
        ("NumberOfFrames", "many", "the image's NumberOfFrames value is invalid"),
    ],
)
def test_an_invalid_image_header_is_refused_before_decoding(
    keyword: str, value: object, message: str
) -> None:
    ds = image()
    if value is None:
        delattr(ds, keyword)
    elif value == "many":  # as read from a file: pydicom keeps what it cannot convert
        ds[0x00280008] = RawDataElement(0x00280008, "IS", 4, b"many", 0, False, True)
    else:
        setattr(ds, keyword, value)
    with pytest.raises(RetrieveError, match=message):
        check_pixel_header(ds, ExplicitVRLittleEndian)
