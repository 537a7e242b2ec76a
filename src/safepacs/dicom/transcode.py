"""Transfer syntax conversion for C-STORE sub-operations of C-GET and C-MOVE (PS3.4 C.4.2.3.1, C.4.3.3.1).

SafePACS keeps every instance as the Part 10 file it arrived as.  When the retrieving peer accepted the
stored transfer syntax the stored data set bytes are sent unchanged; otherwise the data set is converted
to Explicit or Implicit VR Little Endian (PS3.5 A.1, A.2), or, when the peer accepted neither, decoded and
encoded losslessly into a compressed syntax it accepted (:data:`PRODUCIBLE`):

* Explicit <-> Implicit VR Little Endian and Deflated Explicit VR Little Endian (PS3.5 A.5, inflated
  with a size limit): the element values are copied byte for byte; only element headers change.
* Explicit VR Big Endian (retired, PS3.5 A.3): numeric values are byte-swapped by their VR.
* Encapsulated syntaxes (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE; PS3.5 A.4): the pixel data is decoded
  through pydicom's pixel data plugins as :func:`pydicom.pixels.decompress` does (YCbCr becomes RGB
  where pydicom converts it; Photometric Interpretation, Planar Configuration and Number of Frames
  follow), also in nested items such as icon images.  Unlike pydicom, the SOP Instance UID is kept (a
  transfer syntax is not a new instance), the extended offset table attributes are removed, and Lossy
  Image Compression "01" is added when an always-lossy JPEG process had left it out (PS3.3 C.7.6.1.1.5).
* Into RLE Lossless, JPEG-LS Lossless or JPEG 2000 Lossless Only (PS3.5 A.4, 8.2): the native pixel data
  is encoded by pydicom's encoders (:func:`pydicom.pixels.compress`: RLE natively, JPEG-LS through
  pyjpegls, JPEG 2000 through pylibjpeg-openjpeg), colour by pixel (Planar Configuration 0) and with
  the SOP Instance UID kept.  Only these lossless syntaxes are produced: SafePACS never compresses lossy
  (a lossy JPEG, JPEG-LS near-lossless or JPEG 2000 syntax is used only for instances stored in it).  A
  lossy original stays flagged as such (Lossy Image Compression "01").  Pixel data in nested items (icon
  images) is left native.

Compressed pixel data is refused *before* decoding when the image header or a frame's codestream
header promises more than ``max_pixel_bytes`` of decoded data (decompression bombs).  Every failure is a
:class:`~safepacs.errors.RetrieveError` with a one-sentence reason; the sub-operation then fails.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence
from io import BytesIO
from typing import Any, NamedTuple

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import compress, pack_bits, pixel_array
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from safepacs.errors import InvalidObjectError, RetrieveError, SafePacsError

__all__ = [
    "MAX_PIXEL_BYTES",
    "PRODUCIBLE",
    "Geometry",
    "can_convert",
    "can_produce",
    "check_pixel_header",
    "choose_transfer_syntax",
    "dataset_bytes",
    "dataset_offset",
    "inflate",
    "transcode",
]

#: Default limit on decoded pixel data (and on an inflated Deflated data set): 2 GiB.
MAX_PIXEL_BYTES = 2 * 1024**3

_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})
_TARGETS = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
#: The compressed syntaxes SafePACS encodes into, all lossless (PS3.5 8.2.2, 8.2.3, 8.2.4), when pydicom
#: has an encoder for them installed (:func:`can_produce`).
PRODUCIBLE = (JPEG2000Lossless, JPEGLSLossless, RLELossless)
#: Syntaxes whose compression is always lossy (PS3.5 A.4.1; the retired lossy JPEG processes have no decoder).
_LOSSY = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}

_UNDEFINED = 0xFFFFFFFF
_MAX_VALUE_LENGTH = 0xFFFFFFFE  # PS3.5 7.1.1: largest defined value length
_PIXEL_DATA = BaseTag(0x7FE00010)
#: Encapsulation-only attributes (PS3.3 C.7.6.3): meaningless once the pixel data is native.
_ENCAPSULATION_TAGS = (BaseTag(0x7FE00001), BaseTag(0x7FE00002), BaseTag(0x7FE00003))
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
#: VRs with a 4-byte length field in explicit VR encodings (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_VRS = _LONG_VRS | {
    *("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS"),
    *("ST", "TM", "UI", "UL", "US"),
}
#: Byte-swap width of each numeric VR (PS3.5 7.3); AT is a pair of 16-bit values.
_SWAP_WIDTH = {
    "AT": 2, "OW": 2, "SS": 2, "US": 2,
    "FL": 4, "OF": 4, "OL": 4, "SL": 4, "UL": 4,
    "FD": 8, "OD": 8, "OV": 8, "SV": 8, "UV": 8,
}  # fmt: skip
#: VRs whose values pydicom keeps as bytes; they are emitted without re-encoding.
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


# Part 10 --------------------------------------------------------------------------------------------


def dataset_bytes(part10: bytes) -> tuple[str, bytes]:
    """(transfer syntax UID, the encoded data set after the file meta group) of a Part 10 file.

    Only the File Meta Information (PS3.10 7.1: preamble, ``DICM``, group 0002 in Explicit VR Little
    Endian) is parsed; the data set is returned undecoded.  Like pydicom, a meta group written in
    implicit VR is tolerated.  Raises :class:`~safepacs.errors.InvalidObjectError` when the bytes are
    not a Part 10 file or the meta group has no Transfer Syntax UID.
    """
    ts, offset = dataset_offset(part10)
    return ts, part10[offset:]


def dataset_offset(part10: bytes) -> tuple[str, int]:
    """(transfer syntax UID, where the data set starts) of a Part 10 file, as :func:`dataset_bytes`
    reads them; for a caller that sends the data set from the file's own buffer instead of a copy."""
    size = len(part10)
    if size < 132 or part10[128:132] != b"DICM":
        raise InvalidObjectError("not a DICOM Part 10 file (no 'DICM' prefix after the preamble, PS3.10 7.1)")
    offset = 132
    explicit: bool | None = None
    ts_value: bytes | None = None
    while offset + 8 <= size:
        group, element = struct.unpack_from("<HH", part10, offset)
        if group != 0x0002:
            break
        vr = part10[offset + 4 : offset + 6]
        if explicit is None:
            explicit = vr.isalpha() and vr.isupper()
        if not explicit:
            length, header = struct.unpack_from("<I", part10, offset + 4)[0], 8
        elif vr.decode("latin-1") in _LONG_VRS:
            if offset + 12 > size:
                raise InvalidObjectError("the file meta information is truncated (PS3.10 7.1)")
            length, header = struct.unpack_from("<I", part10, offset + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", part10, offset + 6)[0], 8
        end = offset + header + length
        if length == _UNDEFINED or end > size:
            raise InvalidObjectError("the file meta information is truncated or malformed (PS3.10 7.1)")
        if element == 0x0010:
            ts_value = part10[offset + header : end]
        offset = end
    ts = (ts_value or b"").decode("ascii", errors="replace").strip("\x00 ")
    if not ts:
        raise InvalidObjectError("the file meta information has no Transfer Syntax UID (0002,0010)")
    return ts, offset


# Choosing ---------------------------------------------------------------------------------------------


@functools.cache
def can_convert(stored_ts: str) -> bool:
    """Whether data sets stored in ``stored_ts`` can be converted to Explicit/Implicit VR Little Endian."""
    uid = UID(stored_ts)
    if uid in _NATIVE or uid == DeflatedExplicitVRLittleEndian:
        return True
    if not (uid.is_transfer_syntax and uid.is_compressed):
        return False
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:  # pydicom has no decoder for this syntax at all (e.g. MPEG)
        return False


@functools.cache
def can_produce(target_ts: str) -> bool:
    """Whether data sets can be encoded into the compressed syntax ``target_ts`` (:data:`PRODUCIBLE`, and
    pydicom has an encoder for it installed)."""
    uid = UID(str(target_ts).strip("\x00 "))
    return uid in PRODUCIBLE and bool(get_encoder(uid).is_available)


def choose_transfer_syntax(stored_ts: str, accepted: Sequence[str]) -> str | None:
    """The transfer syntax to send in (PS3.4 C.4.2.3.1, C.4.3.3.1), of those the peer ``accepted``.

    ``stored_ts`` if the peer accepted it (sent as stored); else, when the stored syntax can be decoded,
    Explicit VR Little Endian, then Implicit VR Little Endian, then the first accepted syntax SafePACS
    can encode into losslessly (:func:`can_produce`); ``None`` when nothing fits.
    """
    offered = [str(ts).strip("\x00 ") for ts in accepted]
    if stored_ts in offered:
        return stored_ts
    if not can_convert(stored_ts):
        return None
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if target in offered:
            return str(target)
    return next((ts for ts in offered if can_produce(ts)), None)


# Converting -----------------------------------------------------------------------------------------


def transcode(part10: bytes, target_ts: str, *, max_pixel_bytes: int = MAX_PIXEL_BYTES) -> bytes:
    """The data set of ``part10`` encoded in ``target_ts`` (no file meta).

    ``target_ts`` equal to the stored syntax returns the stored bytes unchanged.  Otherwise the target
    must be Explicit or Implicit VR Little Endian, or a lossless compressed syntax :func:`can_produce`.
    ``max_pixel_bytes`` bounds the decoded pixel data (Rows x Columns x Samples per Pixel x Number of
    Frames x Bits Allocated / 8, checked before decoding) and the inflated size of a Deflated data set.

    Raises :class:`~safepacs.errors.RetrieveError` (one sentence) when the conversion is impossible:
    no decoder for the stored syntax, corrupt or oversized pixel data, an unsupported target, an image
    the target's encoder does not take (PS3.5 8.2: e.g. 32-bit samples in RLE).
    """
    try:
        stored, encoded = dataset_bytes(part10)
    except InvalidObjectError as exc:
        raise RetrieveError("the stored object is not a readable DICOM Part 10 file") from exc
    target = str(target_ts).strip("\x00 ")
    if target == stored:
        return encoded
    if target not in _TARGETS and not can_produce(target):
        name = UID(target).name if UID(target).is_transfer_syntax else target
        raise RetrieveError(
            f"conversion to '{name}' is not supported, only to Explicit or Implicit VR Little Endian "
            "or to a lossless compressed syntax with an encoder installed"
        )
    uid = UID(stored)
    if not can_convert(uid):
        name = uid.name if uid.is_transfer_syntax else stored
        raise RetrieveError(
            f"no decoder is installed for the stored transfer syntax '{name}'; the peer must accept it as is"
        )
    try:
        if target in _TARGETS:
            return _convert(
                uid, encoded, implicit=target == ImplicitVRLittleEndian, max_pixel_bytes=max_pixel_bytes
            )
        native = (
            encoded
            if uid == ExplicitVRLittleEndian
            else _convert(uid, encoded, implicit=False, max_pixel_bytes=max_pixel_bytes)
        )
        return _encode_pixels(native, UID(target))
    except RetrieveError:
        raise
    except RecursionError as exc:  # pydicom reads and writes sequences recursively
        raise RetrieveError(
            "the stored data set's sequences are nested too deeply to be converted; it can only be sent "
            "as stored"
        ) from exc
    except Exception as exc:  # pydicom and the codec plugins raise many types on corrupt data
        raise RetrieveError(
            f"the stored data set could not be converted from '{uid.name}' ({type(exc).__name__}); "
            "it may be corrupt"
        ) from exc


def _convert(uid: UID, encoded: bytes, *, implicit: bool, max_pixel_bytes: int) -> bytes:
    if uid == DeflatedExplicitVRLittleEndian:
        inflated = inflate(encoded, max_pixel_bytes)
        if not implicit:
            return inflated  # the inflated stream *is* the Explicit VR Little Endian encoding (PS3.5 A.5)
        return _Encoder(implicit=True, swap=False).encode(
            _parse(inflated, implicit=False, little_endian=True)
        )
    if uid in _NATIVE:
        ds = _parse(encoded, implicit=uid.is_implicit_VR, little_endian=uid.is_little_endian)
        return _Encoder(implicit=implicit, swap=not uid.is_little_endian).encode(ds)
    ds = _parse(encoded, implicit=False, little_endian=True)  # PS3.5 A.4: encapsulated is explicit VR LE
    _decompress_tree(ds, uid, max_pixel_bytes)
    return _Encoder(implicit=implicit, swap=False).encode(ds)


def _encode_pixels(native: bytes, target: UID) -> bytes:
    """``native`` (an Explicit VR Little Endian data set) with its Pixel Data encoded into ``target``,
    encapsulated (PS3.5 A.4); a data set without Pixel Data is the same bytes (an encapsulated syntax
    changes only how pixel data is encoded)."""
    ds = _parse(native, implicit=False, little_endian=True)
    if _PIXEL_DATA not in ds:
        return native
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _geometry(ds)  # the image header is valid before an encoder reads it
    if int(ds.SamplesPerPixel) > 1 and _int_or_none(ds.get("PlanarConfiguration")) == 1:
        # Colour by plane: handed to the encoders colour by pixel, as every decoded image is
        planes = pixel_array(ds)
        ds.PixelData = np.ascontiguousarray(planes, dtype=planes.dtype.newbyteorder("<")).tobytes()
        ds.PlanarConfiguration = 0
    try:
        compress(ds, target, generate_instance_uid=False)
    except Exception as exc:  # pydicom and the codecs refuse what the syntax cannot hold
        raise RetrieveError(
            f"the image cannot be encoded in '{target.name}' ({type(exc).__name__}); "
            "the peer must accept another transfer syntax"
        ) from exc
    return _Encoder(implicit=False, swap=False, encapsulated=True).encode(ds)


def _parse(encoded: bytes, *, implicit: bool, little_endian: bool) -> Dataset:
    """The data set, parsed lazily; refused when pydicom stops before the end (a truncated object)."""
    fp = BytesIO(encoded)
    ds = read_dataset(fp, is_implicit_VR=implicit, is_little_endian=little_endian)
    if fp.tell() < len(encoded):
        raise RetrieveError("the stored data set is truncated or cannot be parsed to its end")
    return ds


def inflate(data: bytes, limit: int, error: type[SafePacsError] = RetrieveError) -> bytes:
    """Inflate a Deflated data set (raw deflate, RFC 1951; PS3.5 A.5) to at most ``limit`` bytes;
    ``error`` (a stored object's :class:`RetrieveError` by default, a received one's
    :class:`InvalidObjectError` at ingest) when it is corrupt or inflates to more."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise error("the deflated data set cannot be inflated (PS3.5 A.5); it may be corrupt") from exc
    if len(out) > limit:
        raise error(f"the deflated data set inflates to more than {limit} bytes")
    return out


# Decompressing --------------------------------------------------------------------------------------


def _decompress_tree(ds: Dataset, uid: UID, limit: int) -> None:
    """Decode encapsulated pixel data in ``ds`` and in nested items (icon images, PS3.5 A.4)."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if elem.VR == "SQ" or (elem.VR is None and ds[tag].VR == "SQ"):
            for item in ds[tag].value:
                _decompress_tree(item, uid, limit)
    if _PIXEL_DATA in ds and _is_encapsulated(ds.get_item(_PIXEL_DATA)):
        _decompress(ds, uid, limit)


def _is_encapsulated(elem: DataElement | RawDataElement) -> bool:
    if isinstance(elem, RawDataElement):
        return bool(elem.length == _UNDEFINED)
    return bool(elem.is_undefined_length)


def _decompress(ds: Dataset, uid: UID, limit: int) -> None:
    """Replace encapsulated Pixel Data with native data, as :func:`pydicom.pixels.decompress` does."""
    rows, cols, spp, bits, frames = _geometry(ds)
    itemsize = max(1, bits // 8)  # 1-bit data decodes to one byte per pixel, packed afterwards
    frame_bytes = rows * cols * spp * itemsize
    decoded = frame_bytes * frames  # Python integers: no overflow
    if decoded > limit or decoded > _MAX_VALUE_LENGTH:
        cap = min(limit, _MAX_VALUE_LENGTH)
        raise RetrieveError(f"the image would decode to {decoded} bytes, more than the limit of {cap}")
    _check_codestreams(ds, uid, rows, cols, spp, frames)

    buffer = bytearray(decoded)
    properties: dict[str, str | int] = {}
    count = 0
    decoder = get_decoder(uid)
    for arr, frame_properties in decoder.iter_array(ds, as_rgb=True):
        properties = frame_properties
        if count >= frames:
            raise RetrieveError("the compressed pixel data holds more frames than Number of Frames says")
        frame = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        if frame.nbytes != frame_bytes:
            raise RetrieveError("a decoded frame does not match the image's Rows, Columns and Bits Allocated")
        buffer[count * frame_bytes : (count + 1) * frame_bytes] = frame.data.cast("B")
        count += 1
    if count != frames:
        raise RetrieveError("the compressed pixel data holds fewer frames than Number of Frames says")

    # pydicom takes a bytearray value for a list of numbers; hand it bytes (one transient copy)
    value = pack_bits(np.frombuffer(buffer, dtype=np.uint8)) if bits == 1 else bytes(buffer)
    del buffer
    if len(value) % 2:
        value += b"\x00"  # PS3.5 7.1.1: even value length
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OB" if bits <= 8 else "OW", value)
    for tag in _ENCAPSULATION_TAGS:
        if tag in ds:
            del ds[tag]
    photometric = str(properties.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    if photometric and ds.get("PhotometricInterpretation") != photometric:
        ds.PhotometricInterpretation = photometric
    if spp > 1 and ds.get("PlanarConfiguration") != 0:
        ds.PlanarConfiguration = 0  # pydicom always yields colour-by-pixel frames
    if "NumberOfFrames" in ds and _int_or_none(ds.get("NumberOfFrames")) != count:
        ds.NumberOfFrames = count
    if uid in _LOSSY and "LossyImageCompression" not in ds:
        # PS3.3 C.7.6.1.1.5: once lossy compressed, always flagged, also after decompression.
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = _LOSSY[uid]


class Geometry(NamedTuple):
    """An image's pixel geometry as its header states it (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples: int  # Samples per Pixel
    bits_allocated: int
    frames: int  # Number of Frames (1 when absent)


def check_pixel_header(ds: Dataset, transfer_syntax: str) -> Geometry:
    """The :class:`Geometry` of ``ds``, checked as before decoding: the values valid (PS3.3 C.7.6.3)
    and, for encapsulated pixel data, no frame's JPEG or JPEG 2000 header promising a larger image
    than they say (decompression bombs).

    For callers that decode one frame at a time (WADO-RS frames, rendering).  Raises
    :class:`~safepacs.errors.RetrieveError` with a one-sentence reason.
    """
    geometry = _geometry(ds)
    uid = UID(str(transfer_syntax).strip("\x00 "))
    if _PIXEL_DATA in ds and _is_encapsulated(ds.get_item(_PIXEL_DATA)):
        rows, cols, spp, _, frames = geometry
        try:
            _check_codestreams(ds, uid, rows, cols, spp, frames)
        except RetrieveError:
            raise
        except Exception as exc:  # pydicom raises ValueError and others on broken encapsulation
            raise RetrieveError("the compressed pixel data is not validly encapsulated (PS3.5 A.4)") from exc
    return geometry


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _geometry(ds: Dataset) -> Geometry:
    """The image's :class:`Geometry`, validated (PS3.3 C.7.6.3)."""

    def need(keyword: str, low: int, high: int) -> int:
        value = ds.get(keyword)
        if value is None or value == "":
            raise RetrieveError(f"the image has no {keyword}, so its pixel data cannot be decoded")
        number = _int_or_none(value)
        if number is None or not low <= number <= high:
            raise RetrieveError(
                f"the image's {keyword} value is invalid, so its pixel data cannot be decoded"
            )
        return number

    rows = need("Rows", 1, 0xFFFF)
    cols = need("Columns", 1, 0xFFFF)
    spp = need("SamplesPerPixel", 1, 4)
    bits = need("BitsAllocated", 1, 64)
    if bits != 1 and bits % 8:
        raise RetrieveError("the image's BitsAllocated value is invalid, so its pixel data cannot be decoded")
    frames = ds.get("NumberOfFrames")
    count = 1 if frames in (None, "", 0, "0") else need("NumberOfFrames", 1, 2**31 - 1)
    return Geometry(rows, cols, spp, bits, count)


def _check_codestreams(ds: Dataset, uid: UID, rows: int, cols: int, spp: int, frames: int) -> None:
    """Refuse frames whose JPEG/JPEG 2000 header promises a larger image than the DICOM header.

    The codec plugins allocate what the codestream declares; a 16x16 image whose codestream says
    65535x65535 would otherwise be decoded in full before pydicom notices the mismatch.
    """
    if uid in JPEG2000TransferSyntaxes:
        size_of = _j2k_size
    elif uid in JPEGTransferSyntaxes or uid in JPEGLSTransferSyntaxes:
        size_of = _jpeg_size
    else:
        return  # RLE: the decoder works from the DICOM header's Rows and Columns
    value = ds[_PIXEL_DATA].value
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    for frame in generate_frames(value, number_of_frames=frames, extended_offsets=extended):
        size = size_of(frame)
        if size is not None and size[0] * size[1] * size[2] > rows * cols * spp:
            raise RetrieveError(
                "a compressed frame declares a larger image than the data set's Rows and Columns"
            )


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS SOF segment (ISO 10918-1 B.2.2, 14495-1 C.2.2)."""
    if frame[:2] != b"\xff\xd8":
        return None
    offset, size = 2, len(frame)
    while offset + 4 <= size:
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            offset += 2
            continue
        if marker in _SOF_MARKERS:
            if offset + 10 > size:
                return None
            height, width = struct.unpack_from(">HH", frame, offset + 5)
            components = frame[offset + 9]
            return (height, width, components) if height else None  # height 0: set later by DNL
        if marker == 0xDA:  # SOS before SOF: not a valid codestream
            return None
        offset += 2 + struct.unpack_from(">H", frame, offset + 2)[0]
    return None


_SOF_MARKERS = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
)


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 SIZ segment (ISO 15444-1 A.5.1), JP2 box or bare."""
    offset = 0
    if frame[4:8] == b"jP  ":  # JP2 file format: find the contiguous codestream box
        offset, size = 0, len(frame)
        while offset + 8 <= size:
            length, kind = struct.unpack_from(">I4s", frame, offset)
            if kind == b"jp2c":
                offset += 8
                break
            if length < 8:
                return None
            offset += length
        else:
            return None
    if frame[offset : offset + 4] != b"\xff\x4f\xff\x51" or offset + 42 > len(frame):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, offset + 8)
    components = struct.unpack_from(">H", frame, offset + 40)[0]
    return max(0, ysiz - yosiz), max(0, xsiz - xosiz), components


# Encoding -------------------------------------------------------------------------------------------


class _Encoder:
    """Write a parsed data set in Explicit or Implicit VR Little Endian.

    Values that pydicom has not converted (raw elements) are copied byte for byte, so text is never
    decoded and re-encoded; only converted or changed elements go through pydicom's writer.  Group
    lengths (gggg,0000) are left out (retired, PS3.5 7.2; they would be wrong after re-encoding).
    Sequences and items are written with undefined length (PS3.5 7.5).  ``encapsulated``: the top-level
    Pixel Data is written encapsulated, with undefined length, as an encapsulated syntax requires
    (PS3.5 A.4); otherwise an undefined length outside a sequence is refused.
    """

    def __init__(self, *, implicit: bool, swap: bool, encapsulated: bool = False) -> None:
        self._implicit = implicit
        self._swap = swap  # the source is big endian
        self._encapsulated = encapsulated  # the top-level Pixel Data is encapsulated (PS3.5 A.4)
        self._chunks: list[bytes | bytearray | memoryview] = []

    def encode(self, ds: Dataset) -> bytes:
        self._dataset(ds, [ds], "iso8859")
        return b"".join(self._chunks)

    def _header(self, tag: int, vr: str, length: int) -> None:
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if self._implicit:
            head += struct.pack("<I", length)
        elif vr in _LONG_VRS:
            head += vr.encode("ascii") + struct.pack("<HI", 0, length)
        else:
            head += vr.encode("ascii") + struct.pack("<H", length)
        self._chunks.append(head)

    def _dataset(self, ds: Dataset, ancestors: list[Dataset], parent_charset: Any) -> None:
        charset = ds.get("SpecificCharacterSet", parent_charset)
        for tag in sorted(ds.keys()):
            if tag.element == 0:
                continue
            elem = ds.get_item(tag)
            if isinstance(elem, RawDataElement) and elem.VR != "SQ" and elem.length != _UNDEFINED:
                if len(elem.value or b"") != elem.length:
                    raise RetrieveError(
                        f"the element {Tag(tag)} is shorter than its length; the object is truncated"
                    )
                vr = elem.VR or self._resolve_vr(ds, tag, ancestors)
                if vr != "SQ":
                    self._value(ds, tag, vr, elem.value or b"")
                    continue
            converted = ds[tag]
            if converted.VR == "SQ":
                self._sequence(tag, converted.value, ancestors, charset)
            elif (
                converted.is_undefined_length
                and tag == _PIXEL_DATA
                and self._encapsulated
                and not ancestors[1:]
            ):
                self._element(ds, converted, ancestors, charset)  # encapsulated pixel data (PS3.5 A.4)
            elif converted.is_undefined_length:
                raise RetrieveError(f"the element {Tag(tag)} has an undefined length outside a sequence")
            elif converted.VR in _BYTES_VRS and isinstance(converted.value, bytes | bytearray):
                self._value(ds, tag, converted.VR, converted.value)
            else:
                self._element(ds, converted, ancestors, charset)

    def _sequence(self, tag: int, items: Any, ancestors: list[Dataset], charset: Any) -> None:
        self._header(tag, "SQ", _UNDEFINED)
        for item in items:
            self._chunks.append(_ITEM + struct.pack("<I", _UNDEFINED))
            self._dataset(item, [item, *ancestors], charset)
            self._chunks.append(_ITEM_END)
        self._chunks.append(_SEQUENCE_END)

    def _value(self, ds: Dataset, tag: int, vr: str, value: bytes | bytearray) -> None:
        if self._swap:
            width = _SWAP_WIDTH.get(vr, 1)
            if tag == _PIXEL_DATA:
                # As pydicom reads big endian pixel data: by Bits Allocated; 8-bit data in OW words swapped
                bits = _int_or_none(ds.get("BitsAllocated"))
                width = bits // 8 if bits in (16, 32, 64) else 2 if bits == 8 and vr == "OW" else 1
            if width > 1:
                value = _byteswap(value, width)
        if not self._implicit and vr not in _LONG_VRS and len(value) > 0xFFFF:
            vr = "UN"  # PS3.5 6.2.2 Note: too long for a 16-bit length field
        self._header(tag, vr, len(value))
        self._chunks.append(value)

    def _element(self, ds: Dataset, elem: DataElement, ancestors: list[Dataset], charset: Any) -> None:
        if not self._implicit and elem.VR not in _VRS:
            correct_ambiguous_vr_element(elem, ds, True, ancestors)
            if elem.VR not in _VRS:
                raise RetrieveError(f"the element {elem.tag} has an ambiguous VR that cannot be resolved")
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self._implicit
        write_data_element(fp, elem, charset)
        self._chunks.append(fp.getvalue())

    @staticmethod
    def _resolve_vr(ds: Dataset, tag: BaseTag, ancestors: list[Dataset]) -> str:
        """The VR of an element read in implicit VR, as pydicom resolves it (dictionary, ambiguity rules)."""
        try:
            elem = ds[tag]
            if elem.VR not in _VRS:
                correct_ambiguous_vr_element(elem, ds, True, ancestors)
            vr = str(elem.VR)
        except Exception:  # noqa: BLE001 - an unparsable value keeps its bytes, sent as UN
            return "UN"
        return vr if vr in _VRS else "UN"


def _byteswap(value: bytes | bytearray, width: int) -> bytes:
    usable = len(value) - len(value) % width
    swapped = np.frombuffer(value, dtype=f">u{width}", count=usable // width).astype(f"<u{width}")
    return swapped.tobytes() + bytes(value[usable:])
