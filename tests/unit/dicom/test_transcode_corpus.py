"""Transfer syntax conversion for retrieve (safepacs.dicom.transcode) against the whole test corpus.

Every file of pydicom's and pydicom-data's corpus that pydicom reads with a file meta Transfer Syntax
UID: ``dataset_bytes`` finds the data set where pynetdicom does; every native file converts between the
little endian syntaxes without changing a value; every compressed file pydicom can decode converts to
Explicit VR Little Endian with pydicom's own pixel array and an unchanged header; every file encodes into
each lossless compressed syntax SafePACS produces with the same pixels (checked by DCMTK's decoders too),
or is refused.  Files pydicom cannot decode, corrupt codestreams and decompression bombs end in
``RetrieveError``.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import time
import warnings
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.pixels import pixel_array
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.dsutils import split_dataset

from safepacs.dicom.transcode import (
    PRODUCIBLE,
    can_convert,
    can_produce,
    choose_transfer_syntax,
    dataset_bytes,
    transcode,
)
from safepacs.errors import RetrieveError
from tests.support.corpus import all_test_files, make_ct, part10_bytes

CORPUS_ROOTS = sorted({str(p.parent) for p in all_test_files()}, key=len)
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
#: Attributes a decompression may change (PS3.3 C.7.6.3, C.7.6.1.1.5, PS3.5 A.4).
PIXEL_ENCODING = {
    "PixelData",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "EncapsulatedPixelDataValueTotalLength",
    "LossyImageCompression",
    "LossyImageCompressionMethod",
}
MAX_COMPARED_FRAMES = 3  # multi-frame files: first, middle and last frame are compared


def _quiet_read(src: Path | bytes, **kwargs: Any) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(BytesIO(src) if isinstance(src, bytes) else src, **kwargs)


@functools.cache
def readable() -> dict[Path, str]:
    """Corpus files pydicom reads without ``force`` that have a file meta Transfer Syntax UID."""
    out: dict[Path, str] = {}
    for path in all_test_files():
        try:
            ts = _quiet_read(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
        except Exception:
            ts = None  # unreadable: not part of this corpus
        if ts:
            out[path] = str(ts)
    return out


def _id(path: Path) -> str:
    text = str(path)
    for root in reversed(CORPUS_ROOTS):
        if text.startswith(root):
            return text[len(root) + 1 :] or path.name
    return path.name


def _files(native: bool) -> list[Path]:
    return [p for p, ts in readable().items() if (ts in NATIVE) == native and UID(ts).is_transfer_syntax]


def _truncated(path: Path) -> bool:
    """Whether pydicom meets the end of the file early or reads a value shorter than its length."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)
        short = [
            tag
            for tag in ds.keys()
            if isinstance(raw := ds.get_item(tag), RawDataElement)
            and raw.length != 0xFFFFFFFF
            and len(raw.value or b"") != raw.length
        ]
    return bool(short) or any("End of file" in str(w.message) for w in caught)


