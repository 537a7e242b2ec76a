"""WADO-RS metadata (DICOM JSON, PS3.18 F.2) written straight from a stored object's bytes.

OHIF asks for a series' metadata before it shows a first image.  :func:`~safepacs.dicom.bulkdata.metadata`
over :func:`~safepacs.dicom.bulkdata.load_pruned` reads the whole object with pydicom, converts every
element through a ``DataElement`` and ``to_json_dict`` and was most of that request's CPU (about
3 ms of a 512x512 CT slice, bench/README.md).  :func:`metadata_json` walks the elements of the data
set once (PS3.5 7.1, 7.5) and converts each value by its VR into what that slow path gives, without
building a data set:

* text as pydicom decodes it: the default character set (ISO 8859-1) for AE, AS, CS, DA, DS, DT,
  IS, TM, UI and UR, the Specific Character Set of the data set or its nearest enclosing one for
  LO, LT, PN, SH, ST, UC and UT; multiple values split at backslashes; padding stripped where and as
  pydicom strips it (trailing spaces and NULs, both ends for AE and UI); IS and DS as numbers;
* PN as its non-empty component groups, empty values (F.2.5) without "Value", an empty value among
  several as ``null`` (:mod:`~safepacs.dicom.dicomjson`'s rules);
* binary values as ``InlineBinary``, or ``BulkDataURI`` above
  :data:`~safepacs.dicom.bulkdata.BULK_THRESHOLD` once base64 encoded, with the element path the
  bulkdata resource resolves; Pixel Data is stepped over and sent last as a ``BulkDataURI``;
* in implicit VR, the VR from pydicom's dictionaries, private ones through the block's creator, and
  the ambiguous VRs pydicom corrects (US or SS from the nearest Pixel Representation, OB or OW,
  LUT Data from its LUT Descriptor);
* Group Length elements left out, sequences recursively.

Anything unusual answers None and the caller uses the slow path (:func:`instance_metadata` does
both): a transfer syntax other than Implicit or Explicit VR Little Endian and the encapsulated ones
(big endian, deflated, private), a data set in the other VR encoding than announced, elements out of
ascending order, a VR pydicom would replace or not know, a value whose conversion pydicom would
retry or refuse (a number that does not parse, a length not a multiple of its value size), text with
ISO 2022 escape sequences or not valid in its character set, undefined lengths other than
sequences and encapsulated pixel data, items nested deeper than
:data:`~safepacs.dicom.nesting.MAX_SEQUENCE_DEPTH` (the slow path prunes those), anything truncated,
and pydicom settings other than SafePACS's (a pydicom hook, numpy or Decimal numbers, dates
converted, validation raising).  A differential test holds the two equal (``json.dumps`` with sorted
keys) over the whole test corpus and generated data sets, and counts what declines.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

from pydicom import config as dicom_config
from pydicom import hooks as dicom_hooks
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from safepacs.dicom.bulkdata import BULK_THRESHOLD, is_encapsulated, load_pruned, metadata
from safepacs.dicom.nesting import MAX_SEQUENCE_DEPTH
from safepacs.dicom.transcode import dataset_offset
from safepacs.errors import InvalidObjectError

__all__ = ["instance_metadata", "metadata_json"]

_IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_PIXEL_REPRESENTATION = 0x00280103
_CHARSET = 0x00080005
_LUT_DESCRIPTOR = 0x00283002
_LUT_DATA = 0x00283006
#: pydicom's ``to_json_dict``: a binary value longer than this is a BulkDataURI (base64 is 4/3 longer).
_INLINE_MAX = (BULK_THRESHOLD // 4) * 3

_HEADER_IMPLICIT = struct.Struct("<HHL")
_HEADER_EXPLICIT = struct.Struct("<HH2sH")
_LENGTH = struct.Struct("<L")
_VR_TEXT = {v.value.encode("ascii"): v.value for v in VR if len(v.value) == 2}
_LONG_VRS = frozenset(str(v).encode("ascii") for v in EXPLICIT_VR_LENGTH_32)

_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: struct format of one value of the numeric VRs (pydicom's ``convert_numbers``).
_NUMBERS = {
    vr: (struct.Struct("<" + code), code, struct.calcsize("<" + code))
    for vr, code in (
        ("US", "H"),
        ("SS", "h"),
        ("UL", "L"),
        ("SL", "l"),
        ("FL", "f"),
        ("FD", "d"),
        ("SV", "q"),
        ("UV", "Q"),
    )
}
#: Strings in the default character set that pydicom's ``multi_string`` splits after stripping
#: trailing spaces and NULs (DA, DT and TM stay strings: ``config.datetime_conversion`` is off).
_PLAIN = frozenset({"AS", "CS", "DA", "DT", "TM"})
_CHARSET_MULTI = frozenset({"LO", "SH", "UC"})  # pydicom's convert_text
_CHARSET_SINGLE = frozenset({"LT", "ST", "UT"})  # pydicom's convert_single_string
_CHARSET_VRS = _CHARSET_MULTI | _CHARSET_SINGLE | {"PN"}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")

# The ambiguous VRs pydicom corrects after an implicit VR read (filewriter._correct_ambiguous_vr_element).
_US_SS_TAGS = frozenset(
    {
        0x00189810,
        0x00221452,
        0x00280104,
        0x00280105,
        0x00280106,
        0x00280107,
        0x00280108,
        0x00280109,
        0x00280110,
        0x00280111,
        0x00280120,
        0x00280121,
        0x00281101,
        0x00281102,
        0x00281103,
        0x00283002,
        0x00409211,
        0x00409216,
        0x00603004,
        0x00603006,
    }
)
_OB_OW_TAGS = frozenset({0x54000110, 0x54000112, 0x5400100A, 0x54001010}) | {
    group << 16 | 0x3000 for group in range(0x6000, 0x601F, 2)
}
#: pydicom adds 65536 to a negative first value of these when it reads them as a list (hooks.py).
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})

#: A Pixel Representation that is absent, empty, or not one value of 0 or 1 (not the plain cases).
_ABSENT, _EMPTY, _ODD = -1, -2, -3

#: The caches below fill from stored data (tags, private creators, character sets, transfer syntaxes),
#: so each keeps at most this many entries; what is not kept is looked up again.
_CACHE_MAX = 16384
_KEYS: dict[int, str] = {}
_DICTIONARY_VR: dict[int, str | None] = {}
_PRIVATE_VR: dict[tuple[int, str], str] = {}
_ENCODINGS: dict[bytes, list[str]] = {}
_SYNTAXES: dict[str, bool | None] = {}  # transfer syntax -> implicit VR, None: not read here


class _Unusual(Exception):
    """Something the slow path should judge."""


class _Context:
    """One data set being read (the top level or an item): what its later elements depend on."""

    __slots__ = ("creators", "encodings", "lut", "parent", "pixels", "pixrep", "top")

    def __init__(self, parent: _Context | None, encodings: list[str], *, top: bool = False) -> None:
        self.parent = parent  # where a Pixel Representation is inherited from (see _Reader.resolve)
        self.top = top
        self.encodings = encodings
        self.pixrep = _ABSENT
        self.pixels = False  # holds Pixel Data (an icon image's item)
        self.lut: bytes | None = None  # the first value of its LUT Descriptor, when it has several
        self.creators: dict[int, str | None] = {}  # private block -> creator (None: not a plain LO)


def instance_metadata(part10: bytes, uri_of: Callable[[str], str]) -> tuple[dict[str, Any], bool]:
    """The DICOM JSON of a stored object (see :func:`~safepacs.dicom.bulkdata.metadata`), and whether
    items nested too deeply were left out of it: :func:`metadata_json` when it reads the object, else
    pydicom's reader and converter.  :class:`~safepacs.errors.RetrieveError` as the slow path raises it."""
    fast = metadata_json(part10, uri_of)
    if fast is not None:
        return fast, False
    ds, pruned = load_pruned(part10)
    return metadata(ds, uri_of), pruned


