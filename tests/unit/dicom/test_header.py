"""The fast reader of indexed elements (safepacs.dicom.header): it keeps what the index reads and only
that, gives pydicom's reader the unusual cases (None), and refuses truncated or too deeply nested data."""

from __future__ import annotations

import re

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from safepacs.dicom.attributes import HEADER_TAGS
from safepacs.dicom.header import TRUNCATED, read_indexed_elements
from safepacs.dicom.nesting import TOO_DEEP
from safepacs.errors import InvalidObjectError


def encode(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def sample() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDate = "20240105"
    ds.Modality = "CT"
    ds.InstitutionName = "Hôpital"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.add_new(0x00091010, "LO", "private, not indexed")
    code = Dataset()
    code.CodeValue = "X1"
    ds.ProcedureCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([Dataset()])  # not indexed: stepped over
    ds.StudyInstanceUID = "1.2.3"
    ds.PixelData = b"\0" * 64
    ds["PixelData"].VR = "OB"
    return ds


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_indexed_elements_are_what_pydicoms_reader_gives_for_them(implicit: bool) -> None:
    data = encode(sample(), implicit)
    fast = read_indexed_elements(data, implicit)
    assert fast is not None
    slow = read_dataset(
        DicomBytesIO(data), is_implicit_VR=implicit, is_little_endian=True, specific_tags=list(HEADER_TAGS)
    )
    assert [int(t) for t in fast.keys()] == [int(t) for t in slow.keys()]
    assert fast.PatientName == "Doe^Jane" and fast.InstitutionName == "Hôpital"
    assert fast.ProcedureCodeSequence[0].CodeValue == "X1"
    assert 0x00091010 not in fast and 0x7FE00010 not in fast and "ReferencedImageSequence" not in fast
    assert "SpecificCharacterSet" in fast  # kept, so values decode in their character set


def test_a_value_running_past_the_end_is_truncated() -> None:
    data = encode(sample(), implicit=False)
    with pytest.raises(InvalidObjectError, match=re.escape(TRUNCATED)):
        read_indexed_elements(data[:-10], implicit=False)


def test_explicit_vr_where_implicit_was_announced_is_left_to_pydicom() -> None:
    assert read_indexed_elements(encode(sample(), implicit=False), implicit=True) is None


def test_an_empty_data_set_has_no_elements() -> None:
    out = read_indexed_elements(b"", implicit=False)
    assert out is not None and len(out) == 0


def nested(depth: int) -> Dataset:
    inner = Dataset()
    inner.CodeValue = "deep"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    return inner


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_items_nested_deeper_than_the_limit_are_refused(implicit: bool) -> None:
    assert read_indexed_elements(encode(nested(4), implicit), implicit, max_depth=4) is not None
    with pytest.raises(InvalidObjectError, match=re.escape(TOO_DEEP)):
        read_indexed_elements(encode(nested(5), implicit), implicit, max_depth=4)
