"""C-FIND matching rules (safepacs.dicom.matching) as a user of a query sees them: one identifier, one
stored record, match or not; and the refusals a malformed identifier gets.
tests/unit/db/test_sql_matching.py holds the SQL translation against this reference; these are
the rules themselves, case by case."""

from __future__ import annotations

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from safepacs.dicom.matching import (
    MAX_VALUES,
    MatchKind,
    answered_patient_id,
    check_level,
    make_condition,
    matches,
    normalize_stored,
    parse_identifier,
    retrieve_keys,
    to_int,
)
from safepacs.errors import QueryError
from safepacs.types import QueryLevel, QueryModel

STUDY_ROOT = QueryModel.STUDY_ROOT
PATIENT_ROOT = QueryModel.PATIENT_ROOT


def hit(keyword: str, vr: str, query: str | list[str], stored: object, *, required: bool = False) -> bool:
    values = query if isinstance(query, list) else [query]
    return matches([make_condition(keyword, vr, values, required=required)], {keyword: stored})


# Wild cards and case ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "stored", "expected"),
    [
        ("Doe*", "Doe^John", True),
        ("doe*", "DOE^JOHN", True),  # PN: case-insensitive
        ("D?e^John", "Doe^John", True),
        ("D?e^John", "De^John", False),  # ? is exactly one character
        ("*John", "Doe^John", True),
        ("*John", "Doe^Johnny", False),  # the whole value must match
        ("Doe^John", "Doe^John^^Dr", False),  # components are not matched separately
        ("*^*", "Madonna", False),
        ("a.b", "axb", False),  # regex characters are literal
        ("Straße", "STRASSE", True),  # Unicode case folding
    ],
)
def test_person_names(query: str, stored: str, expected: bool) -> None:
    assert hit("PatientName", "PN", query, stored) is expected


@pytest.mark.parametrize(
    ("query", "stored", "expected"),
    [
        ("ACC*", "ACC123", True),
        ("acc*", "ACC123", False),  # every VR but PN is case-sensitive
        ("A?C", "ABC", True),
        ("100%", "100%", True),
        ("100%", "1000", False),  # % and _ are not wild cards
        ("A_C", "ABC", False),
    ],
)
def test_other_text_matches_case_sensitively(query: str, stored: str, expected: bool) -> None:
    assert hit("AccessionNumber", "SH", query, stored) is expected


def test_uids_have_no_wild_cards() -> None:
    assert not hit("StudyInstanceUID", "UI", "1.2.*", "1.2.3")
    assert hit("StudyInstanceUID", "UI", "1.2.*", "1.2.*")
    assert hit("StudyInstanceUID", "UI", ["1.2.3", "1.2.4"], "1.2.4")  # a list of UIDs


def test_a_lone_star_or_nothing_matches_everything_even_empty_values() -> None:
    for query in ("*", "**"):
        assert hit("StudyDescription", "LO", query, "")
    assert matches([make_condition("StudyDescription", "LO", [])], {})


def test_more_than_16_stars_are_refused() -> None:
    make_condition("StudyDescription", "LO", ["*a" * 16])
    with pytest.raises(QueryError, match="more than 16 '\\*' wild cards"):
        make_condition("StudyDescription", "LO", ["*a" * 17])


# Dates and times --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "stored", "expected"),
    [
        ("20240105", "20240105", True),
        ("20240101-20240131", "20240131", True),  # bounds are inclusive
        ("20240101-20240131", "20240201", False),
        ("20240101-", "29991231", True),
        ("-20240101", "19000101", True),
        ("-20240101", "20240102", False),
        ("20240105", "2024.01.05", True),  # ACR-NEMA dates are read too
        ("2024.01.05", "20240105", True),
        ("20240105", "", False),
        ("20240105", "not a date", False),
    ],
)
def test_study_dates(query: str, stored: str, expected: bool) -> None:
    assert hit("PatientBirthDate", "DA", query, stored) is expected


@pytest.mark.parametrize(
    ("query", "stored", "expected"),
    [
        ("1030", "103059.999", True),  # a single value means the whole minute
        ("1030", "1031", False),
        ("-1030", "103059", True),  # an upper bound includes its last second
        ("1030-", "1029", False),
        ("10", "1059", True),
        ("10:30", "103000", True),  # ACR-NEMA times
        ("0900-1700", "120000.5", True),
    ],
)
def test_study_times(query: str, stored: str, expected: bool) -> None:
    assert hit("StudyTime", "TM", query, stored) is expected


def test_a_time_zone_offset_is_ignored_in_date_times() -> None:
    assert hit("AcquisitionDateTime", "DT", "20240105", "20240105235959+0100")
    assert hit("AcquisitionDateTime", "DT", "20240105-0500", "20240105120000")  # one value, an offset


@pytest.mark.parametrize(
    ("vr", "value", "key"),
    [
        ("DA", "20240229", "20240229"),
        ("DA", "20241301", ""),  # month 13
        ("TM", "235960", "235960.000000"),  # a leap second
        ("TM", "2400", ""),
        ("TM", "1", ""),  # an hour has two digits
        ("DT", "2024", "20240101000000.000000"),
    ],
)
def test_stored_dates_and_times_as_the_index_keeps_them(vr: str, value: str, key: str) -> None:
    assert normalize_stored(vr, value) == key


@pytest.mark.parametrize("value", ["20240101-20240131-20240201", "2024/01/01", "-", "tomorrow"])
def test_malformed_dates_are_refused_naming_the_key(value: str) -> None:
    with pytest.raises(QueryError, match=r"the value of StudyDate is not a valid DA or DA range"):
        make_condition("StudyDate", "DA", [value])


