"""The indexed elements of a data set, read without pydicom's element reader, as pydicom reads them.

pydicom's reader (what ingest used before, and still uses for anything unusual) is the reference:
wherever :func:`read_indexed_elements` answers, the index rows must be the ones pydicom's reading
gives, and a data set it refuses as truncated must be one SafePACS refused before.
"""

from __future__ import annotations

from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from safepacs.db.write import read_header
from safepacs.dicom.attributes import HEADER_TAGS
from safepacs.dicom.header import read_indexed_elements
from safepacs.dicom.transcode import dataset_bytes
from safepacs.errors import InvalidObjectError
from tests.support.corpus import make_ct, part10_bytes, storable_files


def _reference(body: bytes, implicit: bool) -> object:
    """What ingest made of ``body`` through pydicom's reader: the index rows, or "refused"."""
    fp = BytesIO(body)
    try:
        ds = read_dataset(fp, implicit, True, specific_tags=list(HEADER_TAGS))
        if fp.tell() > len(body):
            return "refused"
        for tag in ds.keys():
            raw = ds.get_item(tag)
            length, value = getattr(raw, "length", None), getattr(raw, "value", None)
            if length not in (None, 0xFFFFFFFF) and isinstance(value, bytes) and len(value) != length:
                return "refused"
        return read_header(ds)
    except Exception:  # pydicom's many failures all meant: refused
        return "refused"


def _fast(body: bytes, implicit: bool) -> object:
    """The same through :func:`read_indexed_elements`; None where it leaves the data set to pydicom."""
    try:
        ds = read_indexed_elements(body, implicit)
        return None if ds is None else read_header(ds)
    except InvalidObjectError:
        return "refused"


def _body(ds: Dataset, syntax: UID) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    return dataset_bytes(part10_bytes(ds))[1]


def test_every_storable_file_of_the_corpus_gives_pydicoms_rows() -> None:
    read_here = 0
    for path in storable_files():
        ts, body = dataset_bytes(path.read_bytes())
        uid = UID(ts)
        if uid.is_deflated or not uid.is_little_endian:
            continue  # ingest reads these with pydicom
        fast = _fast(body, uid.is_implicit_VR)
        if fast is not None:
            assert fast == _reference(body, uid.is_implicit_VR), path.name
            read_here += 1
    assert read_here > 50  # the common case really is read here


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_sequences_of_undefined_length_are_stepped_over(syntax: UID) -> None:
    """An unindexed sequence of undefined length (items of undefined length, nested) is skipped;
    an indexed one is left to pydicom."""
    ds = make_ct(patient_name="Seq^Test")
    inner = Dataset()
    inner.CodeValue = "X"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ConceptCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])  # not indexed
    for element in (ds["ReferencedImageSequence"], item["ConceptCodeSequence"]):
        element.is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    body = _body(ds, syntax)
    assert body.count(b"\xfe\xff\xdd\xe0") == 3 and b"\xfe\xff\x0d\xe0" in body  # delimiters, as meant
    implicit = syntax.is_implicit_VR
    fast = _fast(body, implicit)
    assert fast is not None and fast == _reference(body, implicit)
    ds.ProcedureCodeSequence = Sequence([inner])  # indexed
    ds["ProcedureCodeSequence"].is_undefined_length = True
    assert _fast(_body(ds, syntax), implicit) is None


def test_explicit_vr_where_implicit_was_announced_is_left_to_pydicom() -> None:
    body = _body(make_ct(), ExplicitVRLittleEndian)
    assert read_indexed_elements(body, True) is None
    assert read_indexed_elements(_body(make_ct(), ImplicitVRLittleEndian), False) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3),
)
def test_cut_or_damaged_data_sets_get_pydicoms_verdict(
    syntax: UID, cut: float, flips: list[tuple[float, int]]
) -> None:
    """Truncated anywhere, or with bytes changed: never an exception other than a refusal, and wherever
    the data set is read here, the verdict (the rows, or refused) is the one pydicom's reading gave."""
    body = bytearray(_body(make_ct(rows=4, cols=4, patient_name="Cut^Test"), syntax))
    for where, value in flips:
        body[int(where * (len(body) - 1))] = value
    data = bytes(body[: int(cut * len(body))])
    implicit = syntax.is_implicit_VR
    fast = _fast(data, implicit)
    if fast is not None:
        assert fast == _reference(data, implicit)


def test_the_header_tags_are_what_the_index_reads() -> None:
    """The elements ingest parses (``HEADER_TAGS``, in the pure DICOM layer) are exactly those the
    index's row builder reads: one missing would leave a column empty for every instance."""
    from safepacs.db import write

    assert write._READ_TAGS == HEADER_TAGS