def _part10(ts: str, body: bytes) -> bytes:
    """A Part 10 file around an encoded data set, so pydicom can read what ``transcode`` returned."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.3"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ts
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(body)
    return buf.getvalue()


def _canonical(
    ds: Dataset, skip: set[str], *, skip_binary: bool = False, prefix: str = ""
) -> dict[str, bytes]:
    """Every value as pydicom encodes it in Implicit VR Little Endian, keyed by its tag path.

    Implicit VR drops VRs, so the same value reads back as US or SS, FD or UN alike; its bytes do not
    change.  Group lengths are left out (retired, and re-encoding changes them).
    """
    out: dict[str, bytes] = {}
    for tag in ds.keys():
        elem = ds[tag]
        if tag.element == 0 or elem.keyword in skip:
            continue
        key = f"{prefix}{tag}"
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                out.update(_canonical(item, skip, skip_binary=skip_binary, prefix=f"{key}[{index}]"))
            continue
        if skip_binary and elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            continue
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = True
        write_data_element(fp, elem)
        out[key] = fp.getvalue()
    return out


def _frames_equal(original: Dataset, converted: Dataset) -> None:
    frames = int(original.get("NumberOfFrames") or 1)
    if frames <= MAX_COMPARED_FRAMES:
        assert np.array_equal(original.pixel_array, converted.pixel_array)
        return
    for index in sorted({0, frames // 2, frames - 1}):
        assert np.array_equal(pixel_array(original, index=index), pixel_array(converted, index=index)), index


# dataset_bytes ----------------------------------------------------------------------------------------


def test_corpus_has_every_kind_of_transfer_syntax() -> None:
    present = set(readable().values())
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian} <= present
    assert {DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, RLELossless} <= present
    assert len(readable()) > 200


def test_dataset_bytes_splits_where_pynetdicom_does() -> None:
    wrong: list[str] = []
    for path, ts in readable().items():
        data = path.read_bytes()
        _, offset = split_dataset(path)
        got_ts, body = dataset_bytes(data)
        if got_ts != ts or body != data[offset:]:
            wrong.append(_id(path))
    assert not wrong


@pytest.mark.parametrize(
    "data", [b"", b"\x00" * 200, b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00"]
)
def test_dataset_bytes_refuses_what_is_not_part10(data: bytes) -> None:
    from safepacs.errors import InvalidObjectError

    with pytest.raises(InvalidObjectError):
        dataset_bytes(data)


# Choosing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "accepted", "expected"),
    [
        (JPEGBaseline8Bit, [JPEGBaseline8Bit, ExplicitVRLittleEndian], JPEGBaseline8Bit),
        (JPEGBaseline8Bit, [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        (JPEGBaseline8Bit, [ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        (ExplicitVRBigEndian, [ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        (DeflatedExplicitVRLittleEndian, [ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        (ImplicitVRLittleEndian, [ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        (RLELossless, [JPEGLSLossless], JPEGLSLossless),  # decoded, encoded losslessly
        (ExplicitVRLittleEndian, [JPEGBaseline8Bit, JPEG2000Lossless], JPEG2000Lossless),
        (JPEGBaseline8Bit, [RLELossless, ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        (ExplicitVRLittleEndian, [JPEGBaseline8Bit], None),  # never encoded lossy
        (ExplicitVRLittleEndian, [JPEG2000, JPEGLSNearLossless], None),
        (MPEG2MPML, [RLELossless], None),
        (MPEG2MPML, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], None),
        (MPEG2MPML, [MPEG2MPML], MPEG2MPML),
        ("1.2.3.4.5", [ExplicitVRLittleEndian], None),
        (ExplicitVRLittleEndian, [], None),
    ],
)
def test_choose_transfer_syntax(stored: str, accepted: list[str], expected: str | None) -> None:
    assert choose_transfer_syntax(stored, accepted) == expected


def test_can_produce_the_lossless_syntaxes_only() -> None:
    assert set(PRODUCIBLE) == {JPEG2000Lossless, JPEGLSLossless, RLELossless}
    for uid in PRODUCIBLE:
        assert can_produce(uid), uid  # the encoders are dependencies: all installed
    for uid in (JPEGBaseline8Bit, JPEG2000, JPEGLSNearLossless, ExplicitVRLittleEndian, MPEG2MPML, "1.2.3"):
        assert not can_produce(uid), uid


def test_can_convert_reports_installed_decoders() -> None:
    for uid in (JPEGBaseline8Bit, JPEGLSLossless, RLELossless, "1.2.840.10008.1.2.4.90", ExplicitVRBigEndian):
        assert can_convert(uid), uid
    assert not can_convert(MPEG2MPML)


# Native syntaxes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _files(native=True), ids=_id)
def test_native_files_convert_without_changing_a_value(path: Path) -> None:
    data = path.read_bytes()
    stored = readable()[path]
    if _truncated(path):
        with pytest.raises(RetrieveError, match="truncated"):
            transcode(
                data, ImplicitVRLittleEndian if stored == ExplicitVRLittleEndian else ExplicitVRLittleEndian
            )
        return
    original = _quiet_read(path)
    big_endian = stored == ExplicitVRBigEndian
    expected = _canonical(original, {"PixelData"}, skip_binary=big_endian)
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        body = transcode(data, target)
        if target == stored:
            assert body == dataset_bytes(data)[1]
            continue
        if stored == DeflatedExplicitVRLittleEndian and target == ExplicitVRLittleEndian:
            assert body == zlib.decompress(dataset_bytes(data)[1], -zlib.MAX_WBITS)
        converted = _quiet_read(_part10(target, body))
        got = _canonical(converted, {"PixelData"})
        if big_endian:  # binary values were swapped: compared through the pixel array only
            assert set(got) == set(_canonical(original, {"PixelData"})), target.name
            got = {key: got[key] for key in expected}
        assert got == expected, target.name
        if "PixelData" in original:
            try:
                reference = original.pixel_array
            except Exception:
                reference = None  # a truncated or inconsistent image: the values above still had to survive
            if reference is not None:
                assert np.array_equal(reference, converted.pixel_array), target.name


# Compressed syntaxes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _files(native=False), ids=_id)
def test_compressed_files_decode_like_pydicom(path: Path) -> None:
    data = path.read_bytes()
    if _truncated(path):
        with pytest.raises(RetrieveError, match="truncated"):
            transcode(data, ExplicitVRLittleEndian)
        return
    original = _quiet_read(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixel_array(original, index=0)
    except Exception:
        if "PixelData" in original:
            with pytest.raises(RetrieveError):  # pydicom cannot decode it: a clean refusal, not a crash
                transcode(data, ExplicitVRLittleEndian)
            return
        # No pixel data at all (a compressed syntax is legal for any object): converted unchanged.
        body = transcode(data, ExplicitVRLittleEndian)
        converted = _quiet_read(_part10(ExplicitVRLittleEndian, body))
        assert _canonical(converted, set()) == _canonical(original, set())
        return

    body = transcode(data, ExplicitVRLittleEndian)
    converted = _quiet_read(_part10(ExplicitVRLittleEndian, body))
    _frames_equal(original, converted)
    assert _canonical(converted, PIXEL_ENCODING) == _canonical(original, PIXEL_ENCODING)
    assert not converted["PixelData"].is_undefined_length
    assert converted["PixelData"].VR == ("OB" if original.BitsAllocated <= 8 else "OW")
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        assert keyword not in converted
    if readable()[path] == JPEGBaseline8Bit:
        assert converted.LossyImageCompression == "01"

    implicit = _quiet_read(_part10(ImplicitVRLittleEndian, transcode(data, ImplicitVRLittleEndian)))
    assert _canonical(implicit, set()) == _canonical(converted, set())


# Encoding ----------------------------------------------------------------------------------------------

#: Decoded size up to which corpus files are encoded in every producible syntax (keeps the run short).
MAX_ENCODED_BYTES = 256 * 1024
#: Ordinary images of every kind of stored syntax, which must encode into each producible syntax.
ORDINARY = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_2frame.dcm",
    "image_dfl.dcm",
)


def _decoded_size(path: Path) -> int | None:
    try:
        ds = _quiet_read(path, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames") or 1)
        return int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames * int(ds.BitsAllocated) // 8
    except Exception:
        return None  # no image, or an invalid header: transcode refuses or keeps it


def _encodable() -> list[Path]:
    return [
        p
        for p, ts in readable().items()
        if UID(ts).is_transfer_syntax and can_convert(ts) and (_decoded_size(p) or 0) <= MAX_ENCODED_BYTES
    ]


def _check_encoded(path: Path, target: str, body: bytes) -> Dataset:
    """``body`` is the file's data set with its pixel data encapsulated in ``target``: the same header
    (pixel encoding aside) and the same decoded pixels."""
    original = _quiet_read(path)
    converted = _quiet_read(_part10(target, body))
    big_endian = readable()[path] == ExplicitVRBigEndian
    assert _canonical(converted, PIXEL_ENCODING, skip_binary=big_endian) == _canonical(
        original, PIXEL_ENCODING, skip_binary=big_endian
    )
    if "PixelData" in original:
        assert converted["PixelData"].is_undefined_length
        _frames_equal(original, converted)
        if readable()[path] != target:  # encoded here (else sent as stored)
            assert converted["PixelData"].VR == "OB" and converted.get("PlanarConfiguration", 0) == 0
    if readable()[path] == JPEGBaseline8Bit:
        assert converted.LossyImageCompression == "01"  # PS3.3 C.7.6.1.1.5: still flagged
    return converted


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_images_encode_into_every_producible_syntax(name: str) -> None:
    path = Path(pydicom.data.get_testdata_file(name))
    data = path.read_bytes()
    for target in PRODUCIBLE:
        body = transcode(data, target)
        if readable()[path] == target:
            assert body == dataset_bytes(data)[1]  # as stored
        _check_encoded(path, target, body)


@pytest.mark.parametrize("path", _encodable(), ids=_id)
def test_corpus_files_encode_losslessly_or_are_refused(path: Path) -> None:
    """Whatever the file, encoding ends in the same pixels or in a RetrieveError (an image the syntax
    cannot hold, PS3.5 8.2; a corrupt or truncated object), never in another exception."""
    data = path.read_bytes()
    for target in PRODUCIBLE:
        try:
            body = transcode(data, target)
        except RetrieveError:
            continue
        _check_encoded(path, target, body)


@pytest.mark.dcmtk
@pytest.mark.parametrize(("target", "tool"), [(RLELossless, "dcmdrle"), (JPEGLSLossless, "dcmdjpls")])
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_dcmtk_decodes_what_safepacs_encodes(target: str, tool: str, name: str, tmp_path: Path) -> None:
    """An independent decoder (DCMTK's) reads the same pixels from SafePACS's RLE and JPEG-LS."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not on PATH")
    path = Path(pydicom.data.get_testdata_file(name))
    encoded = tmp_path / "encoded.dcm"
    encoded.write_bytes(_part10(target, transcode(path.read_bytes(), target)))
    decoded = tmp_path / "decoded.dcm"
    run = subprocess.run([tool, str(encoded), str(decoded)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert np.array_equal(_quiet_read(decoded).pixel_array, _quiet_read(path).pixel_array)


def test_non_image_objects_are_sent_unchanged_in_an_encapsulated_syntax() -> None:
    """PS3.5 A.4: an encapsulated syntax changes only pixel data; a data set without any is the same."""
    ds = make_ct(seed=11)
    del ds.PixelData
    data = part10_bytes(ds)
    assert transcode(data, JPEG2000Lossless) == dataset_bytes(data)[1]


def test_colour_by_plane_is_encoded_colour_by_pixel() -> None:
    rgb = np.random.default_rng(12).integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
    ds = make_ct(8, 10, seed=12, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()  # R plane, G plane, B plane
    assert np.array_equal(_quiet_read(part10_bytes(ds)).pixel_array, rgb)
    for target in (RLELossless, JPEGLSLossless):  # JPEG 2000 needs 32 pixels a side
        converted = _quiet_read(_part10(target, transcode(part10_bytes(ds), target)))
        assert converted.PlanarConfiguration == 0
        assert np.array_equal(converted.pixel_array, rgb), target


def test_images_a_syntax_cannot_hold_are_refused() -> None:
    data = part10_bytes(make_ct(16, 16, seed=13, BitsAllocated=32, BitsStored=32, HighBit=31))
    for target in PRODUCIBLE:
        with pytest.raises(RetrieveError, match="cannot be encoded"):
            transcode(data, target)


def test_same_syntax_returns_the_stored_bytes() -> None:
    data = part10_bytes(make_ct(seed=1))
    assert transcode(data, ExplicitVRLittleEndian) == dataset_bytes(data)[1]


# Refusals ---------------------------------------------------------------------------------------------


def _encapsulated_ct(frame: bytes, ts: str = JPEGBaseline8Bit, **overrides: Any) -> bytes:
    ds = make_ct(8, 8, seed=2, **{"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, **overrides})
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = ts
    return part10_bytes(ds)


def _jpeg_frame(name: str = "SC_rgb_jpeg_dcmtk.dcm") -> tuple[Dataset, bytes]:
    ds = _quiet_read(Path(pydicom.data.get_testdata_file(name)))
    return ds, next(generate_frames(ds.PixelData, number_of_frames=1))


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    ds, _ = _jpeg_frame()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 100000
    start = time.perf_counter()
    with pytest.raises(RetrieveError, match="more than the limit"):
        transcode(part10_bytes(ds), ExplicitVRLittleEndian)
    assert time.perf_counter() - start < 1.0


def test_small_limit_refuses_an_ordinary_image() -> None:
    data = part10_bytes(_jpeg_frame()[0])
    with pytest.raises(RetrieveError, match="limit"):
        transcode(data, ExplicitVRLittleEndian, max_pixel_bytes=1000)


def test_codestream_larger_than_the_header_is_refused() -> None:
    ds, _ = _jpeg_frame()
    ds.Rows, ds.Columns = 10, 10  # the codestream still says 100 x 100
    with pytest.raises(RetrieveError, match="larger image"):
        transcode(part10_bytes(ds), ExplicitVRLittleEndian)


def test_corrupt_jpeg_is_a_retrieve_error() -> None:
    ds, frame = _jpeg_frame()
    ds.PixelData = encapsulate([frame[:200]])  # the scan is cut off after its header
    with pytest.raises(RetrieveError, match="corrupt"):
        transcode(part10_bytes(ds), ExplicitVRLittleEndian)


def test_jpeg2000_codestream_larger_than_the_header_is_refused() -> None:
    ds = _quiet_read(Path(pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm")))
    ds.Rows = ds.Rows // 2
    with pytest.raises(RetrieveError, match="larger image"):
        transcode(part10_bytes(ds), ExplicitVRLittleEndian)


@pytest.mark.parametrize("seed", range(8))
def test_damaged_jpeg_never_escapes_as_anything_but_retrieve_error(seed: int) -> None:
    ds, frame = _jpeg_frame()
    damaged = bytearray(frame)
    rng = np.random.default_rng(seed)
    for index in rng.integers(2, len(frame), size=16):
        damaged[index] = int(rng.integers(0, 256))
    ds.PixelData = encapsulate([bytes(damaged)])
    try:
        transcode(part10_bytes(ds), ExplicitVRLittleEndian)
    except RetrieveError as exc:
        assert str(exc)  # a JPEG decoder may also paint over the damage; both are fine


def test_garbage_fragments_are_a_retrieve_error() -> None:
    with pytest.raises(RetrieveError):
        transcode(_encapsulated_ct(b"\xff\xd8\xff\xc0" + b"\x00" * 64), ExplicitVRLittleEndian)
    with pytest.raises(RetrieveError):
        transcode(_encapsulated_ct(b"not a codestream", RLELossless), ImplicitVRLittleEndian)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("Rows", None), ("BitsAllocated", 12), ("NumberOfFrames", "-3"), ("SamplesPerPixel", 9)],
)
def test_invalid_image_header_is_a_retrieve_error(keyword: str, value: Any) -> None:
    _, frame = _jpeg_frame()
    with pytest.raises(RetrieveError):
        transcode(_encapsulated_ct(frame, **{keyword: value}), ExplicitVRLittleEndian)


def test_deflate_bomb_is_refused() -> None:
    body = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = body.compress(b"\x00" * (8 * 1024 * 1024)) + body.flush()
    data = _part10(DeflatedExplicitVRLittleEndian, bomb)
    with pytest.raises(RetrieveError, match="inflates"):
        transcode(data, ImplicitVRLittleEndian, max_pixel_bytes=1024 * 1024)


def test_unsupported_target_and_source_are_retrieve_errors() -> None:
    data = part10_bytes(make_ct(seed=3))
    with pytest.raises(RetrieveError, match="not supported"):
        transcode(data, JPEGBaseline8Bit)
    with pytest.raises(RetrieveError, match="no decoder"):
        transcode(_part10(MPEG2MPML, dataset_bytes(data)[1]), ExplicitVRLittleEndian)
    with pytest.raises(RetrieveError, match="Part 10"):
        transcode(b"garbage", ExplicitVRLittleEndian)


@pytest.mark.parametrize(("bits", "vr"), [(8, "OW"), (8, "OB"), (16, "OW"), (32, "OW")])
def test_big_endian_pixel_data_is_read_as_pydicom_reads_it(bits: int, vr: str) -> None:
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]
    values = np.random.default_rng(bits).integers(0, 200, size=(4, 6)).astype(dtype)
    ds = make_ct(4, 6, seed=6, BitsAllocated=bits, BitsStored=bits, HighBit=bits - 1)
    ds.SmallestImagePixelValue = 0  # US or SS: written big endian as US
    ds.PixelData = values.astype(values.dtype.newbyteorder(">")).tobytes()
    if bits == 8 and vr == "OW":  # PS3.5 A.3: 8-bit values in 16-bit words, each word byte-swapped
        ds.PixelData = values.view(">u2").astype("<u2").tobytes()
    ds["PixelData"].VR = vr
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    data = part10_bytes(ds)
    assert np.array_equal(_quiet_read(data).pixel_array, values)
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        converted = _quiet_read(_part10(target, transcode(data, target)))
        assert np.array_equal(converted.pixel_array, values), target.name
        assert converted.SmallestImagePixelValue == 0
        assert converted.Rows == 4 and converted.BitsAllocated == bits


def test_icon_image_in_a_sequence_is_decoded_too() -> None:
    icon = make_ct(8, 8, seed=7)
    icon_pixels = icon.pixel_array.copy()
    icon.compress(RLELossless, generate_instance_uid=False)
    item = Dataset()
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated"):
        setattr(item, keyword, icon.get(keyword))
    item.BitsStored, item.HighBit, item.PixelRepresentation = 12, 11, 0
    item.PixelData = icon.PixelData
    item["PixelData"].VR = "OB"
    item["PixelData"].is_undefined_length = True
    ds = make_ct(16, 16, seed=8)
    pixels = ds.pixel_array.copy()
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.IconImageSequence = [item]
    converted = _quiet_read(
        _part10(ExplicitVRLittleEndian, transcode(part10_bytes(ds), ExplicitVRLittleEndian))
    )
    assert np.array_equal(converted.pixel_array, pixels)
    decoded_icon = converted.IconImageSequence[0]
    assert not decoded_icon["PixelData"].is_undefined_length
    assert np.frombuffer(decoded_icon.PixelData, "<u2").reshape(8, 8).tolist() == icon_pixels.tolist()


def test_rle_round_trip_of_a_synthetic_multiframe_image() -> None:
    ds = make_ct(32, 16, seed=4)
    frames = np.random.default_rng(5).integers(0, 4096, size=(3, 32, 16), dtype=np.uint16)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.compress(RLELossless, generate_instance_uid=False)
    body = transcode(part10_bytes(ds), ImplicitVRLittleEndian)
    converted = _quiet_read(_part10(ImplicitVRLittleEndian, body))
    assert np.array_equal(converted.pixel_array, frames)
    assert converted.SOPInstanceUID == ds.SOPInstanceUID
    assert "LossyImageCompression" not in converted
