"""C-FIND identifiers written straight from the index rows (index/dicombytes.py, sql.run_find_encoded)
are byte for byte what pydicom writes for the data sets of the old path (sql.run_find, encoded by
pynetdicom's ``dsutils.encode``): every level of both models, every kept key, sequences, wild cards,
ranges, UID lists, keys the index does not keep, the response character set, both VR encodings."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import build_context, evt
from pynetdicom.dsutils import decode, encode

from safepacs.app import Repositories, open_archive
from safepacs.config import load_settings
from safepacs.db import sql
from safepacs.dicom import attributes as A
from safepacs.dicom import dicombytes as B
from safepacs.protocols.dimse.contexts import (
    FIND_MODELS,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from safepacs.types import Principal, PrincipalKind, QueryLevel, QueryModel, Service
from tests.support import index as ti
from tests.support.corpus import make_ct
from tests.support.dicom_client import associate
from tests.support.index import IMAGE, PATIENT, PR, SERIES, SR_, STUDY, Archive, item, query
from tests.support.server import dcmtk, run_cli, start_server

# The index fixtures of test_index: SQLite, and PostgreSQL when SAFEPACS_TEST_POSTGRES is set.
db_url, repos, archive = ti.db_url, ti.repos, ti.archive

RETRIEVE_AE_TITLE = 0x00080054
AE = "SAFEPACS"


def reference(
    repos: Repositories, model: QueryModel, level: QueryLevel, ident: Dataset, implicit: bool
) -> list[Any]:
    """The old path: the data sets, RetrieveAETitle set as the query service sets it, then encoded as
    pynetdicom encodes a pending response's identifier."""
    found = repos.instances.find(model, level, ident, None)
    if "RetrieveAETitle" in ident:
        for ds in found:
            ds.RetrieveAETitle = AE
    return [encode(ds, implicit, True) for ds in found]


def ours(
    repos: Repositories, model: QueryModel, level: QueryLevel, ident: Dataset, implicit: bool
) -> list[Any]:
    fill = {RETRIEVE_AE_TITLE: AE} if "RetrieveAETitle" in ident else {}
    return repos.instances.find_encoded(model, level, ident, None, implicit_vr=implicit, fill=fill)


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The direct encoding must answer by itself: pydicom's writer is not there to fall back on."""

    def refuse(*_: Any) -> bytes:
        raise AssertionError("fell back to pydicom's writer")

    monkeypatch.setattr(sql, "_pydicom_encoded", refuse)
    yield


def _rich(a: Archive) -> None:
    """Values that take the unusual turns: non-ASCII text and names, component groups (with empty
    trailing ones), several values, odd and even lengths, a stored value wider than its VR allows."""
    a._add(
        dict(
            PatientID="PX",
            PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
            PatientBirthDate="19800229",
            PatientSex="F",
            PatientComments="Öl\\und Wasser",
            StudyDescription="two\\parts",
            AccessionNumber="",
            ReferringPhysicianName="A^B\\C^D==",
            Occupation="Nurse\\\\Clerk",
            StudyDate="20240105",
            StudyTime="1",
            OtherPatientIDsSequence=[item(PatientID="OLD-1", IssuerOfPatientID="ÄRZTE")],
        ),
        generate_uid(),
        generate_uid(),
        Modality="MR",
        SeriesNumber=3,
        SeriesDescription="ax ",
        InstanceNumber=12345,
        Rows=512,
        Columns=0,
        ContentCreatorName="Doe^Jane\\\\=Roe^Jane",
        ConceptNameCodeSequence=[item(CodeValue="C1", CodingSchemeDesignator="L", CodeMeaning="Café")],
    )
    a._add(dict(PatientID="PY", PatientName="Ōtsuka^Ĳ=", StudyDate=""), generate_uid(), generate_uid())


def _all_keys(level: QueryLevel) -> Dataset:
    keys = {
        attr.keyword: ""
        for attr in A.ATTRIBUTES
        if A.usable_at(level, attr.level) and (attr.column is not None or attr.derived is not None)
    }
    ident = query(level, **keys)
    for seq in A.SEQUENCES:
        if A.usable_at(level, seq.level):
            setattr(ident, seq.keyword, [])
    return ident


def _with_unsupported(ident: Dataset) -> Dataset:
    ident.RetrieveAETitle = ""
    ident.PatientWeight = None  # DS, not kept: returned empty
    ident.OtherPatientNames = None
    ident.add(DataElement(0x00291010, "LO", "private"))  # private: not answered
    ident.add(DataElement(0x00400275, "SQ", []))  # a sequence not kept: returned empty
    ident.add(DataElement(0x00181030, "LO", None))  # a key of no level (ProtocolName lives at SERIES)
    return ident


