"""A small index to query: SQLite (and PostgreSQL when SAFEPACS_TEST_POSTGRES is set) fixtures, the
``Archive`` of five studies, and builders of instances and identifiers."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as dicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from safepacs.app import Repositories, open_repositories
from safepacs.db.database import migrate
from safepacs.types import QueryLevel, QueryModel, StoredBlob

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
ELE = "1.2.840.10008.1.2.1"
PR, SR_ = QueryModel.PATIENT_ROOT, QueryModel.STUDY_ROOT
PATIENT, STUDY, SERIES, IMAGE = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE


# Fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite in a temp file, or PostgreSQL in a fresh schema (conftest's ``postgres_url``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def repos(db_url: str) -> Iterator[Repositories]:
    migrate(db_url)
    repos = open_repositories(db_url)
    yield repos
    repos.close()


def blob(n: int | str = 0) -> StoredBlob:
    return StoredBlob(f"blob-{n}", "kek-1", hashlib.sha256(str(n).encode()).hexdigest(), 1000 + len(str(n)))


def put(ds: Dataset, keyword: str, value: Any) -> None:
    """Set a key without pydicom's value validation (query values such as 'C*' are not valid CS)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=dicom_config.IGNORE))


def instance(study: str, series: str, *, sop: str | None = None, sop_class: str = CT, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop or generate_uid()
    ds.SOPClassUID = sop_class
    for keyword, value in keys.items():
        if isinstance(value, list) and value and isinstance(value[0], Dataset):
            setattr(ds, keyword, value)
        else:
            put(ds, keyword, value)
    return ds


def query(level: QueryLevel, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    for keyword, value in keys.items():
        if (isinstance(value, list) and value and isinstance(value[0], Dataset)) or keyword.endswith(
            "Sequence"
        ):
            setattr(ds, keyword, value)
        else:
            put(ds, keyword, value)
    return ds


def raw_query(level: QueryLevel, tag: int, vr: str, value: bytes) -> Dataset:
    """An identifier holding one undecoded element, as received from the network."""
    ds = query(level)
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


def item(**keys: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        put(ds, keyword, value)
    return ds


class Archive:
    """A small archive: two named patients, one patient without an ID, five studies."""

    def __init__(self, repos: Repositories) -> None:
        self.repos = repos
        u = generate_uid
        self.a1, self.a2, self.b1, self.c1, self.c2 = u(), u(), u(), u(), u()
        self.a1_ct, self.a1_sr, self.a2_mr, self.b1_ct, self.c1_ot, self.c2_ot = u(), u(), u(), u(), u(), u()
        pa = dict(PatientID="PA", PatientName="Müller^Hans", PatientBirthDate="19700101", PatientSex="M")
        pb = dict(PatientID="PB", IssuerOfPatientID="HOSP", PatientName="O'Brien^Pat", PatientSex="F")
        a1 = dict(
            StudyDate="20240105",
            StudyTime="103000",
            AccessionNumber="ACC_1",
            StudyID="S1",
            ReferringPhysicianName="House^Greg",
            StudyDescription="Chest 100%",
            ProcedureCodeSequence=[item(CodeValue="P1", CodingSchemeDesignator="LOCAL", CodeMeaning="Chest")],
        )
        a2 = dict(
            StudyDate="20230610",
            StudyTime="0815",
            AccessionNumber="ACCX1",
            StudyID="S2",
            StudyDescription="Chest 1000",
        )
        b1 = dict(StudyDate="20240201", StudyTime="2300", AccessionNumber="a!b", StudyDescription="Knee_left")
        self.sops: dict[str, list[str]] = {}
        for n in range(3):
            self._add(pa | a1, self.a1, self.a1_ct, Modality="CT", SeriesNumber=1, InstanceNumber=n + 1)
        self._add(
            pa | a1,
            self.a1,
            self.a1_sr,
            sop_class=SR,
            Modality="SR",
            SeriesNumber=2,
            InstanceNumber=1,
            ContentDate="20240106",
            ConceptNameCodeSequence=[
                item(CodeValue="18748-4", CodingSchemeDesignator="LN", CodeMeaning="Report")
            ],
        )
        for n in range(2):
            self._add(
                pa | a2, self.a2, self.a2_mr, sop_class=MR, Modality="MR", SeriesNumber=1, InstanceNumber=n
            )
        self._add(
            pb | b1,
            self.b1,
            self.b1_ct,
            Modality="CT",
            SeriesNumber=7,
            InstanceNumber=1,
            RequestAttributesSequence=[
                item(RequestedProcedureID="RP1", ScheduledProcedureStepID="SPS1"),
                item(RequestedProcedureID="RP2", ScheduledProcedureStepID="SPS2"),
            ],
        )
        anon = dict(PatientID="", PatientName="Anonymous")
        self._add(anon | dict(StudyDate="20200101"), self.c1, self.c1_ot, Modality="OT")
        self._add(anon | dict(StudyDate="20200102"), self.c2, self.c2_ot, Modality="OT")

    def _add(self, keys: dict[str, Any], study: str, series: str, **more: Any) -> None:
        ds = instance(study, series, **keys, **more)
        self.repos.instances.add_instance(ds, blob(ds.SOPInstanceUID), ELE)
        self.sops.setdefault(series, []).append(ds.SOPInstanceUID)


@pytest.fixture
def archive(repos: Repositories) -> Archive:
    return Archive(repos)


def uids(results: list[Dataset], keyword: str) -> set[str]:
    return {str(r.get(keyword) or "") for r in results}


def find(
    repos: Repositories, model: QueryModel, level: QueryLevel, limit: int | None = None, **keys: Any
) -> list[Dataset]:
    return repos.instances.find(model, level, query(level, **keys), limit)