def metadata_json(part10: bytes, uri_of: Callable[[str], str]) -> dict[str, Any] | None:
    """What ``bulkdata.metadata(bulkdata.load_pruned(part10)[0], uri_of)`` gives, read without
    pydicom's reader; None when the object is unusual (see the module)."""
    if not _pydicom_as_configured():
        return None
    try:
        ts, offset = dataset_offset(part10)
    except InvalidObjectError:
        return None
    implicit = _syntax(ts)
    if implicit is None:
        return None
    if len(part10) - offset >= 6:  # pydicom tells the data set's real encoding from its first element
        first = part10[offset + 4 : offset + 6]
        if (0x40 < first[0] < 0x5B and 0x40 < first[1] < 0x5B) == implicit:
            return None
    reader = _Reader(part10, uri_of)
    try:
        out, _ = reader.dataset(_Context(None, [default_encoding], top=True), offset, -1, implicit, "", 0)
        reader.resolve()
    except (_Unusual, struct.error, RecursionError):
        return None
    if reader.pixel_vr is not None:
        vr = "OB" if is_encapsulated(ts) else reader.pixel_vr
        out["7FE00010"] = {"vr": vr, "BulkDataURI": uri_of("7FE00010")}
    return out


def _pydicom_as_configured() -> bool:
    """Whether pydicom converts values as this module assumes (its defaults, validation not raising)."""
    hooks = dicom_hooks.hooks
    return (
        dicom_config.settings.reading_validation_mode != dicom_config.RAISE
        and not dicom_config.datetime_conversion
        and not dicom_config.use_DS_decimal
        and not dicom_config.use_DS_numpy
        and not dicom_config.use_IS_numpy
        and not dicom_config.use_none_as_empty_text_VR_value
        and dicom_config.replace_un_with_known_vr
        and dicom_config.assume_implicit_vr_switch
        and dicom_config.data_element_callback is None
        and not hooks.raw_element_kwargs
        and hooks.raw_element_vr is dicom_hooks.raw_element_vr
        and hooks.raw_element_value is dicom_hooks.raw_element_value
    )


