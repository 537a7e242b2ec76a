"""Frames and bulk data of a stored instance: what WADO-RS frames and bulkdata resources send
(PS3.18 10.4.1, 8.7.3.5), as pure functions of the stored Part 10 bytes.

* :func:`load` parses a stored object; a Deflated data set is inflated with the size limit of
  :func:`~safepacs.dicom.transcode.transcode` first (pydicom would inflate without one).  An
  object stored before ingest refused data sets nested deeper than
  :data:`~safepacs.dicom.nesting.MAX_SEQUENCE_DEPTH` sequence levels is read without the items
  deeper than that (:func:`~safepacs.dicom.nesting.prune`: their sequences are kept, empty), so that
  pydicom, which reads and converts sequences recursively, can read and render it;
  :func:`load_pruned` says whether that happened.
* :func:`stored_frame` is a frame of encapsulated pixel data as stored (PS3.5 A.4), sent with the
  media type :func:`stored_media_type` gives for its transfer syntax (PS3.18 Table 8.7.3-5).
* :func:`native_frame` is a frame as native pixels, little endian (the Explicit VR Little Endian
  encoding, PS3.5 A.2, of that frame): compressed frames are decoded one at a time through pydicom
  with YCbCr turned into RGB, as WADO-RS does for whole instances; big endian data is byte-swapped.
* :func:`metadata` is the DICOM JSON of an instance (PS3.18 F.2) whose pixel data and other large
  binary values are ``BulkDataURI`` references; :func:`element_at` finds the element such a URI
  names and :func:`element_bytes` gives its value, little endian.

Every failure is a :class:`~safepacs.errors.RetrieveError` with a one-sentence reason (no PHI).
Before a compressed frame is decoded its header is checked against the image's Rows and Columns
(:func:`~safepacs.dicom.transcode.check_pixel_header`), and no frame larger than
:data:`MAX_FRAME_BYTES` is decoded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments, get_frame
from pydicom.filereader import read_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)

from safepacs.dicom import nesting
from safepacs.dicom.dicomjson import dataset_json
from safepacs.dicom.transcode import Geometry, can_convert, check_pixel_header, dataset_bytes, transcode
from safepacs.errors import InvalidObjectError, RetrieveError

__all__ = [
    "BULK_THRESHOLD",
    "MAX_FRAME_BYTES",
    "NATIVE_MEDIA_TYPE",
    "element_at",
    "element_bytes",
    "geometry",
    "has_pixels",
    "is_encapsulated",
    "is_video",
    "load",
    "load_pruned",
    "metadata",
    "native_frame",
    "stored_frame",
    "stored_media_type",
    "transfer_syntax",
    "valid_path",
    "video_stream",
]

#: The largest single decoded frame sent or rendered (a 16-bit 16384 x 16384 image is 512 MiB).
MAX_FRAME_BYTES = 512 * 1024**2
#: Media type of native (uncompressed) frames and bulk data (PS3.18 8.7.3).
NATIVE_MEDIA_TYPE = "application/octet-stream"
#: Binary values longer than this are sent as BulkDataURI in metadata, shorter ones inline.
BULK_THRESHOLD = 1024

_PIXEL_DATA = 0x7FE00010
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: PS3.18 Table 8.7.3-5 (and Table 8.7.4-2 for video): media types of compressed pixel data.
_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    **{f"1.2.840.10008.1.2.4.{n}{f}": "video/mpeg2" for n in (100, 101) for f in ("", ".1")},
    **{f"1.2.840.10008.1.2.4.{n}{f}": "video/mp4" for n in range(102, 107) for f in ("", ".1")},
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
#: Byte-swap width of binary VRs, for values of a big endian data set (PS3.5 7.3).
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"})
_PATH_RE = re.compile(r"^[0-9A-Fa-f]{8}(/[0-9]{1,6}/[0-9A-Fa-f]{8})*$")


# Reading --------------------------------------------------------------------------------------------


def load(part10: bytes, *, stop_before_pixels: bool = False) -> Dataset:
    """The data set of a stored Part 10 object, with its file meta (Transfer Syntax UID)."""
    return load_pruned(part10, stop_before_pixels=stop_before_pixels)[0]


def load_pruned(part10: bytes, *, stop_before_pixels: bool = False) -> tuple[Dataset, bool]:
    """:func:`load`, and whether items nested deeper than
    :data:`~safepacs.dicom.nesting.MAX_SEQUENCE_DEPTH` levels were left out of the data set."""
    try:
        ts, encoded = dataset_bytes(part10)
    except InvalidObjectError as exc:
        raise RetrieveError("the stored object is not a readable DICOM Part 10 file") from exc
    try:
        uid = UID(ts)
        if uid != DeflatedExplicitVRLittleEndian:
            pruned = nesting.prune(encoded, implicit=uid.is_implicit_VR, little_endian=uid.is_little_endian)
            if pruned is not None:  # the same file meta, the data set without its deepest items
                part10 = part10[: len(part10) - len(encoded)] + pruned
            return pydicom.dcmread(BytesIO(part10), stop_before_pixels=stop_before_pixels), pruned is not None
        inflated = transcode(part10, ExplicitVRLittleEndian)  # bounded inflate (PS3.5 A.5)
        pruned = nesting.prune(inflated, implicit=False, little_endian=True)
        ds = read_dataset(
            BytesIO(inflated if pruned is None else pruned), is_implicit_VR=False, is_little_endian=True
        )
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds, pruned is not None
    except RetrieveError:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt data (RecursionError on deep nesting)
        raise RetrieveError(f"the stored object cannot be parsed ({type(exc).__name__})") from exc


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(value or ExplicitVRLittleEndian).strip("\x00 ")


def has_pixels(ds: Dataset) -> bool:
    return _PIXEL_DATA in ds


def is_encapsulated(ts: str) -> bool:
    """Whether pixel data in ``ts`` is encapsulated (compressed, PS3.5 A.4)."""
    uid = UID(ts)
    return bool(uid.is_transfer_syntax and uid.is_encapsulated)


def is_video(ts: str) -> bool:
    return stored_media_type(ts).startswith("video/")


def stored_media_type(ts: str) -> str:
    """The media type of frames stored in ``ts`` (PS3.18 Table 8.7.3-5); octet-stream for native ones."""
    if not is_encapsulated(ts):
        return NATIVE_MEDIA_TYPE
    return _MEDIA_TYPES.get(ts, NATIVE_MEDIA_TYPE)


def geometry(ds: Dataset) -> Geometry:
    """The validated pixel geometry of ``ds`` (see :func:`check_pixel_header`)."""
    if not has_pixels(ds):
        raise RetrieveError("the instance has no pixel data")
    return check_pixel_header(ds, transfer_syntax(ds))


# Frames ---------------------------------------------------------------------------------------------


def stored_frame(ds: Dataset, index: int, shape: Geometry) -> bytes:
    """Frame ``index`` (0-based) of encapsulated pixel data, as stored."""
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        return bytes(get_frame(ds.PixelData, index, number_of_frames=shape.frames, extended_offsets=extended))
    except Exception as exc:  # pydicom raises ValueError and others on broken encapsulation
        raise RetrieveError("a compressed frame cannot be found in the pixel data; it is corrupt") from exc


def video_stream(ds: Dataset) -> Iterator[bytes]:
    """The fragments of encapsulated video pixel data, in order: one stream, not frames (PS3.5 8.2.5)."""
    try:
        yield from generate_fragments(ds.PixelData)
    except Exception as exc:  # pydicom raises several types on broken encapsulation
        raise RetrieveError("the compressed video data is not validly encapsulated") from exc


def native_frame(ds: Dataset, index: int, shape: Geometry) -> bytes:
    """Frame ``index`` (0-based) as native pixels, little endian; compressed frames are decoded."""
    itemsize = max(1, shape.bits_allocated // 8)
    if shape.rows * shape.columns * shape.samples * itemsize > MAX_FRAME_BYTES:
        raise RetrieveError(f"a frame of this image would decode to more than {MAX_FRAME_BYTES} bytes")
    ts = transfer_syntax(ds)
    if not can_convert(ts):
        raise RetrieveError("no decoder is installed for the stored transfer syntax of this instance")
    decoder = get_decoder(UID(ts))
    try:
        if not is_encapsulated(ts) and ts != _BIG_ENDIAN:
            buffer, _ = decoder.as_buffer(ds, index=index)
            return bytes(buffer)
        arr, _ = decoder.as_array(ds, index=index, raw=ts == _BIG_ENDIAN)  # YCbCr becomes RGB
    except Exception as exc:  # the codec plugins raise many types on corrupt data
        raise RetrieveError(f"a frame cannot be decoded ({type(exc).__name__}); it may be corrupt") from exc
    if shape.bits_allocated == 1:
        return bytes(pack_bits(arr))
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


# Bulk data and metadata -------------------------------------------------------------------------------


def metadata(ds: Dataset, uri_of: Callable[[str], str]) -> dict[str, Any]:
    """The DICOM JSON of ``ds`` (PS3.18 F.2, :func:`~safepacs.dicom.dicomjson.dataset_json`: no Group
    Length elements, empty values as F.2.5 says); Pixel Data and binary values over 1 KiB as BulkDataURI.

    ``uri_of`` turns an element path (``7FE00010``, or ``00540016/0/00181074`` in a sequence item:
    tag, item index, tag...) into the URI of the bulkdata resource that :func:`element_at` resolves.
    :class:`RetrieveError` when pydicom cannot convert it (a value it cannot decode, sequences nested
    too deeply for its recursion: :func:`load` leaves the deepest items out first).
    """
    paths: dict[int, str] = {}

    def walk(item: Dataset, prefix: str) -> None:
        for elem in item:
            path = f"{prefix}{elem.tag:08X}"
            if elem.VR == "SQ":
                for number, child in enumerate(elem.value):
                    walk(child, f"{path}/{number}/")
            else:
                paths[id(elem)] = path

    pixels = ds.get(_PIXEL_DATA) if has_pixels(ds) else None
    if pixels is not None:
        del ds[_PIXEL_DATA]
    try:
        walk(ds, "")
        out = dataset_json(ds, lambda elem: uri_of(paths[id(elem)]), BULK_THRESHOLD)
    except Exception as exc:  # values pydicom cannot convert; RecursionError on deeply nested sequences
        raise RetrieveError(
            f"the instance's data set cannot be represented as DICOM JSON ({type(exc).__name__})"
        ) from exc
    finally:
        if pixels is not None:
            ds[_PIXEL_DATA] = pixels
    if pixels is not None:
        vr = "OB" if is_encapsulated(transfer_syntax(ds)) else ("OB" if pixels.VR == "OB" else "OW")
        out["7FE00010"] = {"vr": vr, "BulkDataURI": uri_of("7FE00010")}
    return out


def valid_path(path: str) -> bool:
    """Whether ``path`` has the form of a bulk data element path (see :func:`metadata`)."""
    return bool(_PATH_RE.match(path))


def element_at(ds: Dataset, path: str) -> DataElement | None:
    """The binary element at ``path`` (see :func:`metadata`), or None when there is none."""
    if not valid_path(path):
        return None
    parts = path.split("/")
    item = ds
    for position in range(0, len(parts) - 1, 2):
        tag, number = int(parts[position], 16), int(parts[position + 1])
        if tag not in item:
            return None
        seq = item[tag]
        if seq.VR != "SQ" or number >= len(seq.value):
            return None
        item = seq.value[number]
    tag = int(parts[-1], 16)
    if tag not in item:
        return None
    elem = item[tag]
    return elem if elem.VR in _BULK_VRS and elem.value is not None else None


def element_bytes(ds: Dataset, elem: DataElement) -> bytes:
    """The value of a binary element, little endian (swapped from a big endian data set)."""
    value = bytes(elem.value)
    width = _SWAP_WIDTH.get(str(elem.VR), 1)
    if transfer_syntax(ds) == _BIG_ENDIAN and width > 1:
        usable = len(value) - len(value) % width
        swapped = np.frombuffer(value, dtype=f">u{width}", count=usable // width).astype(f"<u{width}")
        value = swapped.tobytes() + value[usable:]
    return value