LEVELS = [(PR, PATIENT), (PR, STUDY), (PR, SERIES), (PR, IMAGE), (SR_, STUDY), (SR_, SERIES), (SR_, IMAGE)]


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize(("model", "level"), LEVELS, ids=[f"{m.name}-{lv.value}" for m, lv in LEVELS])
def test_every_key_at_every_level_is_written_as_pydicom_writes_it(
    archive: Archive, no_fallback: None, model: QueryModel, level: QueryLevel, implicit: bool
) -> None:
    _rich(archive)
    ident = _with_unsupported(_all_keys(level))
    expected = reference(archive.repos, model, level, ident, implicit)
    assert len(expected) >= 4
    assert ours(archive.repos, model, level, ident, implicit) == expected


def _queries(a: Archive) -> list[tuple[QueryLevel, Dataset]]:
    seq_item = item(CodeValue="", CodeMeaning="")
    return [
        (STUDY, query(STUDY, PatientName="m*", StudyInstanceUID="", StudyDate="")),
        (STUDY, query(STUDY, PatientName="*Hans*", PatientID="", ModalitiesInStudy="")),
        (STUDY, query(STUDY, StudyDate="20240101-", StudyTime="", AccessionNumber="", StudyID="")),
        (STUDY, query(STUDY, StudyDate="-20231231", NumberOfStudyRelatedInstances="")),
        (STUDY, query(STUDY, StudyInstanceUID=f"{a.a1}\\{a.b1}\\{a.c2}", SOPClassesInStudy="")),
        (STUDY, query(STUDY, ModalitiesInStudy="CT\\SR", StudyDescription="Chest*")),
        (STUDY, query(STUDY, AccessionNumber='""', PatientName="")),  # Empty Value Matching
        (STUDY, query(STUDY, StudyInstanceUID="", ProcedureCodeSequence=[seq_item])),
        (STUDY, query(STUDY, StudyInstanceUID="", ProcedureCodeSequence=[item(CodeValue="P1")])),
        (STUDY, query(STUDY, PatientID="", OtherPatientIDsSequence=[item(PatientID="", Manufacturer="")])),
        (SERIES, query(SERIES, StudyInstanceUID=a.b1, SeriesInstanceUID="", RequestAttributesSequence=[])),
        (SERIES, query(SERIES, Modality="CT", SeriesNumber="7", NumberOfSeriesRelatedInstances="")),
        (IMAGE, query(IMAGE, StudyInstanceUID=a.a1, SOPInstanceUID="", InstanceNumber="", ContentDate="")),
        (IMAGE, query(IMAGE, SeriesInstanceUID=a.a1_sr, ConceptNameCodeSequence=[seq_item])),
        (IMAGE, query(IMAGE, SOPInstanceUID="\\".join(a.sops[a.a1_ct]), AvailableTransferSyntaxUID="")),
        (STUDY, query(STUDY, PatientName="NOBODY*")),  # no match
        (STUDY, query(STUDY)),  # no return keys at all
    ]


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_matching_queries_are_written_as_pydicom_writes_them(
    archive: Archive, no_fallback: None, implicit: bool
) -> None:
    _rich(archive)
    for level, ident in _queries(archive):
        for model in (PR, SR_):
            expected = reference(archive.repos, model, level, ident, implicit)
            assert ours(archive.repos, model, level, ident, implicit) == expected, (model, level, ident)


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_identifiers_in_other_character_sets_are_answered_in_utf8(
    archive: Archive, no_fallback: None, charset: str
) -> None:
    """The request's values are decoded in its character set; every answer is ISO_IR 192 (as before)."""
    _rich(archive)
    ident = query(STUDY, StudyInstanceUID="", PatientName="", RetrieveAETitle="")
    ident.SpecificCharacterSet = charset
    value = "Müller*".encode("latin-1" if charset == "ISO_IR 100" else "utf-8")
    value += b" " * (len(value) % 2)
    ident[0x00100010] = RawDataElement(Tag(0x00100010), "PN", len(value), value, 0, False, True)
    for implicit in (True, False):
        expected = reference(archive.repos, SR_, STUDY, ident, implicit)
        assert len(expected) == 2  # the two studies of Müller^Hans
        assert ours(archive.repos, SR_, STUDY, ident, implicit) == expected
    assert b"ISO_IR 192" in expected[0] and "Müller".encode() in expected[0]