# Numbers -----------------------------------------------------------------------------------------------
def test_numbers_match_by_value() -> None:
    assert hit("SeriesNumber", "IS", "7", "007")
    assert hit("SeriesNumber", "IS", "+7", 7)
    assert not hit("SeriesNumber", "IS", "7", 70)
    with pytest.raises(QueryError, match="the value of SeriesNumber is not a valid IS"):
        make_condition("SeriesNumber", "IS", ["seven"])


@pytest.mark.parametrize(
    ("value", "number"),
    [(" 12 ", 12), ("-3", -3), (True, None), (None, None), ("", None), ("1.5", None), (2**63, None)],
)
def test_to_int(value: object, number: int | None) -> None:
    assert to_int(value) == number


# Empty values and required keys ------------------------------------------------------------------------
def test_empty_value_matching_finds_only_empty_values() -> None:
    assert hit("StudyDescription", "LO", '""', "")
    assert hit("StudyDescription", "LO", '""', None)
    assert not hit("StudyDescription", "LO", '""', "Chest")
    assert hit("StudyDescription", "LO", ['""', "Chest"], "Chest")  # or one of the others


def test_an_unknown_required_key_matches_every_query_on_it() -> None:
    assert hit("AccessionNumber", "SH", "A1", "", required=True)
    assert not hit("AccessionNumber", "SH", "A1", "", required=False)
    assert not hit("AccessionNumber", "SH", "A1", "A2", required=True)


def test_a_patient_without_an_id_is_answered_under_its_study() -> None:
    assert answered_patient_id("", "1.2.3") == "1.2.3"
    assert answered_patient_id("P1", "1.2.3") == "P1"


def test_instance_availability_is_always_online() -> None:
    assert hit("InstanceAvailability", "CS", "ONLINE", None)
    assert not hit("InstanceAvailability", "CS", "NEARLINE", "NEARLINE")


# Identifiers -------------------------------------------------------------------------------------------
def identifier(level: str | None = "STUDY", **keys: object) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_a_level_given_in_lower_case_or_padded_is_accepted() -> None:
    check_level(STUDY_ROOT, QueryLevel.STUDY, identifier("study "))


def test_patient_root_has_a_patient_level_and_study_root_has_none() -> None:
    check_level(PATIENT_ROOT, QueryLevel.PATIENT)
    with pytest.raises(QueryError, match="the STUDY_ROOT information model has no PATIENT level"):
        check_level(STUDY_ROOT, QueryLevel.PATIENT)


def test_up_to_max_values_values_are_taken_and_more_refused() -> None:
    uids = [f"1.2.{n}" for n in range(MAX_VALUES)]
    q = parse_identifier(STUDY_ROOT, QueryLevel.STUDY, identifier(StudyInstanceUID=uids))
    cond = q.condition("StudyInstanceUID")
    assert cond is not None and cond.kind is MatchKind.LIST and len(cond.values) == MAX_VALUES
    with pytest.raises(QueryError, match="has more than 1000 values; split the request"):
        parse_identifier(STUDY_ROOT, QueryLevel.STUDY, identifier(StudyInstanceUID=[*uids, "1.3"]))


def test_a_value_longer_than_4096_characters_is_refused() -> None:
    with pytest.raises(QueryError, match="a value of StudyDescription is longer than 4096 characters"):
        parse_identifier(STUDY_ROOT, QueryLevel.STUDY, identifier(StudyDescription="x" * 4097))


def test_a_sequence_key_with_two_items_is_refused() -> None:
    items = Sequence([Dataset(), Dataset()])
    with pytest.raises(QueryError, match="has more than one item"):
        parse_identifier(STUDY_ROOT, QueryLevel.STUDY, identifier(ProcedureCodeSequence=items))


def test_a_key_that_cannot_be_decoded_is_named_by_its_tag() -> None:
    raw = identifier()
    raw[0x00280010] = RawDataElement(0x00280010, "US", 3, b"\x01\x02\x03", 0, False, True)
    with pytest.raises(QueryError, match=r"the key \(0028,0010\) of the identifier cannot be decoded"):
        parse_identifier(STUDY_ROOT, QueryLevel.IMAGE, raw, require_level=False)


def test_keys_of_lower_levels_are_returned_empty_and_not_matched() -> None:
    q = parse_identifier(STUDY_ROOT, QueryLevel.STUDY, identifier(Modality="CT", StudyInstanceUID=""))
    assert [c.keyword for c in q.conditions] == ["StudyInstanceUID"]
    assert [(tag, vr) for tag, vr in q.unsupported] == [(0x00080060, "CS")]


def test_retrieve_keys_refuse_a_wrong_vr_and_keep_the_issuer_in_patient_root() -> None:
    ds = identifier("PATIENT", PatientID="P1", IssuerOfPatientID="HOSP")
    assert retrieve_keys(PATIENT_ROOT, QueryLevel.PATIENT, ds) == {
        "PatientID": ("P1",),
        "IssuerOfPatientID": ("HOSP",),
    }
    bad = identifier("STUDY")
    bad.add_new(0x0020000D, "LO", "1.2.3")
    with pytest.raises(QueryError, match="the key StudyInstanceUID has VR LO, not UI"):
        retrieve_keys(STUDY_ROOT, QueryLevel.STUDY, bad)


def test_a_retrieve_names_its_level_or_is_refused_with_what_to_add() -> None:
    with pytest.raises(QueryError, match=r"needs a value for StudyInstanceUID \(PS3.4 C.4.2.2.1\); add it"):
        retrieve_keys(STUDY_ROOT, QueryLevel.STUDY, identifier("STUDY", PatientID="P1"))
    with pytest.raises(QueryError, match="has no Query/Retrieve Level"):
        retrieve_keys(STUDY_ROOT, QueryLevel.STUDY, identifier(None, StudyInstanceUID="1.2"))
