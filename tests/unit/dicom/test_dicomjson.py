"""DICOM JSON (safepacs.dicom.dicomjson, PS3.18 F.2): the fields a DICOMweb client reads, including the
cases where pydicom's own conversion departs from the standard, and the fast path of QIDO-RS rows."""

from __future__ import annotations

import pytest
from pydicom import config as dicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from safepacs.dicom.dicomjson import data_element_json, dataset_json, element_json, tag_key


def elem(keyword: str, vr: str, value: object) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return DataElement(tag, vr, value, validation_mode=dicom_config.IGNORE)


def test_keys_are_eight_upper_case_hex_digits_in_tag_order() -> None:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    assert list(dataset_json(ds)) == ["00080060", "00100020", "0020000D"]
    assert tag_key("StudyInstanceUID") == "0020000D" and tag_key("PatientName") == "00100010"


def test_group_length_is_left_out_in_items_too() -> None:
    item = Dataset()
    item.add_new(0x00080000, "UL", 10)
    item.CodeValue = "X"
    ds = Dataset()
    ds.add_new(0x00100000, "UL", 12)
    ds.PatientID = "P1"
    ds.ProcedureCodeSequence = Sequence([item])
    out = dataset_json(ds)
    assert "00100000" not in out
    assert out["00081032"]["Value"] == [{"00080100": {"vr": "SH", "Value": ["X"]}}]


def test_an_empty_sequence_has_no_value_and_an_empty_item_is_an_empty_object() -> None:
    ds = Dataset()
    ds.ProcedureCodeSequence = Sequence([])
    ds.ReferencedStudySequence = Sequence([Dataset()])
    out = dataset_json(ds)
    assert out["00081032"] == {"vr": "SQ"}
    assert out["00081110"] == {"vr": "SQ", "Value": [{}]}


@pytest.mark.parametrize(
    ("vr", "value", "expected"),
    [
        ("CS", ["CT", "", "MR"], ["CT", None, "MR"]),
        ("LO", ["", "B"], [None, "B"]),
        ("IS", ["1", "", "3"], [1, None, 3]),
        ("DS", ["1.5", ""], [1.5, None]),
    ],
)
def test_an_empty_value_among_several_is_null(vr: str, value: list[str], expected: list[object]) -> None:
    keyword = {
        "CS": "ImageType",
        "LO": "OtherPatientIDs",
        "IS": "ReferencedFrameNumber",
        "DS": "PixelSpacing",
    }[vr]
    assert data_element_json(elem(keyword, vr, value)) == {"vr": vr, "Value": expected}


def test_person_names_carry_only_their_non_empty_component_groups() -> None:
    assert data_element_json(elem("PatientName", "PN", "Doe^John")) == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Doe^John"}],
    }
    assert data_element_json(elem("PatientName", "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう")) == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}],
    }
    assert data_element_json(elem("PatientName", "PN", "=山田^太郎")) == {
        "vr": "PN",
        "Value": [{"Ideographic": "山田^太郎"}],
    }


def test_person_names_without_a_name_are_null_or_no_value() -> None:
    assert data_element_json(elem("PatientName", "PN", "")) == {"vr": "PN"}
    assert data_element_json(elem("PatientName", "PN", "==")) == {"vr": "PN"}
    assert data_element_json(elem("OtherPatientNames", "PN", ["Doe^J", ""])) == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Doe^J"}, None],
    }


def test_numbers_are_json_numbers() -> None:
    assert data_element_json(elem("Rows", "US", 512)) == {"vr": "US", "Value": [512]}
    assert data_element_json(elem("SeriesNumber", "IS", "7")) == {"vr": "IS", "Value": [7]}
    assert data_element_json(elem("SliceThickness", "DS", "2.5")) == {"vr": "DS", "Value": [2.5]}


def test_binary_values_are_inline_or_a_bulk_data_uri_over_the_threshold() -> None:
    small = elem("PixelData", "OB", b"\x01\x02")
    assert data_element_json(small) == {"vr": "OB", "InlineBinary": "AQI="}
    big = elem("PixelData", "OB", b"\x00" * 2000)
    assert data_element_json(big, lambda e: f"bulk/{e.tag:08X}", 1024) == {
        "vr": "OB",
        "BulkDataURI": "bulk/7FE00010",
    }
    assert "InlineBinary" in data_element_json(big)  # no handler: inline whatever its size


ROW_VALUES = [
    ("PatientName", "PN", "Doe^John"),
    ("PatientName", "PN", "Doe^John=Ideo"),
    ("PatientName", "PN", ""),
    ("PatientName", "PN", None),
    ("PatientID", "LO", "P1"),
    ("PatientID", "LO", " padded "),
    ("StudyDate", "DA", "20240101"),
    ("StudyInstanceUID", "UI", "1.2.3"),
    ("ModalitiesInStudy", "CS", ["CT", "MR"]),
    ("ModalitiesInStudy", "CS", ["CT", ""]),
    ("ModalitiesInStudy", "CS", []),
    ("NumberOfStudyRelatedInstances", "IS", 12),
    ("SeriesNumber", "IS", "7"),
    ("Rows", "US", 512),
    ("StudyDescription", "LO", "A\\B"),
]


@pytest.mark.parametrize(("keyword", "vr", "value"), ROW_VALUES)
def test_the_fast_path_of_index_rows_equals_the_general_conversion(
    keyword: str, vr: str, value: object
) -> None:
    expected = data_element_json(elem(keyword, vr, value))
    assert dict(element_json(keyword, vr, value)) == expected
