"""How deeply sequences nest (safepacs.dicom.nesting), told from bytes: a data set whose items are at
most at the limit is accepted, one level more is refused, pruning leaves out exactly the deep items,
and bytes that cannot be walked are left to pydicom's reader."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from safepacs.dicom.nesting import MAX_SEQUENCE_DEPTH, TOO_DEEP, check, exceeds, min_nesting_bytes, prune
from safepacs.errors import InvalidObjectError

ENCODINGS = [(True, True), (False, True), (False, False)]
IDS = ["implicit-le", "explicit-le", "explicit-be"]


def nested(depth: int) -> Dataset:
    """Items down to level ``depth`` (the innermost item holds a CodeValue)."""
    inner = Dataset()
    inner.CodeValue = "deep"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    inner.PatientID = "P1"
    return inner


def encode(ds: Dataset, implicit: bool, little: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def depth_of(ds: Dataset) -> int:
    level = 0
    while "ContentSequence" in ds and len(ds.ContentSequence):
        ds = ds.ContentSequence[0]
        level += 1
    return level


@pytest.mark.parametrize(("implicit", "little"), ENCODINGS, ids=IDS)
def test_the_limit_is_accepted_and_one_level_more_refused(implicit: bool, little: bool) -> None:
    at_limit = encode(nested(MAX_SEQUENCE_DEPTH), implicit, little)
    check(at_limit, implicit=implicit, little_endian=little)
    assert not exceeds(at_limit, implicit=implicit, little_endian=little)
    deeper = encode(nested(MAX_SEQUENCE_DEPTH + 1), implicit, little)
    assert exceeds(deeper, implicit=implicit, little_endian=little)
    with pytest.raises(InvalidObjectError, match=TOO_DEEP):
        check(deeper, implicit=implicit, little_endian=little)


def test_a_lower_limit_is_honoured() -> None:
    data = encode(nested(3), True, True)
    assert not exceeds(data, implicit=True, little_endian=True, limit=3)
    assert exceeds(data, implicit=True, little_endian=True, limit=2)


def test_empty_sequences_add_no_level() -> None:
    ds = nested(MAX_SEQUENCE_DEPTH)
    inner = ds
    while "ContentSequence" in inner:
        inner = inner.ContentSequence[0]
    inner.ContentSequence = Sequence([])  # a 33rd sequence without items
    assert not exceeds(encode(ds, False, True), implicit=False, little_endian=True)


@pytest.mark.parametrize(("implicit", "little"), ENCODINGS, ids=IDS)
def test_prune_leaves_out_the_deep_items_and_keeps_the_rest(implicit: bool, little: bool) -> None:
    assert (
        prune(encode(nested(5), implicit, little), implicit=implicit, little_endian=little, limit=5) is None
    )
    pruned = prune(encode(nested(8), implicit, little), implicit=implicit, little_endian=little, limit=5)
    assert pruned is not None
    ds = read_dataset(BytesIO(pruned), is_implicit_VR=implicit, is_little_endian=little)
    assert ds.PatientID == "P1"
    assert depth_of(ds) == 5


def test_min_nesting_bytes_grows_with_the_levels_left() -> None:
    assert min_nesting_bytes(MAX_SEQUENCE_DEPTH) < min_nesting_bytes(0)
    assert min_nesting_bytes(0, limit=2) < min_nesting_bytes(0, limit=3)


def test_bytes_that_cannot_be_walked_are_not_judged_here() -> None:
    garbage = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" * 3
    check(garbage, implicit=False, little_endian=True)  # pydicom's reader will judge it
    assert prune(garbage, implicit=False, little_endian=True) is None