def _syntax(ts: str) -> bool | None:
    """Whether ``ts`` is implicit VR; None unless it is a little endian, not deflated syntax pydicom knows."""
    if ts not in _SYNTAXES:
        if len(_SYNTAXES) >= _CACHE_MAX:
            _SYNTAXES.clear()
        uid = UID(ts)
        implicit: bool | None = None
        if ts == _IMPLICIT_VR_LE:
            implicit = True
        elif uid.is_transfer_syntax and uid.is_little_endian and not uid.is_deflated:
            implicit = None if uid.is_implicit_VR else False
        _SYNTAXES[ts] = implicit
    return _SYNTAXES[ts]


def _key(tag: int) -> str:
    key = _KEYS.get(tag)
    if key is None:
        key = f"{tag:08X}"
        if len(_KEYS) < _CACHE_MAX:
            _KEYS[tag] = key
    return key


def _dictionary_vr(tag: int) -> str | None:
    if tag in _DICTIONARY_VR:
        return _DICTIONARY_VR[tag]
    try:
        vr: str | None = dictionary_VR(tag)
    except KeyError:
        vr = None
    if len(_DICTIONARY_VR) < _CACHE_MAX:
        _DICTIONARY_VR[tag] = vr
    return vr


def _private_vr(tag: int, ctx: _Context) -> str:
    """pydicom's ``hooks._private_vr_for_tag`` in the data set ``ctx``."""
    element = tag & 0xFFFF
    if 0x0010 <= element <= 0x00FF:
        return "LO"  # a private creator
    if not element & 0xFF00:
        return "UN"
    block = (tag >> 16) << 8 | element >> 8
    if block not in ctx.creators:
        return "UN"
    creator = ctx.creators[block]
    if creator is None:
        raise _Unusual  # a creator that is not one LO value: pydicom looks it up as it is
    found = _PRIVATE_VR.get((tag, creator))
    if found is None:
        try:
            found = private_dictionary_VR(tag, creator)
        except KeyError:
            found = "UN"
        if len(_PRIVATE_VR) < _CACHE_MAX:
            _PRIVATE_VR[(tag, creator)] = found
    return found


