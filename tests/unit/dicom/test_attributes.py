"""The attributes the index keeps (safepacs.dicom.attributes): what a query can match at each level,
which keys are unique and required, and that each table entry agrees with the DICOM data dictionary."""

from __future__ import annotations

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword

from safepacs.dicom.attributes import (
    ATTRIBUTES,
    BY_KEYWORD,
    HEADER_TAGS,
    INTEGER_VRS,
    REQUIRED_KEYS,
    SEQUENCE_BY_KEYWORD,
    SEQUENCES,
    TEMPORAL_VRS,
    UNIQUE_KEYS,
    WILDCARD_VRS,
    Derived,
    usable_at,
)
from safepacs.types import QueryLevel

P, ST, SE, IM = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE


@pytest.mark.parametrize(
    ("level", "attr_level", "usable"),
    [
        (IM, P, True),  # a patient key narrows an image query
        (ST, P, True),
        (SE, SE, True),
        (ST, SE, False),  # a series key is not matched in a study query
        (P, ST, False),
        (SE, IM, False),
    ],
)
def test_a_key_is_usable_at_its_level_and_below(
    level: QueryLevel, attr_level: QueryLevel, usable: bool
) -> None:
    assert usable_at(level, attr_level) is usable


def test_the_unique_keys_are_those_of_ps3_4_c6() -> None:
    assert UNIQUE_KEYS == {
        P: "PatientID",
        ST: "StudyInstanceUID",
        SE: "SeriesInstanceUID",
        IM: "SOPInstanceUID",
    }
    for level, keyword in UNIQUE_KEYS.items():
        assert BY_KEYWORD[keyword].level is level


def test_no_unique_key_is_a_required_key() -> None:
    assert not REQUIRED_KEYS & (set(UNIQUE_KEYS.values()) - {"PatientID"})
    assert {"PatientName", "StudyDate", "Modality", "InstanceNumber"} <= REQUIRED_KEYS


def test_every_keyword_has_the_vr_of_the_data_dictionary() -> None:
    for attr in ATTRIBUTES:
        tag = tag_for_keyword(attr.keyword)
        assert tag is not None, attr.keyword
        assert dictionary_VR(tag) == attr.vr, attr.keyword
    for seq in SEQUENCES:
        assert dictionary_VR(tag_for_keyword(seq.keyword)) == "SQ"
        for item in seq.items:
            assert dictionary_VR(tag_for_keyword(item.keyword)) == item.vr, (seq.keyword, item.keyword)


def test_keywords_and_columns_are_unique_per_level() -> None:
    assert len(BY_KEYWORD) == len(ATTRIBUTES)
    columns = [(a.level, a.column) for a in ATTRIBUTES if a.column is not None]
    assert len(columns) == len(set(columns))


def test_derived_attributes_have_no_column_and_are_not_read_from_headers() -> None:
    for attr in ATTRIBUTES:
        assert (attr.column is None) == (attr.derived is not None), attr.keyword
        if attr.derived is not None:
            assert int(tag_for_keyword(attr.keyword) or 0) not in HEADER_TAGS
    assert BY_KEYWORD["InstanceAvailability"].derived is Derived.ONLINE
    assert BY_KEYWORD["ModalitiesInStudy"].multi


def test_header_tags_are_sorted_and_hold_every_stored_column_and_sequence() -> None:
    assert list(HEADER_TAGS) == sorted(set(HEADER_TAGS))
    assert int(tag_for_keyword("PatientName") or 0) in HEADER_TAGS
    assert int(tag_for_keyword("RequestAttributesSequence") or 0) in HEADER_TAGS
    assert 0x7FE00010 not in HEADER_TAGS  # never the pixel data


def test_sequence_items_are_found_by_keyword() -> None:
    seq = SEQUENCE_BY_KEYWORD["RequestAttributesSequence"]
    item = seq.item("ScheduledProcedureStepID")
    assert item is not None and item.vr == "SH"
    assert seq.item("PatientName") is None


def test_match_columns_of_names_and_dates() -> None:
    assert BY_KEYWORD["PatientName"].fold_column == "patient_name_ci"
    assert BY_KEYWORD["StudyDate"].key_column == "study_date"
    assert BY_KEYWORD["StudyTime"].key_column == "study_time_key"


def test_vr_classes_do_not_overlap() -> None:
    assert not WILDCARD_VRS & TEMPORAL_VRS and not WILDCARD_VRS & INTEGER_VRS
    assert "UI" not in WILDCARD_VRS  # UIDs have no wild cards (PS3.4 C.2.2.2.4)
