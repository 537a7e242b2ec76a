"""The elements of a received data set that the index reads, found without pydicom's element reader.

Storing an instance reads ~30 of its elements; pydicom's reader makes an element object of each of
them, which for a 10 KB instance was a sixth of everything else an instance costs (measured in
bench/README.md, "Ingest benchmark").  This walks
the data set's bytes (PS3.5 7.1) once, keeps the values of :data:`~safepacs.dicom.attributes.HEADER_TAGS`
as pydicom's raw elements and steps over everything else (the pixel data, private elements, other
sequences, through their items).  Sequences long enough to nest deeply are walked in the same pass
(:func:`~safepacs.dicom.nesting.element_end`, no recursion): a data set whose items are deeper than
:data:`~safepacs.dicom.nesting.MAX_SEQUENCE_DEPTH` levels is refused.  The data set it returns is
what ``read_dataset(..., specific_tags=HEADER_TAGS)`` returns (tests hold their index rows equal over
the test corpus), so :func:`~safepacs.db.write.read_header` reads it unchanged.

Only little endian data sets are read here, and only when nothing is unusual; anything else (a
top-level VR it does not know, explicit VR where implicit was announced or the reverse, an indexed
element of undefined length, a delimiter out of place) answers None and the caller uses pydicom's reader.  A
value that runs past the end of the data is refused as truncated, as pydicom's reader plus
SafePACS's length check refuses it.
"""

from __future__ import annotations

import struct
from typing import cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from safepacs.dicom.attributes import HEADER_TAGS
from safepacs.dicom.nesting import MAX_SEQUENCE_DEPTH, Unwalkable, element_end, min_nesting_bytes
from safepacs.errors import InvalidObjectError

__all__ = ["TRUNCATED", "read_indexed_elements"]

TRUNCATED = "the data set is truncated (an element is shorter than its length)"

_KEPT = frozenset(HEADER_TAGS) | {0x00080005}  # and the Specific Character Set, as pydicom keeps it
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT = struct.Struct("<HHL")
_EXPLICIT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<L")
_VR_TEXT = {v.value.encode("ascii"): v.value for v in VR}
_MAY_NEST = frozenset({b"SQ", b"UN"})  # values of defined length that may hold items
_LONG_VRS = frozenset(str(v).encode("ascii") for v in EXPLICIT_VR_LENGTH_32)


class _Unusual(Exception):
    """Something pydicom's reader should judge."""


def read_indexed_elements(
    data: bytes, implicit: bool, *, max_depth: int = MAX_SEQUENCE_DEPTH
) -> Dataset | None:
    """The indexed elements of the little endian data set ``data``, undecoded; None when pydicom's
    reader should read it (see the module); :class:`InvalidObjectError` when it is truncated or its
    sequences nest deeper than ``max_depth`` (:mod:`safepacs.dicom.nesting`)."""
    try:
        return _read(data, implicit, max_depth)
    except struct.error as exc:  # a header cut short inside a sequence we were stepping over
        raise InvalidObjectError(TRUNCATED) from exc
    except Unwalkable as exc:
        if exc.truncated:
            raise InvalidObjectError(TRUNCATED) from exc
        return None
    except _Unusual:
        return None


def _read(data: bytes, implicit: bool, max_depth: int) -> Dataset | None:
    end = len(data)
    if end >= 6:  # pydicom decides from the first element which encoding the data set really uses
        looks_explicit = 0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B
        if looks_explicit == implicit:
            raise _Unusual
    kept: dict[BaseTag, DataElement | RawDataElement] = {}
    offset = 0
    # The header of each element is read inline (this loop runs ~50 times per instance); the nesting
    # walk reads the elements inside the sequences stepped over.
    unpack_implicit, unpack_explicit, unpack_long = (
        _IMPLICIT.unpack_from,
        _EXPLICIT.unpack_from,
        _LONG.unpack_from,
    )
    text_vr: str | None = None
    vr: bytes | None = None
    nested = min_nesting_bytes(0, max_depth)  # shorter sequences cannot be too deep: not looked into
    while end - offset >= 8:  # pydicom's reader stops, silently, before a header cut short
        if implicit:
            group, element, length = unpack_implicit(data, offset)
            value_at = offset + 8
        else:
            group, element, vr, length = unpack_explicit(data, offset)
            text_vr = _VR_TEXT.get(vr)
            if text_vr is None:
                raise _Unusual  # (a delimiter at the top level too: pydicom stops there)
            if vr in _LONG_VRS:
                if end - offset < 12:
                    raise InvalidObjectError(TRUNCATED)  # its length cut short: pydicom fails
                length = unpack_long(data, offset + 8)[0]
                value_at = offset + 12
            else:
                value_at = offset + 8
        tag = group << 16 | element
        if group == 0xFFFE:
            raise _Unusual  # a delimiter at the top level: pydicom stops there
        if length == _UNDEFINED:
            if tag in _KEPT:
                raise _Unusual  # pydicom parses an indexed sequence of undefined length itself
            offset = element_end(data, tag, vr, length, value_at, implicit=implicit, limit=max_depth)
            continue
        offset = value_at + length
        if offset > end:
            raise InvalidObjectError(TRUNCATED)
        if length >= nested and (implicit or vr in _MAY_NEST):
            element_end(data, tag, vr, length, value_at, implicit=implicit, limit=max_depth)
        if tag in _KEPT:
            value = (
                data[value_at:offset] if length else cast(bytes | None, empty_value_for_VR(text_vr, raw=True))
            )
            key = BaseTag(tag)
            kept[key] = RawDataElement(key, text_vr, length, value, value_at, implicit, True)
    ds = Dataset(kept)
    charset = kept.get(BaseTag(0x00080005))
    encoding = (
        convert_encodings(convert_raw_data_element(cast(RawDataElement, charset)).value)
        if charset is not None
        else default_encoding
    )
    ds.set_original_encoding(implicit, True, encoding)
    return ds
