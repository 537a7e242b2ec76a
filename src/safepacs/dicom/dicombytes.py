"""C-FIND response identifiers as DICOM bytes (PS3.5 7.1), written straight from index rows.

A C-FIND answers each match with an identifier of a dozen short elements.  Building a pydicom
``Dataset`` per match (:func:`safepacs.db.sql.run_find`) and having pynetdicom encode it cost
several times the CPU of the query itself per match (measured in bench/README.md, "C-FIND
encoding").  This module writes the elements of one value each, as pydicom's writer
(``pydicom.filewriter.write_dataset``) writes them for the data set
:func:`~safepacs.db.sql.run_find` builds, in Implicit or Explicit VR Little Endian:

* text of the response's Specific Character Set (LO, LT, PN, SH, ST, UC, UT) in UTF-8
  (``ISO_IR 192``), every other string VR in pydicom's default encoding (ISO 8859-1);
* multiple values joined by ``\\``; a person name loses its empty trailing component groups
  (pydicom's ``PersonName.encode``);
* padded to even length with a space, UI with a NUL;
* IS from an integer as its decimal digits, US as 16 bits;
* a sequence with defined lengths, its items too.

Anything else raises :class:`Unencodable` and the caller falls back to pydicom's writer for that
response (a value pydicom itself could not encode, a VR this module does not write, a value too long
for a 16-bit length in Explicit VR, where pydicom would change the VR to UN).  A test holds the two
byte for byte equal over every level, model, key and character set of its archive.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

__all__ = ["KNOWN_VRS", "Unencodable", "element", "empty_element", "header", "item", "value_bytes", "writer"]

#: Explicit VR elements with a 4-byte length (PS3.5 Table 7.1-1; pydicom's EXPLICIT_VR_LENGTH_32).
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
#: Text in the Specific Character Set (PS3.5 6.1.2.3; pydicom's CUSTOMIZABLE_CHARSET_VR).
_CHARSET_TEXT = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
#: Strings pydicom writes in its default encoding, padded with a space.
_PLAIN_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UR"})
#: Every VR written here; an empty element of any of them is just its header.
KNOWN_VRS = (
    _CHARSET_TEXT
    | _PLAIN_TEXT
    | _LONG
    | frozenset({"AT", "DS", "FD", "FL", "IS", "SL", "SS", "UI", "UL", "US"})
)
_CHARSET = "utf-8"  # ISO_IR 192, the Specific Character Set of every response (index.sql.RESPONSE_CHARSET)
_DEFAULT = "latin-1"  # pydicom's default_encoding ("iso8859")
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, little endian
_TAG = struct.Struct("<HH")
_SHORT_HEADER = struct.Struct("<HH2sH")
_LONG_HEADER = struct.Struct("<HH2s2xL")
_IMPLICIT_HEADER = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


class Unencodable(Exception):
    """This value is not written here; pydicom's writer decides (and may fail, as it did before)."""


def header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    """The tag, VR (Explicit VR only) and length of an element (PS3.5 7.1.1-7.1.3)."""
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return _IMPLICIT_HEADER.pack(group, elem, length)
    if vr in _LONG:
        return _LONG_HEADER.pack(group, elem, vr.encode("ascii"), length)
    if length > 0xFFFF:
        raise Unencodable(f"{length} bytes do not fit the 16-bit length of VR {vr}")
    return _SHORT_HEADER.pack(group, elem, vr.encode("ascii"), length)


def empty_element(tag: int, vr: str, implicit: bool) -> bytes:
    """A key returned with no value (zero length), as for a key the index does not keep."""
    if vr not in KNOWN_VRS:
        raise Unencodable(f"VR {vr!r}")
    return header(tag, vr, 0, implicit)


def _person_name(value: str) -> bytes:
    """One PN value as pydicom's ``PersonName.encode`` writes it: its component groups in UTF-8,
    empty trailing groups dropped."""
    groups = value.split("=")
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups).encode(_CHARSET)


def value_bytes(vr: str, value: object) -> bytes:
    """The even-length value field of a one-element value from the index (see the module docstring);
    ``b""`` for an empty value.  Raises :class:`Unencodable`."""
    if value is None or value == "" or value == []:
        return b""
    try:
        if vr in _CHARSET_TEXT or vr in _PLAIN_TEXT or vr == "UI":
            if isinstance(value, str):
                text = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                text = "\\".join(value)
            else:
                raise Unencodable(f"a {type(value).__name__} as {vr}")
            if vr == "PN":
                raw = b"\\".join(_person_name(v) for v in text.split("\\"))
            elif vr in _CHARSET_TEXT:
                raw = text.encode(_CHARSET)
            else:
                raw = text.encode(_DEFAULT)
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
            return raw
    except UnicodeError as exc:  # pydicom replaces (charset text) or fails (the others): its call
        raise Unencodable(str(exc)) from exc
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unencodable(f"a {type(value).__name__} as {vr}")
    if vr == "IS":
        raw = str(value).encode("ascii")
        return raw + b" " if len(raw) % 2 else raw
    if vr == "US" and 0 <= value <= 0xFFFF:
        return _US.pack(value)
    raise Unencodable(f"{value!r} as {vr}")


def element(tag: int, vr: str, value: object, implicit: bool) -> bytes:
    """One whole element of a one-element value (:func:`value_bytes`)."""
    raw = value_bytes(vr, value)
    return header(tag, vr, len(raw), implicit) + raw


def writer(tag: int, vr: str, implicit: bool) -> Callable[[object], bytes]:
    """:func:`element` for one tag and VR, with its header prefix made once and the common case - a
    single string value, no component groups - written without the general path's checks (a C-FIND
    writes a dozen elements per match)."""
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        prefix, length, limit = _TAG.pack(group, elem), _UL, 0xFFFFFFFF
    elif vr in _LONG:
        prefix, length, limit = _TAG.pack(group, elem) + vr.encode("ascii") + b"\0\0", _UL, 0xFFFFFFFF
    else:
        prefix, length, limit = _TAG.pack(group, elem) + vr.encode("ascii"), _US, 0xFFFF
    empty = prefix + length.pack(0)
    codec = _CHARSET if vr in _CHARSET_TEXT else _DEFAULT
    pad = b"\x00" if vr == "UI" else b" "
    fast = vr in _CHARSET_TEXT or vr in _PLAIN_TEXT or vr == "UI"
    pn = vr == "PN"

    def write(value: object) -> bytes:
        if value is None or value == "":
            return empty
        if fast and type(value) is str and not (pn and "=" in value):
            try:
                raw = value.encode(codec)
            except UnicodeError:
                return element(tag, vr, value, implicit)  # which raises Unencodable
            if len(raw) & 1:
                raw += pad
            if len(raw) <= limit:
                return prefix + length.pack(len(raw)) + raw
        return element(tag, vr, value, implicit)

    return write


def item(elements: Iterable[bytes]) -> bytes:
    """A sequence item of defined length holding ``elements`` (already in ascending tag order)."""
    body = b"".join(elements)
    return _ITEM + _UL.pack(len(body)) + body