def _encodings(raw: bytes) -> list[str]:
    """The Python encodings of a Specific Character Set value, as pydicom's reader makes them."""
    found = _ENCODINGS.get(raw)
    if found is None:
        values = raw.decode(default_encoding).rstrip(" \x00").split("\\")
        found = convert_encodings(values[0] if len(values) == 1 else values)
        if len(_ENCODINGS) < 256:
            _ENCODINGS[raw] = found
    return found


def _decode(raw: bytes, encodings: list[str]) -> str:
    """Text in the Specific Character Set (pydicom's ``decode_bytes`` without code extensions)."""
    if b"\x1b" in raw or (len(encodings) > 1 and not raw.isascii()):
        raise _Unusual
    try:
        return raw.decode(encodings[0])
    except (UnicodeError, LookupError):
        raise _Unusual from None  # pydicom would warn and replace or fall back


def _values(vr: str, pieces: list[Any]) -> dict[str, Any]:
    """The attribute object of values already converted: one empty string is an empty attribute, and
    among several values a string of nothing but spaces and NULs is ``null`` (dicomjson's rule)."""
    if len(pieces) == 1:
        return {"vr": vr, "Value": pieces} if pieces[0] != "" else {"vr": vr}
    return {"vr": vr, "Value": [None if isinstance(p, str) and not p.strip(" \x00") else p for p in pieces]}


def _number(piece: str, parse: Callable[[str], Any], single: bool) -> Any:
    """An IS or DS value as pydicom's IS or DSfloat reads it; "" for an empty one."""
    if not piece.strip():
        if piece.strip(" \x00") or (single and piece):
            raise _Unusual  # pydicom keeps it as a string, which JSON cannot make a number of
        return ""
    return parse(piece)


def _integer(piece: str) -> int:
    try:
        value = int(piece)
    except ValueError:
        try:
            number = float(piece)
        except ValueError:
            raise _Unusual from None
        if number != number or number in (float("inf"), float("-inf")) or number != int(number):
            raise _Unusual from None
        value = int(number)
    if not -(2**31) <= value < 2**31:
        raise _Unusual  # pydicom keeps larger ones as floats
    return value


def _decimal(piece: str) -> float:
    try:
        return float(piece)
    except ValueError:
        raise _Unusual from None


def _person_name(piece: str) -> dict[str, str] | None:
    """One PN value's non-empty component groups of the first three (pydicom's ``components``); None
    when it has none (dicomjson's ``_person_name``)."""
    groups = piece.split("=")
    named = {key: group for key, group in zip(_PN_GROUPS, groups, strict=False) if group}
    return named or None


