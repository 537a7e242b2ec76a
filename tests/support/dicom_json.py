"""A reference for DICOM JSON (PS3.18 F.2) that SafePACS's own conversion is compared against.

It is pydicom's ``DataElement.to_json_dict``, element by element, with the rules of PS3.18 F.2 applied
to its output afterwards:

* F.2.2: Group Length (gggg,0000) attributes "shall not be included" - left out at every level.
* F.2.2: a person name carries its non-empty component groups only ("Alphabetic", "Ideographic",
  "Phonetic").
* F.2.5: an attribute that is present but empty has no "Value" - an empty sequence included; an empty
  item is ``{}``; an empty value among several is ``null``.

pydicom cannot convert a multi-valued PN, IS or DS with an empty value at all (it raises); for those the
reference converts the values one at a time, an empty one giving ``null``.

Import it as ``from tests.support.dicom_json import reference_json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom import config as dicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

__all__ = ["group_length_keys", "reference_json"]


def reference_json(
    ds: Dataset, handler: Callable[[DataElement], str] | None = None, threshold: int = 1024
) -> dict[str, Any]:
    """The DICOM JSON Model object of ``ds`` by the rules above."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.element == 0:  # F.2.2
            continue
        key = f"{elem.tag:08X}"
        if elem.VR == "SQ":
            items = [reference_json(item, handler, threshold) for item in elem.value]
            out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}  # F.2.5
            continue
        try:
            converted = elem.to_json_dict(handler, threshold)
        except (IndexError, ValueError):  # a multi-valued PN, IS or DS with an empty value
            converted = {"vr": elem.VR, "Value": [_alone(elem, v) for v in elem.value]}
        out[key] = _f25(converted)
    return out


def _alone(elem: DataElement, value: object) -> Any:
    one = DataElement(elem.tag, elem.VR, value, validation_mode=dicom_config.IGNORE).to_json_dict(None, 1024)
    return one["Value"][0] if "Value" in one else None


def _f25(attribute: dict[str, Any]) -> dict[str, Any]:
    """``attribute`` as pydicom wrote it, with empty values and person name groups as F.2.2/F.2.5 say."""
    if "Value" not in attribute:
        return attribute
    values: list[Any] = []
    for value in attribute["Value"]:
        if attribute["vr"] == "PN" and isinstance(value, dict):
            value = {group: text for group, text in value.items() if text} or None
        values.append(None if value == "" else value)
    if values == [None]:
        return {"vr": attribute["vr"]}
    return {**attribute, "Value": values}


def group_length_keys(model: object) -> list[str]:
    """Every attribute key of a DICOM JSON document (a list of objects, an object, nested items) that
    names a Group Length element (gggg,0000)."""
    found: list[str] = []
    if isinstance(model, list):
        for entry in model:
            found += group_length_keys(entry)
    elif isinstance(model, dict):
        for key, attribute in model.items():
            if len(key) == 8 and key.endswith("0000"):
                found.append(key)
            if isinstance(attribute, dict) and attribute.get("vr") == "SQ":
                found += group_length_keys(attribute.get("Value", []))
    return found
