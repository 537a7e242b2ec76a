"""DICOM JSON (PS3.18 F.2): WADO-RS metadata, QIDO-RS answers and STOW-RS responses.

:func:`dataset_json` converts a data set and :func:`data_element_json` one element: pydicom's
``DataElement.to_json_dict`` for each value, with the rules of PS3.18 F.2 where pydicom departs from
them:

* Group Length (gggg,0000) elements are left out, in sequence items too (F.2.2: they "shall not be
  included").
* An empty sequence has no "Value", like any attribute that is present but empty (F.2.5); an empty
  item is ``{}`` (F.2.5).
* An empty value among the values of a multi-valued attribute is ``null`` in the "Value" array (F.2.5),
  for every VR: pydicom writes ``""`` for most and fails on PN, IS and DS.
* A person name carries only its non-empty component groups (F.2.2: "Alphabetic", "Ideographic",
  "Phonetic"); a value without any is ``null``, and a single such value is no "Value" at all.

:func:`element_json` is the DICOM JSON of one value of an index row (QIDO-RS) and writes the plain
cases - single text values, numbers, person names without component groups - directly: building a
pydicom ``DataElement`` per value and converting it was the larger part of a search's CPU per study
(measured in bench/README.md).  Every
other value goes through :func:`data_element_json`, and a test holds both equal on every attribute of
the test archive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydicom import config as dicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

__all__ = ["BulkDataHandler", "data_element_json", "dataset_json", "element_json", "tag_key"]

#: Turns a binary element over the threshold into its BulkDataURI (PS3.18 F.2.6).
BulkDataHandler = Callable[[DataElement], str]

_PLAIN_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI", "UC"})
_NUMBERS = frozenset({"IS", "US", "UL", "SS", "SL"})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")  # PS3.18 F.2.2, in PS3.5 6.2.1 order
_KEYS: dict[str, str] = {}


def tag_key(keyword: str) -> str:
    """The 8-hex-digit key of a keyword's tag in DICOM JSON."""
    key = _KEYS.get(keyword)
    if key is None:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        key = _KEYS[keyword] = f"{tag:08X}"
    return key


def dataset_json(
    ds: Dataset, bulk_data_element_handler: BulkDataHandler | None = None, bulk_data_threshold: int = 1024
) -> dict[str, Any]:
    """The DICOM JSON Model object of ``ds`` (PS3.18 F.2.2), its attributes in ascending tag order and
    without Group Length elements.  Binary values longer than ``bulk_data_threshold`` once base64
    encoded are ``BulkDataURI`` (from ``bulk_data_element_handler``) when a handler is given, else
    ``InlineBinary`` (as pydicom's ``Dataset.to_json_dict``)."""
    out: dict[str, Any] = {}
    for elem in ds:  # in tag order
        if elem.tag.element == 0x0000:  # Group Length: never in DICOM JSON (PS3.18 F.2.2)
            continue
        out[f"{elem.tag:08X}"] = data_element_json(elem, bulk_data_element_handler, bulk_data_threshold)
    return out


def data_element_json(
    elem: DataElement,
    bulk_data_element_handler: BulkDataHandler | None = None,
    bulk_data_threshold: int = 1024,
) -> dict[str, Any]:
    """The DICOM JSON attribute object of ``elem`` (PS3.18 F.2.2-F.2.7; see the module docstring)."""
    vr = str(elem.VR)
    if vr == "SQ":
        items = [
            dataset_json(item, bulk_data_element_handler, bulk_data_threshold) for item in elem.value or ()
        ]
        return {"vr": vr, "Value": items} if items else {"vr": vr}  # empty: no Value (F.2.5)
    if vr == "PN":
        return _person_names(elem)
    if elem.VM > 1 and any(_empty(v) for v in elem.value):
        return {"vr": vr, "Value": [None if _empty(v) else _single(elem, v) for v in elem.value]}
    return elem.to_json_dict(bulk_data_element_handler, bulk_data_threshold)


def _empty(value: object) -> bool:
    """Whether one value of a multi-valued text attribute is empty (PS3.5 6.4: nothing between two
    delimiters; padding is insignificant)."""
    return value is None or (isinstance(value, str) and not value.strip(" \x00"))


def _single(elem: DataElement, value: object) -> Any:
    """One value of ``elem`` as pydicom converts it alone (a number for IS and DS, PS3.18 F.2.3)."""
    alone = DataElement(elem.tag, elem.VR, value, validation_mode=dicom_config.IGNORE)
    return alone.to_json_dict(None, 1024)["Value"][0]


def _person_names(elem: DataElement) -> dict[str, Any]:
    if elem.is_empty:
        return {"vr": "PN"}
    values = elem.value if elem.VM > 1 else [elem.value]
    names = [_person_name(v) for v in values]
    if len(names) == 1 and names[0] is None:
        return {"vr": "PN"}  # one value without a name: an empty attribute (F.2.5)
    return {"vr": "PN", "Value": names}


def _person_name(value: object) -> dict[str, str] | None:
    """The non-empty component groups of one person name (PS3.18 F.2.2); None when there is none."""
    if value is None:
        return None
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    groups = {key: group for key, group in zip(_PN_GROUPS, name.components, strict=False) if group}
    return groups or None


def _plain(v: object) -> bool:
    return isinstance(v, str) and bool(v) and "\\" not in v and v.strip(" \x00") == v


def element_json(keyword: str, vr: str, value: object) -> Mapping[str, Any]:
    """The DICOM JSON of one non-sequence element: what :func:`data_element_json` gives for it."""
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
    return data_element_json(DataElement(tag, vr, value, validation_mode=dicom_config.IGNORE))
