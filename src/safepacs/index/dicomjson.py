"""QIDO-RS answers as DICOM JSON (PS3.18 F.2) straight from index rows, without pydicom data sets.

Building a pydicom ``Dataset`` per result and converting it costs ~0.4 ms per study (bench/README);
this writes the same JSON directly for the plain cases - single text values, numbers, person names
without component groups - and hands every other element to pydicom, so the answer is always the
one pydicom would give (a test compares both on every attribute of the test archive).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom import config as dicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement

__all__ = ["element_json", "tag_key"]

_PLAIN_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI", "UC"})
_NUMBERS = frozenset({"IS", "US", "UL", "SS", "SL"})
_KEYS: dict[str, str] = {}


def tag_key(keyword: str) -> str:
    """The 8-hex-digit key of a keyword's tag in DICOM JSON."""
    key = _KEYS.get(keyword)
    if key is None:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        key = _KEYS[keyword] = f"{tag:08X}"
    return key


def _plain(v: object) -> bool:
    return isinstance(v, str) and bool(v) and "\\" not in v and v.strip(" \x00") == v


def element_json(keyword: str, vr: str, value: object) -> Mapping[str, Any]:
    """The DICOM JSON of one non-sequence element, exactly as pydicom's ``to_json_dict`` writes it."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    if isinstance(value, str) and "\\" not in value and value.strip(" \x00") == value:
        if vr in _PLAIN_TEXT:
            return {"vr": vr, "Value": [value]}
        if vr == "PN" and "=" not in value:
            return {"vr": vr, "Value": [{"Alphabetic": value}]}
    if vr in _NUMBERS and isinstance(value, int) and not isinstance(value, bool):
        return {"vr": vr, "Value": [value]}
    if vr in _PLAIN_TEXT and isinstance(value, list) and all(_plain(v) for v in value):
        return {"vr": vr, "Value": list(value)}
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    elem = DataElement(tag, vr, value, validation_mode=dicom_config.IGNORE)
    return elem.to_json_dict(None, 1024)