def test_what_it_does_not_write_goes_to_pydicom(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VR it does not write (an ambiguous one), a text value pydicom cannot encode (a CS outside ISO
    8859-1: no answer, as pynetdicom's 0xC312 before), a value too long for Explicit VR's 16-bit length."""
    a = archive
    a._add(dict(PatientID="PZ", StudyDate="20240301"), generate_uid(), generate_uid(), Modality="ΩΨ")
    a._add(
        dict(PatientID="PW", StudyDate="20240302", PatientComments="x" * 70_000),
        generate_uid(),
        generate_uid(),
    )
    ident = query(
        STUDY, StudyDate="20240301-20240302", PatientID="", ModalitiesInStudy="", PatientComments=""
    )
    ident.add(DataElement(0x00280106, "US or SS", None))  # SmallestImagePixelValue, left ambiguous
    for implicit in (True, False):
        found = ours(a.repos, SR_, STUDY, ident, implicit)
        datasets = a.repos.instances.find(SR_, STUDY, ident, None)
        expected = [None if (e := encode(ds, implicit, True)) is None else e for ds in datasets]
        assert found == expected
        assert None in found  # the CS outside ISO 8859-1
    # Without the ambiguous key, the long value alone still falls back in Explicit VR only.
    del ident[0x00280106]
    calls: list[int] = []
    original = sql._pydicom_encoded
    monkeypatch.setattr(sql, "_pydicom_encoded", lambda *args: calls.append(1) or original(*args))
    assert ours(a.repos, SR_, STUDY, ident, False) == [
        encode(ds, False, True) for ds in a.repos.instances.find(SR_, STUDY, ident, None)
    ]
    assert len(calls) == 2  # the long comment (UN in pydicom's output) and the CS outside ISO 8859-1


def test_element_writer_pads_and_refuses_what_it_must() -> None:
    assert B.element(0x00100010, "PN", "A^B=", True) == b"\x10\x00\x10\x00\x04\x00\x00\x00A^B "
    assert B.element(0x0020000D, "UI", "1.2.3", False) == b"\x20\x00\x0d\x00UI\x06\x001.2.3\x00"
    assert B.element(0x00201208, "IS", 123, False) == b"\x20\x00\x08\x12IS\x04\x00123 "
    assert B.element(0x00280010, "US", 512, True) == b"\x28\x00\x10\x00\x02\x00\x00\x00\x00\x02"
    assert B.element(0x00081030, "LO", "", False) == b"\x08\x00\x30\x10LO\x00\x00"
    for vr, value in (("US", 70_000), ("IS", "12"), ("CS", "Ω"), ("LO", 3), ("US or SS", 1)):
        with pytest.raises(B.Unencodable):
            B.element(0x00080060, vr, value, False)


# Over a real association ------------------------------------------------------------------------------
def _network_corpus(folder: Path, data: Path) -> None:
    """Instances whose answers take the unusual turns: names in ISO 8859-1 and in UTF-8 with component
    groups, a patient without an ID, several series, a procedure code sequence."""
    folder.mkdir()
    study = generate_uid()
    files = [
        make_ct(patient_id="N-1", patient_name="Müller^Hans", study_uid=study, instance_number=1),
        make_ct(
            patient_id="N-1", patient_name="Müller^Hans", study_uid=study, instance_number=2, Modality="MR"
        ),
        make_ct(
            patient_id="N-2",
            patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
            SpecificCharacterSet="ISO_IR 192",
            StudyDescription="Kopf ohne Kontrast",
            ProcedureCodeSequence=[item(CodeValue="P1", CodingSchemeDesignator="L", CodeMeaning="Tête")],
        ),
        make_ct(patient_id="", patient_name="Anonymous", AccessionNumber=None, StudyDate="20231224"),
    ]
    for n, ds in enumerate(files):
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    assert run_cli("import", str(folder), "--data", str(data)) == 0


def _network_queries() -> list[tuple[Any, QueryLevel, Dataset]]:
    study_root, patient_root = (
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
    )
    latin = query(STUDY, StudyInstanceUID="", PatientName="", RetrieveAETitle="")
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin[0x00100010] = RawDataElement(
        Tag(0x00100010), "PN", 8, "Mü*".encode("latin-1") + b"     ", 0, False, True
    )
    return [
        (study_root, STUDY, _with_unsupported(_all_keys(STUDY))),
        (study_root, SERIES, _with_unsupported(_all_keys(SERIES))),
        (study_root, IMAGE, _all_keys(IMAGE)),
        (patient_root, PATIENT, _with_unsupported(_all_keys(PATIENT))),
        (patient_root, STUDY, query(STUDY, PatientID="N-*", StudyInstanceUID="", ModalitiesInStudy="")),
        (study_root, STUDY, query(STUDY, StudyDate="20231201-20231231", PatientID="", AccessionNumber="")),
        (study_root, STUDY, latin),
        (study_root, STUDY, query(STUDY, PatientName="NOBODY")),
    ]


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=["implicit", "explicit"]
)
def test_a_real_association_receives_the_old_bytes(data_dir: Path, tmp_path: Path, syntax: str) -> None:
    """The identifiers a pynetdicom SCU receives are the bytes of the old path: from the same server with
    ``server.dimse_send_path`` off (pynetdicom encoding the data sets and sending every response), and
    from the data sets of QueryService.find encoded in this process; the statuses are the same too."""
    _network_corpus(tmp_path / "corpus", data_dir)
    viewer = Principal(kind=PrincipalKind.PEER, name="VIEWER", allow=frozenset({Service.FIND}))
    run_cli(
        "peer",
        "add",
        "VIEWER",
        "--host",
        "127.0.0.1",
        "--allow",
        "find",
        "--tls",
        "off",
        "--data",
        str(data_dir),
    )
    answers: dict[str, list[tuple[list[bytes], list[int]]]] = {}
    for send_path in ("true", "false"):
        env = {"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_SERVER__DIMSE_SEND_PATH": send_path}
        srv = start_server(data_dir, env=env)
        try:
            answers[send_path] = [
                _c_find_raw(srv.port, model, syntax, ident) for model, _, ident in _network_queries()
            ]
        finally:
            srv.stop()
    assert answers["true"] == answers["false"]
    local = open_archive(load_settings(data_dir))
    try:
        for (model, level, ident), (received, statuses) in zip(
            _network_queries(), answers["true"], strict=True
        ):
            found = local.query.find(viewer, FIND_MODELS[str(model)], level, ident)
            expected = [encode(ds, syntax == ImplicitVRLittleEndian, True) for ds in found]
            assert received == expected, (model, level)
            assert statuses == [0xFF00] * len(expected) + [0x0000]
    finally:
        local.close()


def _c_find_raw(port: int, model: Any, syntax: str, ident: Dataset) -> tuple[list[bytes], list[int]]:
    """The identifiers of the responses as received (undecoded), and every response's status."""
    received: list[bytes] = []

    def keep(event: Any) -> None:
        msg = event.message
        if msg.data_set is not None and msg.data_set.getvalue():
            received.append(msg.data_set.getvalue())

    contexts = [build_context(model, [syntax])]
    with associate(port, contexts, handlers=[(evt.EVT_DIMSE_RECV, keep)]) as assoc:
        assert assoc.is_established
        statuses = [int(s.Status) for s, _ in assoc.send_c_find(ident, model)]
    return received, statuses


def test_findscu_reads_what_the_old_path_answered(data_dir: Path, tmp_path: Path) -> None:
    """DCMTK's findscu, writing each response it decoded to a file, reads the old path's answers."""
    _network_corpus(tmp_path / "corpus", data_dir)
    viewer = Principal(kind=PrincipalKind.PEER, name="VIEWER", allow=frozenset({Service.FIND}))
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    local = open_archive(load_settings(data_dir))
    out = tmp_path / "responses"
    out.mkdir()
    try:
        srv.add_peer("VIEWER", "find")
        keys = ["QueryRetrieveLevel=STUDY", "PatientName=*", "PatientID", "StudyInstanceUID", "StudyDate",
                "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "RetrieveAETitle", "PatientWeight",
                "ProcedureCodeSequence[0].CodeMeaning"]  # fmt: skip
        args = [a for k in keys for a in ("-k", k)]
        done = dcmtk("findscu", "-S", "-X", "-od", str(out), "-aet", "VIEWER", "-aec", "SAFEPACS", *args,
                     srv.host, str(srv.port))  # fmt: skip
        assert done.returncode == 0, done.stderr
        ident = query(STUDY, PatientName="*", PatientID="", StudyInstanceUID="", StudyDate="",
                      ModalitiesInStudy="", NumberOfStudyRelatedSeries="", RetrieveAETitle="")  # fmt: skip
        ident.PatientWeight = None
        ident.ProcedureCodeSequence = [item(CodeMeaning="")]
        found = local.query.find(viewer, QueryModel.STUDY_ROOT, STUDY, ident)
        expected = [decode(BytesIO(encode(ds, False, True)), False, True) for ds in found]
        got = [dcmread(p) for p in sorted(out.iterdir())]
        assert len(got) == len(expected) == 3
        key = sorted  # findscu's files come in the order of the responses
        assert key([_elements(ds) for ds in got]) == key([_elements(ds) for ds in expected])
        assert any("山田^太郎" in str(ds.PatientName) for ds in got)
    finally:
        local.close()
        srv.stop()


def _elements(ds: Dataset) -> list[tuple[int, str, str]]:
    return [(int(e.tag), str(e.VR), repr(e.value)) for e in ds if e.tag.group != 0x0002]