class _Reader:
    """One walk over one object's data set."""

    def __init__(self, data: bytes, uri_of: Callable[[str], str]) -> None:
        self.data = data
        self.size = len(data)
        self.uri_of = uri_of
        self.pixel_vr: str | None = None
        #: US or SS values whose VR waits for every Pixel Representation around them to be read.
        self.pending: list[tuple[_Context, dict[str, Any], int, int]] = []

    def dataset(
        self, ctx: _Context, pos: int, end: int, implicit: bool, prefix: str, level: int
    ) -> tuple[dict[str, Any], int]:
        """The attributes of the data set from ``pos`` to ``end`` (-1: to its Item Delimitation Item,
        or for the top level to the end of the data); the offset after it."""
        data, size = self.data, self.size
        limit = size if end < 0 else end
        out: dict[str, Any] = {}
        last = -1
        unpack_implicit, unpack_explicit = _HEADER_IMPLICIT.unpack_from, _HEADER_EXPLICIT.unpack_from
        while True:
            if limit - pos < 8:
                if ctx.top or (end >= 0 and pos == end):
                    return out, pos  # pydicom stops before a header cut short at the top level
                raise _Unusual
            vr: str | None
            if implicit:
                group, element, length = unpack_implicit(data, pos)
                vr, value_at = None, pos + 8
            else:
                group, element, vr_bytes, length = unpack_explicit(data, pos)
                value_at = pos + 8
                if group == 0xFFFE:
                    group, element, length = unpack_implicit(data, pos)
                    vr = None
                else:
                    vr = _VR_TEXT.get(vr_bytes)
                    if vr is None:
                        raise _Unusual
                    if vr_bytes in _LONG_VRS:
                        if limit - pos < 12:
                            raise _Unusual
                        length = _LENGTH.unpack_from(data, pos + 8)[0]
                        value_at = pos + 12
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and end < 0 and not ctx.top:
                    return out, pos + 8
                raise _Unusual
            if tag <= last or (ctx.top and group < 0x0008):
                raise _Unusual
            last = tag
            key = _key(tag)
            if group & 1 and 0x0010 <= element <= 0x00FF:  # a private creator: named below if one LO
                ctx.creators[group << 8 | element] = None
            if length == _UNDEFINED:
                pos = self._undefined(ctx, out, tag, key, vr, value_at, implicit, prefix, level)
                continue
            pos = value_at + length
            if pos > limit:
                raise _Unusual
            if vr is None:
                vr = _dictionary_vr(tag)
                if vr is None:
                    if group & 1:
                        vr = _private_vr(tag, ctx)
                    else:
                        vr = "UL" if element == 0 else "UN"
            elif vr == "UN":
                if group & 1:
                    replaced = _private_vr(tag, ctx)
                else:
                    replaced = (_dictionary_vr(tag) or "UN") if length < 0xFFFF else "UN"
                if replaced != "UN":
                    raise _Unusual  # pydicom reads it by the VR it knows for the tag
            if tag < _CHARSET and (vr == "SQ" or vr in _CHARSET_VRS):
                raise _Unusual  # before the Specific Character Set that pydicom applies to it
            if tag == _CHARSET:
                if vr != "CS":
                    raise _Unusual
                ctx.encodings = _encodings(data[value_at:pos])
            elif tag == _PIXEL_DATA:
                if ctx.top:
                    self.pixel_vr = self._pixel_vr(vr, implicit, undefined=False)
                    continue
                ctx.pixels = True
            if vr == "SQ":
                value = self.sequence(ctx, value_at, pos, implicit, prefix + key, level)[0]
            else:
                value = self.element(ctx, tag, vr, value_at, pos, prefix + key)
            if element:  # Group Length is never in DICOM JSON (PS3.18 F.2.2)
                out[key] = value

    def _undefined(
        self,
        ctx: _Context,
        out: dict[str, Any],
        tag: int,
        key: str,
        vr: str | None,
        value_at: int,
        implicit: bool,
        prefix: str,
        level: int,
    ) -> int:
        """An element of undefined length: a sequence, or encapsulated pixel data; where it ends."""
        if implicit:
            vr = _dictionary_vr(tag)
            if vr is None and self.data[value_at : value_at + 4] == b"\xfe\xff\x00\xe0":
                vr = "SQ"  # pydicom reads an unknown element of undefined length holding items so
        if vr == "SQ":
            if tag < _CHARSET:
                raise _Unusual
            value, pos = self.sequence(ctx, value_at, -1, implicit, prefix + key, level)
            if tag & 0xFFFF:
                out[key] = value
            return pos
        if tag != _PIXEL_DATA or vr not in ("OB", "OW", "OB or OW"):
            raise _Unusual
        delimiter = self._fragments(value_at)
        if ctx.top:
            self.pixel_vr = self._pixel_vr(vr, implicit, undefined=True)
        else:
            ctx.pixels = True
            out[key] = self._binary("OB" if implicit else vr, value_at, delimiter, prefix + key)
        return delimiter + 8

    def _pixel_vr(self, vr: str, implicit: bool, *, undefined: bool) -> str:
        """The VR :func:`~safepacs.dicom.bulkdata.metadata` gives the top level's Pixel Data (for a
        syntax that is not encapsulated): OB or OW as read, as pydicom corrects it in implicit VR."""
        if implicit:
            return "OB" if undefined else "OW"
        if vr not in ("OB", "OW"):
            raise _Unusual
        return vr

    def _fragments(self, pos: int) -> int:
        """Where the Sequence Delimitation Item after the fragments starting at ``pos`` is (PS3.5 A.4)."""
        data, size = self.data, self.size
        while True:
            if size - pos < 8:
                raise _Unusual
            group, element, length = _HEADER_IMPLICIT.unpack_from(data, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise _Unusual
            pos += 8 + length
            if pos > size:
                raise _Unusual

    def sequence(
        self, ctx: _Context, pos: int, end: int, implicit: bool, path: str, level: int
    ) -> tuple[dict[str, Any], int]:
        """A sequence's attribute object, its items from ``pos`` to ``end`` (-1: to its delimiter)."""
        data = self.data
        limit = self.size if end < 0 else end
        items: list[dict[str, Any]] = []
        while True:
            if end >= 0 and pos == end:
                break
            if limit - pos < 8:
                raise _Unusual
            group, element, length = _HEADER_IMPLICIT.unpack_from(data, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END and end < 0:
                pos += 8
                break
            if tag != _ITEM or level >= MAX_SEQUENCE_DEPTH:
                raise _Unusual
            content = pos + 8
            item_end = -1 if length == _UNDEFINED else content + length
            if item_end > limit:
                raise _Unusual
            if not implicit and (item_end < 0 or item_end - content >= 8) and limit - content >= 8:
                first = data[content : content + 4]
                vr = data[content + 4 : content + 6]
                if first != b"\xfe\xff\x0d\xe0" and not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
                    raise _Unusual  # an item written in implicit VR in an explicit VR data set
            # pydicom hands a Pixel Representation down only into the items of a sequence it reads
            # when the sequence is first used: one of defined length, not one read with its data set
            child = _Context(ctx if end >= 0 else None, ctx.encodings)
            item, pos = self.dataset(child, content, item_end, implicit, f"{path}/{len(items)}/", level + 1)
            items.append(item)
        return ({"vr": "SQ", "Value": items} if items else {"vr": "SQ"}), pos

    def _binary(self, vr: str, start: int, end: int, path: str) -> dict[str, Any]:
        if end == start:
            return {"vr": vr}
        if end - start > _INLINE_MAX:
            return {"vr": vr, "BulkDataURI": self.uri_of(path)}
        return {"vr": vr, "InlineBinary": base64.b64encode(self.data[start:end]).decode("ascii")}

    def element(self, ctx: _Context, tag: int, vr: str, start: int, end: int, path: str) -> dict[str, Any]:
        """The attribute object of a value that is not a sequence (see the module)."""
        if " or " in vr:
            resolved = self._ambiguous(ctx, tag, vr, start, end)
            if resolved is None:
                return self.pending[-1][1]
            vr = resolved
        if vr in _BINARY:
            return self._binary(vr, start, end, path)
        raw = self.data[start:end]
        if tag == _PIXEL_REPRESENTATION:
            ctx.pixrep = _EMPTY if not raw else _ODD
            if vr in ("US", "SS") and len(raw) == 2 and raw in (b"\x00\x00", b"\x01\x00"):
                ctx.pixrep = raw[0]
        if not raw:
            if vr == "LO" and tag & 0x00010000 and 0x0010 <= tag & 0xFFFF <= 0x00FF:
                ctx.creators[(tag >> 16) << 8 | (tag & 0xFF)] = ""  # pydicom looks "" up: nothing
            return {"vr": vr}
        number = _NUMBERS.get(vr)
        if number is not None:
            one, code, size = number
            if len(raw) % size:
                raise _Unusual  # pydicom refuses the length
            if len(raw) == size:
                return {"vr": vr, "Value": [one.unpack(raw)[0]]}
            values = list(struct.unpack(f"<{len(raw) // size}{code}", raw))
            if tag in _LUT_DESCRIPTORS:
                if values[0] < 0:
                    values[0] += 65536
                if tag == _LUT_DESCRIPTOR:
                    ctx.lut = raw[:2]
            return {"vr": vr, "Value": values}
        if vr in _PLAIN:
            return _values(vr, raw.decode(default_encoding).rstrip(" \x00").split("\\"))
        if vr in _CHARSET_MULTI:
            pieces = [p.rstrip("\x00 ") for p in _decode(raw, ctx.encodings).split("\\")]
            if vr == "LO" and len(pieces) == 1 and tag & 0x00010000 and 0x0010 <= tag & 0xFFFF <= 0x00FF:
                ctx.creators[(tag >> 16) << 8 | (tag & 0xFF)] = pieces[0]  # a private creator
            return _values(vr, pieces)
        if vr in _CHARSET_SINGLE:
            return _values(vr, [_decode(raw, ctx.encodings).rstrip("\x00 ")])
        if vr == "PN":
            pieces = _decode(raw.rstrip(b"\x00 "), ctx.encodings).split("\\")
            names = [_person_name(p) for p in pieces]
            if len(names) == 1 and names[0] is None:
                return {"vr": vr}
            return {"vr": vr, "Value": names}
        if vr == "UI":
            text = raw.decode(default_encoding).rstrip("\x00 ")
            return _values(vr, [p.strip() for p in text.split("\\")])
        if vr == "IS" or vr == "DS":
            text = raw.decode(default_encoding)
            if vr == "DS":
                text = text.strip()
            pieces = text.rstrip(" \x00").split("\\")
            parse = _integer if vr == "IS" else _decimal
            single = len(pieces) == 1
            return _values(vr, [_number(p, parse, single) for p in pieces])
        if vr == "AE":
            return _values(vr, [p.strip() for p in raw.decode(default_encoding).split("\\")])
        if vr == "UR":
            return _values(vr, [raw.decode(default_encoding).rstrip()])
        if vr == "AT":
            if len(raw) % 4:
                raise _Unusual
            pairs = struct.unpack(f"<{len(raw) // 2}H", raw)
            return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]}
        raise _Unusual  # a VR pydicom does not know

    def _ambiguous(self, ctx: _Context, tag: int, vr: str, start: int, end: int) -> str | None:
        """The VR pydicom corrects an ambiguous one (implicit VR) to; None for US or SS, which waits for
        :meth:`resolve` (its Pixel Representation may be read later, in an enclosing data set)."""
        if vr == "OB or OW" and (tag == _PIXEL_DATA or tag in _OB_OW_TAGS):
            return "OW"  # in implicit VR always OW (PS3.5 A.1)
        if vr == "US or OW" and tag == _LUT_DATA:
            if ctx.lut is None:
                raise _Unusual  # no LUT Descriptor of several values: pydicom fails
            return "US" if ctx.lut == b"\x01\x00" else "OW"  # one entry: US (PS3.3 C.11.1.1.1)
        if vr == "US or SS" and tag in _US_SS_TAGS:
            if tag == _LUT_DESCRIPTOR and end - start >= 4:
                ctx.lut = self.data[start : start + 2]
            waiting: dict[str, Any] = {}
            self.pending.append((ctx, waiting, start, end))
            return None
        raise _Unusual  # an ambiguous VR pydicom leaves ambiguous

    def resolve(self) -> None:
        """Give the waiting US or SS values their VR: US when the nearest Pixel Representation (the
        value's data set's, else an enclosing one's through sequences of defined length) is 0, SS when
        it is 1; with none, US where pydicom assumes it (no Pixel Representation and no Pixel Data in
        that data set; the top level's Pixel Data is not there when the slow path converts)."""
        for ctx, waiting, start, end in self.pending:
            rep: int | None = None
            around: _Context | None = ctx
            while around is not None:
                if around.pixrep >= 0:
                    rep = around.pixrep
                    break
                if around.pixrep == _ODD:
                    raise _Unusual
                around = around.parent
            if rep is None:
                if ctx.pixrep != _ABSENT or not (ctx.top or not ctx.pixels):
                    raise _Unusual
                rep = 0
            vr = "US" if rep == 0 else "SS"
            waiting["vr"] = vr
            if end > start:
                if (end - start) % 2:
                    raise _Unusual
                code = "H" if rep == 0 else "h"
                waiting["Value"] = list(struct.unpack(f"<{(end - start) // 2}{code}", self.data[start:end]))
