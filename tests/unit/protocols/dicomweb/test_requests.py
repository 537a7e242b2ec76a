"""What a DICOMweb route reads from its request (protocols/dicomweb/requests.py): Accept media ranges,
UIDs in the path and frame lists; each refusal is a 400 problem with a sentence saying what to fix."""

from __future__ import annotations

import pytest

from safepacs.protocols.dicomweb.problems import Problem
from safepacs.protocols.dicomweb.requests import (
    DICOM_JSON,
    acceptable,
    checked_uid,
    frame_numbers,
    media_ranges,
)


def test_media_ranges_are_lower_cased_with_their_parameters() -> None:
    accept = 'Multipart/Related; Type="Application/DICOM"; transfer-syntax=*, application/dicom+json;q=0.5'
    assert media_ranges(accept) == [
        ("multipart/related", {"type": "Application/DICOM", "transfer-syntax": "*"}),
        (DICOM_JSON, {"q": "0.5"}),
    ]


def test_quoted_parameter_values_lose_their_quotes_and_keep_their_case() -> None:
    ((media, params),) = media_ranges('image/jpeg; TRANSFER-SYNTAX="1.2.840.10008.1.2.4.50"')
    assert media == "image/jpeg"
    assert params == {"transfer-syntax": "1.2.840.10008.1.2.4.50"}


def test_an_empty_accept_header_is_one_empty_range() -> None:
    assert media_ranges("") == [("", {})]


def test_whitespace_around_ranges_and_parameters_is_ignored() -> None:
    assert media_ranges("  image/png ;  q = 0.8 ,*/*") == [("image/png", {"q": "0.8"}), ("*/*", {})]


@pytest.mark.parametrize(
    ("params", "ok"),
    [
        ({}, True),
        ({"q": "1"}, True),
        ({"q": "0.001"}, True),
        ({"q": "0"}, False),
        ({"q": "0.0"}, False),
        ({"q": "-1"}, False),
        ({"q": "not-a-number"}, True),  # an unreadable weight does not refuse the range
    ],
)
def test_a_range_weighted_q_0_is_not_acceptable(params: dict[str, str], ok: bool) -> None:
    assert acceptable(params) is ok


def test_a_weight_of_zero_refuses_dicom_json() -> None:
    ranges = media_ranges("application/dicom+json;q=0, application/json")
    assert [media for media, params in ranges if acceptable(params)] == ["application/json"]


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "1", "0.0", "9" * 64])
def test_valid_uids_pass_unchanged(uid: str) -> None:
    assert checked_uid(uid) == uid


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "*",
        "1.2.*",
        "..",
        "1..2",
        "1.2.",
        ".1",
        "1/2",
        "../etc/passwd",
        "1.2.3a",
        "1 2",
        "9" * 65,
        "\uff11.\uff12",  # full-width digits
    ],
)
def test_anything_else_in_the_path_is_a_400(uid: str) -> None:
    with pytest.raises(Problem) as caught:
        checked_uid(uid)
    assert caught.value.status == 400
    assert caught.value.title == "Bad Request"
    assert caught.value.detail == "a UID in the path is not a valid UID (digits and dots, 64 at most)"


@pytest.mark.parametrize(
    ("text", "numbers"),
    [("1", [1]), ("3,1,2", [3, 1, 2]), ("1, 3, 5", [1, 3, 5]), ("999999999", [999999999]), ("007", [7])],
)
def test_frame_lists_keep_the_order_asked(text: str, numbers: list[int]) -> None:
    assert frame_numbers(text) == numbers


@pytest.mark.parametrize("text", ["", ",", "1,", ",1", "1;2", "a", "-1", "1.5", "1,,2", "1234567890", "1-3"])
def test_malformed_frame_lists_are_a_400_with_an_example(text: str) -> None:
    with pytest.raises(Problem) as caught:
        frame_numbers(text)
    assert caught.value.status == 400
    assert "e.g. frames/1,3,5" in caught.value.detail


def test_frame_zero_is_refused_as_frames_start_at_one() -> None:
    with pytest.raises(Problem) as caught:
        frame_numbers("2,0")
    assert (caught.value.status, caught.value.detail) == (400, "frame numbers start at 1")


def test_a_frame_named_twice_is_refused() -> None:
    with pytest.raises(Problem) as caught:
        frame_numbers("1,2,01")
    assert (caught.value.status, caught.value.detail) == (400, "the frame list names a frame more than once")
