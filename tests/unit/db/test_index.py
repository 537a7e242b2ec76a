"""The SQL index: schema, ingest bookkeeping, C-FIND matching, retrieval keys, peers and users.

Every test runs on SQLite and, when SAFEPACS_TEST_POSTGRES names a server, on PostgreSQL too (each test
in a fresh schema of its own, dropped afterwards).
"""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import re
import sqlite3
import threading
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from safepacs.app import Repositories, open_repositories
from safepacs.db.database import migrate
from safepacs.db.schema import metadata
from safepacs.db.write import driver_execute
from safepacs.errors import (
    ConflictError,
    DatabaseError,
    InvalidObjectError,
    NotFoundError,
    QueryError,
    QueryLimitError,
    UnsyncedCommitError,
)
from safepacs.records import UserRecord
from safepacs.types import Peer, QueryLevel, QueryModel, Service, TlsMode, UserIdentityMode
from tests.support import index as ix
from tests.support.index import (
    CT,
    ELE,
    IMAGE,
    PATIENT,
    PR,
    SERIES,
    SR,
    SR_,
    STUDY,
    Archive,
    blob,
    find,
    instance,
    item,
    query,
    raw_query,
    uids,
)

# The index fixtures: SQLite, and PostgreSQL when SAFEPACS_TEST_POSTGRES is set.
db_url, repos, archive = ix.db_url, ix.repos, ix.archive


# Schema ------------------------------------------------------------------------------------------------
def test_migrate_is_idempotent_and_matches_the_schema(db_url: str) -> None:
    migrate(db_url)
    migrate(db_url)
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_sqlite_connections_are_durable_and_concurrent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'i.sqlite3'}"
    migrate(url)
    repos = open_repositories(url)
    try:
        with repos.db.engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        repos.close()
    assert pragma == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 30000}


def test_sqlite_writers_take_turns_through_a_lock_file(tmp_path: Path) -> None:
    """Writers of every process queue on ``<index>-writers`` (flock) rather than in SQLite's polling
    busy handler: while another process holds it, a write waits and a read does not."""
    url = f"sqlite:///{tmp_path / 'i.sqlite3'}"
    migrate(url)
    repos = open_repositories(url)
    try:
        repos.directory.add_peer(Peer("FIRST", "127.0.0.1", None, frozenset({Service.ECHO})))
        lock = tmp_path / "i.sqlite3-writers"
        assert lock.stat().st_mode & 0o777 == 0o600
        other = os.open(lock, os.O_RDWR)  # another process's writer, as far as flock is concerned
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            done = threading.Event()
            second = Peer("SECOND", "127.0.0.1", None, frozenset({Service.ECHO}))
            writer = threading.Thread(target=lambda: (repos.directory.add_peer(second), done.set()))
            writer.start()
            assert not done.wait(0.5)
            assert [p.ae_title for p in repos.directory.list_peers()] == ["FIRST"]
            fcntl.flock(other, fcntl.LOCK_UN)
            assert done.wait(10)
            writer.join(10)
        finally:
            os.close(other)
        assert [p.ae_title for p in repos.directory.list_peers()] == ["FIRST", "SECOND"]
    finally:
        repos.close()


def test_an_instance_is_synced_to_disk_before_add_instance_returns_and_outside_the_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its commit is in the WAL and the WAL synced when add_instance returns; the sync happens once
    the writers' turn is free again, so other writers need not wait for it."""
    import safepacs.db.database as index_module

    database = tmp_path / "i.sqlite3"
    url = f"sqlite:///{database}"
    migrate(url)
    sop = generate_uid()
    seen: list[tuple[str, bool, bool]] = []  # (file synced, row committed then, turn free then)
    real_sync = index_module._sync_data

    def recording_sync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        other = sqlite3.connect(database)  # another connection: sees committed rows only
        try:
            (count,) = other.execute(
                "SELECT count(*) FROM instances WHERE sop_instance_uid = ?", (sop,)
            ).fetchone()
        finally:
            other.close()
        committed = count == 1
        probe = os.open(tmp_path / "i.sqlite3-writers", os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a writer holds its turn
            fcntl.flock(probe, fcntl.LOCK_UN)
            free = True
        except BlockingIOError:
            free = False
        finally:
            os.close(probe)
        seen.append((path, committed, free))
        real_sync(fd)

    repos = open_repositories(url)
    try:
        monkeypatch.setattr(index_module, "_sync_data", recording_sync)
        repos.instances.add_instance(instance(generate_uid(), generate_uid(), sop=sop), blob(1), ELE)
        monkeypatch.setattr(index_module, "_sync_data", real_sync)
    finally:
        repos.close()
    assert seen == [(str(database) + "-wal", True, True)]


def test_an_index_sync_that_fails_is_an_error_and_keeps_what_was_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safepacs.db.database as index_module

    url = f"sqlite:///{tmp_path / 'i.sqlite3'}"
    migrate(url)
    sop = generate_uid()

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    repos = open_repositories(url)
    try:
        monkeypatch.setattr(index_module, "_sync_data", failing_sync)
        with pytest.raises(UnsyncedCommitError, match="could not be synced"):
            repos.instances.add_instance(instance(generate_uid(), generate_uid(), sop=sop), blob(1), ELE)
        monkeypatch.undo()
        assert repos.instances.get_instance(sop).blob == blob(1)  # type: ignore[union-attr]
    finally:
        repos.close()


def test_writes_go_on_when_the_writers_lock_file_cannot_be_used(tmp_path: Path) -> None:
    """The lock file only orders writers; when it cannot be opened, SQLite's own locking still works."""
    url = f"sqlite:///{tmp_path / 'i.sqlite3'}"
    migrate(url)
    (tmp_path / "i.sqlite3-writers").mkdir()  # in the way: opening it for writing fails
    repos = open_repositories(url)
    try:
        for title in ("ONE", "TWO"):
            repos.directory.add_peer(Peer(title, "127.0.0.1", None, frozenset({Service.ECHO})))
        assert [p.ae_title for p in repos.directory.list_peers()] == ["ONE", "TWO"]
    finally:
        repos.close()


def test_unmigrated_database_and_bad_urls_raise_index_errors(tmp_path: Path) -> None:
    repos = open_repositories(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    try:
        with pytest.raises(DatabaseError):
            repos.instances.count_instances()
    finally:
        repos.close()
    for url in ("nonsense", "mysql://x/y", "sqlite://"):
        with pytest.raises(DatabaseError):
            open_repositories(url)


# Ingest bookkeeping ------------------------------------------------------------------------------------
def test_counts_at_every_level(archive: Archive) -> None:
    repos = archive.repos
    assert repos.instances.count_instances() == 9
    (pa,) = find(
        repos,
        PR,
        PATIENT,
        PatientID="PA",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    assert (pa.NumberOfPatientRelatedStudies, pa.NumberOfPatientRelatedSeries) == (2, 3)
    assert pa.NumberOfPatientRelatedInstances == 6
    (a1,) = find(
        repos,
        SR_,
        STUDY,
        StudyInstanceUID=archive.a1,
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
    )
    assert (a1.NumberOfStudyRelatedSeries, a1.NumberOfStudyRelatedInstances) == (2, 4)
    found = find(
        repos,
        SR_,
        SERIES,
        StudyInstanceUID=archive.a1,
        SeriesInstanceUID="",
        NumberOfSeriesRelatedInstances="",
    )
    assert {(r.SeriesInstanceUID, r.NumberOfSeriesRelatedInstances) for r in found} == {
        (archive.a1_ct, 3),
        (archive.a1_sr, 1),
    }
    # Counts are matchable keys too.
    assert uids(
        find(repos, SR_, STUDY, StudyInstanceUID="", NumberOfStudyRelatedInstances="2"), "StudyInstanceUID"
    ) == {archive.a2}


def test_modalities_and_sop_classes_in_study(archive: Archive) -> None:
    repos = archive.repos
    (a1,) = find(repos, SR_, STUDY, StudyInstanceUID=archive.a1, ModalitiesInStudy="", SOPClassesInStudy="")
    assert list(a1.ModalitiesInStudy) == ["CT", "SR"]
    assert set(a1.SOPClassesInStudy) == {CT, SR}
    got = find(repos, SR_, STUDY, StudyInstanceUID="", ModalitiesInStudy="MR")
    assert uids(got, "StudyInstanceUID") == {archive.a2}
    got = find(repos, SR_, STUDY, StudyInstanceUID="", ModalitiesInStudy=["MR", "SR"])
    assert uids(got, "StudyInstanceUID") == {archive.a1, archive.a2}
    got = find(repos, SR_, STUDY, StudyInstanceUID="", SOPClassesInStudy=SR)
    assert uids(got, "StudyInstanceUID") == {archive.a1}


def test_patients_without_id_are_not_merged(archive: Archive) -> None:
    found = find(
        archive.repos, PR, PATIENT, PatientID="", PatientName="Anonymous", NumberOfPatientRelatedStudies=""
    )
    assert len(found) == 2
    assert all(r.NumberOfPatientRelatedStudies == 1 for r in found)


def test_replace_semantics(repos: Repositories) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = instance(study, series, sop=sop, PatientID="P1", PatientName="Old^Name", Modality="CT")
    assert repos.instances.add_instance(first, blob("one"), ELE) is None
    with pytest.raises(ConflictError):
        repos.instances.add_instance(first, blob("two"), ELE)
    assert repos.instances.get_instance(sop).blob == blob("one")  # type: ignore[union-attr]
    second = instance(study, series, sop=sop, PatientID="P1", PatientName="New^Name", Modality="MR")
    assert repos.instances.add_instance(second, blob("two"), "1.2.840.10008.1.2.4.50", replace=True) == blob(
        "one"
    )
    ref = repos.instances.get_instance(sop)
    assert ref is not None
    assert (ref.blob, ref.transfer_syntax_uid, ref.study_uid, ref.series_uid) == (
        blob("two"),
        "1.2.840.10008.1.2.4.50",
        study,
        series,
    )
    assert repos.instances.count_instances() == 1
    (row,) = find(repos, SR_, SERIES, SeriesInstanceUID=series, Modality="", PatientName="")
    assert (row.Modality, str(row.PatientName)) == ("MR", "New^Name")
    # Replacing the only instance of a study by one in another study leaves nothing empty behind.
    other = instance(generate_uid(), generate_uid(), sop=sop, PatientID="P2")
    assert repos.instances.add_instance(other, blob("three"), ELE, replace=True) == blob("two")
    assert uids(find(repos, SR_, STUDY, StudyInstanceUID=""), "StudyInstanceUID") == {other.StudyInstanceUID}
    assert uids(find(repos, PR, PATIENT, PatientID=""), "PatientID") == {"P2"}


def test_delete_instance_removes_empty_parents(archive: Archive) -> None:
    repos = archive.repos
    (sop,) = archive.sops[archive.b1_ct]
    assert repos.instances.delete_instance(sop) == blob(sop)
    assert repos.instances.delete_instance(sop) is None
    assert repos.instances.get_instance(sop) is None
    assert find(repos, PR, PATIENT, PatientID="PB") == []
    assert find(repos, SR_, STUDY, StudyInstanceUID=archive.b1) == []
    assert repos.instances.count_instances() == 8


def test_later_instances_update_study_and_series(repos: Repositories) -> None:
    study, series = generate_uid(), generate_uid()
    repos.instances.add_instance(
        instance(study, series, PatientID="P", StudyDescription="first"), blob(1), ELE
    )
    repos.instances.add_instance(
        instance(study, series, PatientID="P", StudyDescription="second"), blob(2), ELE
    )
    repos.instances.add_instance(instance(study, series, PatientID="P"), blob(3), ELE)  # lacks it: kept
    (row,) = find(repos, SR_, STUDY, StudyInstanceUID=study, StudyDescription="")
    assert row.StudyDescription == "second"
    # An instance naming another patient does not move the study.
    repos.instances.add_instance(instance(study, series, PatientID="Q"), blob(4), ELE)
    assert uids(find(repos, PR, PATIENT, PatientID=""), "PatientID") == {"P"}


def test_series_under_another_study_is_refused(repos: Repositories) -> None:
    series = generate_uid()
    repos.instances.add_instance(instance(generate_uid(), series), blob(1), ELE)
    with pytest.raises(InvalidObjectError):
        repos.instances.add_instance(instance(generate_uid(), series), blob(2), ELE)
    assert repos.instances.count_instances() == 1


def test_missing_uids_are_refused(repos: Repositories) -> None:
    ds = instance(generate_uid(), generate_uid())
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidObjectError):
        repos.instances.add_instance(ds, blob(1), ELE)


def codes(*values: str) -> list[Dataset]:
    return [item(CodeValue=v, CodingSchemeDesignator="LOCAL", CodeMeaning=f"Code {v}") for v in values]


def test_later_instances_update_patient_and_sequences(repos: Repositories) -> None:
    study, series = generate_uid(), generate_uid()
    requests = [item(RequestedProcedureID="RP1", ScheduledProcedureStepID="SPS1")]
    first = dict(PatientID="P", PatientName="Old^Name", ProcedureCodeSequence=codes("A"))
    repos.instances.add_instance(
        instance(study, series, **first, RequestAttributesSequence=requests), blob(1), ELE
    )
    repos.instances.add_instance(
        instance(study, series, **first), blob(2), ELE
    )  # the same items: kept as they are
    later = dict(PatientID="P", PatientName="New^Name", ProcedureCodeSequence=codes("B", "C"))
    repos.instances.add_instance(instance(study, series, **later, SeriesDescription="axial"), blob(3), ELE)
    repos.instances.add_instance(instance(study, series, PatientID="P"), blob(4), ELE)  # lacks them: kept
    (row,) = find(
        repos,
        SR_,
        SERIES,
        SeriesInstanceUID=series,
        PatientName="",
        SeriesDescription="",
        RequestAttributesSequence=[Dataset()],
    )
    assert (str(row.PatientName), row.SeriesDescription) == ("New^Name", "axial")
    assert [i.RequestedProcedureID for i in row.RequestAttributesSequence] == ["RP1"]
    (row,) = find(repos, SR_, STUDY, StudyInstanceUID=study, ProcedureCodeSequence=[Dataset()])
    assert [i.CodeValue for i in row.ProcedureCodeSequence] == ["B", "C"]
    assert len(find(repos, PR, PATIENT, PatientName="new^name")) == 1  # the folded copy follows
    assert find(repos, PR, PATIENT, PatientName="old^name") == []


def test_a_conflicting_instance_changes_nothing(repos: Repositories) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    keys = dict(PatientID="P", PatientName="Old^Name", StudyDescription="first", Modality="CT")
    repos.instances.add_instance(
        instance(study, series, sop=sop, **keys, ProcedureCodeSequence=codes("A")), blob(1), ELE
    )
    newer = dict(PatientID="P", PatientName="New^Name", StudyDescription="second", Modality="MR")
    with pytest.raises(ConflictError):
        repos.instances.add_instance(
            instance(study, series, sop=sop, **newer, ProcedureCodeSequence=codes("B")), blob(2), ELE
        )
    # Its series under another study would be refused, but the instance exists: a conflict first.
    with pytest.raises(ConflictError):
        repos.instances.add_instance(instance(generate_uid(), series, sop=sop), blob(3), ELE)
    (row,) = find(
        repos,
        SR_,
        SERIES,
        SeriesInstanceUID=series,
        PatientName="",
        StudyDescription="",
        Modality="",
        ProcedureCodeSequence=[Dataset()],
    )
    assert (str(row.PatientName), row.StudyDescription, row.Modality) == ("Old^Name", "first", "CT")
    assert [i.CodeValue for i in row.ProcedureCodeSequence] == ["A"]
    assert len(find(repos, SR_, STUDY, StudyInstanceUID="")) == 1
    assert repos.instances.get_instance(sop).blob == blob(1)  # type: ignore[union-attr]


def test_a_failed_instance_write_leaves_the_writer_usable(repos: Repositories) -> None:
    """A refused write (here: a conflict) rolls back; the next instance is stored as usual."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    repos.instances.add_instance(instance(study, series, sop=sop), blob(1), ELE)
    with pytest.raises(ConflictError):
        repos.instances.add_instance(instance(study, series, sop=sop), blob(2), ELE)
    repos.instances.add_instance(instance(study, series), blob(3), ELE)
    assert repos.instances.count_instances() == 2
    assert repos.instances.get_instance(sop).blob == blob(1)  # type: ignore[union-attr]


def test_driver_errors_carry_no_values_and_are_sqlalchemys(tmp_path: Path) -> None:
    """Statements run on the sqlite3 connection directly still fail as SQLAlchemy's errors (what the
    retries and error messages expect), and without the values in their text."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    try:
        with engine.connect() as conn:
            driver_execute(conn, "CREATE TABLE t (name TEXT UNIQUE)")
            with pytest.raises(sa.exc.OperationalError) as missing:
                driver_execute(conn, "INSERT INTO no_such_table VALUES (?)", ("Secret^Name",))
            assert "Secret" not in str(missing.value)
            driver_execute(conn, "INSERT INTO t VALUES (?)", ("Secret^Name",))
            with pytest.raises(sa.exc.IntegrityError) as unique:
                driver_execute(conn, "INSERT INTO t VALUES (?)", ("Secret^Name",))
            assert "Secret" not in str(unique.value)
    finally:
        engine.dispose()


def test_another_instance_of_a_known_series_costs_two_statements(repos: Repositories) -> None:
    study, series = generate_uid(), generate_uid()
    keys = dict(PatientID="P", PatientName="A^B", StudyDescription="d", Modality="CT")
    repos.instances.add_instance(
        instance(study, series, **keys, ProcedureCodeSequence=codes("A")), blob(1), ELE
    )
    statements: list[str] = []

    def record(statement: str) -> None:
        if statement.split()[0] in {"SELECT", "INSERT", "UPDATE", "DELETE"}:
            statements.append(statement.split()[0])

    if repos.db.sqlite:  # what SQLite itself runs: the common case goes to its driver directly
        assert (
            repos.db._relaxed is not None
        )  # instances are written on the writer whose commit skips the sync
        engine = repos.db._relaxed._engine
        repos.db._relaxed._drop_kept()  # its one kept connection, too, is made again: traced
        engine.dispose()
        sa.event.listen(engine, "connect", lambda dbapi, _rec: dbapi.set_trace_callback(record))
    else:
        sa.event.listen(repos.db.engine, "before_cursor_execute", lambda *a: record(a[2]))
    repos.instances.add_instance(instance(study, series, **keys), blob(2), ELE)
    assert statements == ["SELECT", "INSERT"]
    statements.clear()
    repos.instances.add_instance(
        instance(study, series, **keys, ProcedureCodeSequence=codes("A")), blob(3), ELE
    )
    assert statements == ["SELECT", "SELECT", "INSERT"]  # the items, found unchanged
    statements.clear()
    repos.instances.add_instance(instance(study, series, **(keys | {"StudyDescription": "e"})), blob(4), ELE)
    assert statements == ["SELECT", "UPDATE", "INSERT"]


def test_rows_written_on_the_driver_path_are_stored_as_sqlalchemy_stores_them(repos: Repositories) -> None:
    """On SQLite the instance insert bypasses SQLAlchemy's execution; its timestamps must still be
    SQLAlchemy's text (not sqlite3's own adapter), like those of the series row written through it."""
    study, series = generate_uid(), generate_uid()
    repos.instances.add_instance(instance(study, series, PatientID="P"), blob(1), ELE)
    with repos.db.engine.connect() as conn:
        stored = conn.exec_driver_sql(
            "SELECT i.created_at, i.updated_at, s.created_at"
            " FROM instances i JOIN series s ON s.pk = i.series_pk"
        ).one()
    if repos.db.sqlite:
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", str(v)) for v in stored), stored
    else:
        assert all(isinstance(v, datetime) and v.tzinfo is not None for v in stored)


# C-FIND matching ---------------------------------------------------------------------------------------
# An entity whose Required Key is empty matches every query on it (PS3.4 C.2.2.1.2): the studies of the
# patient without an ID have no time, accession number or study ID, their series no number and their
# instances no instance number; b1 has no study ID.  They answer "" for those keys below.
SINGLE_CASES = [
    (PR, PATIENT, "PatientID", "PB", "PatientID", {"PB"}),
    (PR, PATIENT, "PatientSex", "F", "PatientID", {"PB"}),
    (PR, PATIENT, "PatientBirthDate", "19700101", "PatientID", {"PA"}),
    (PR, PATIENT, "IssuerOfPatientID", "HOSP", "PatientID", {"PB"}),
    (PR, STUDY, "AccessionNumber", "ACC_1", "StudyID", {"S1", ""}),
    (SR_, STUDY, "AccessionNumber", "ACC_1", "StudyID", {"S1", ""}),
    (SR_, STUDY, "StudyID", "S1", "AccessionNumber", {"ACC_1", "a!b", ""}),
    (SR_, STUDY, "ReferringPhysicianName", "HOUSE^GREG", "StudyID", {"S1"}),
    (SR_, STUDY, "PatientID", "PB", "AccessionNumber", {"a!b"}),
    (PR, SERIES, "Modality", "SR", "SeriesNumber", {"2"}),
    (SR_, SERIES, "SeriesNumber", "7", "Modality", {"CT", "OT"}),
    (SR_, SERIES, "SeriesNumber", "007", "Modality", {"CT", "OT"}),
    (PR, IMAGE, "InstanceNumber", "3", "InstanceNumber", {"3", ""}),
    (SR_, IMAGE, "SOPClassUID", SR, "InstanceNumber", {"1"}),
    (SR_, IMAGE, "ContentDate", "20240106", "SOPClassUID", {SR}),
    (SR_, IMAGE, "AvailableTransferSyntaxUID", ELE, "InstanceAvailability", {"ONLINE"}),
]


@pytest.mark.parametrize(("model", "level", "key", "value", "shown", "expected"), SINGLE_CASES)
def test_single_value_matching(
    archive: Archive,
    model: QueryModel,
    level: QueryLevel,
    key: str,
    value: str,
    shown: str,
    expected: set[str],
) -> None:
    results = archive.repos.instances.find(model, level, query(level, **{shown: "", key: value}), None)
    assert {str(r[shown].value or "") for r in results} == expected
    assert all(
        r.QueryRetrieveLevel == level.value and r.SpecificCharacterSet == "ISO_IR 192" for r in results
    )


def test_non_pn_matching_is_case_sensitive(archive: Archive) -> None:
    unknown = {archive.c1, archive.c2}  # no accession number: they match every query on it
    for value in ("acc_1", "acc*"):
        found = find(archive.repos, SR_, STUDY, StudyInstanceUID="", AccessionNumber=value)
        assert uids(found, "StudyInstanceUID") == unknown
    assert find(archive.repos, SR_, STUDY, StudyDescription="chest*") == []  # an Optional Key
    assert len(find(archive.repos, SR_, STUDY, PatientName="müller^HANS")) == 2


def test_uid_list_matching(archive: Archive) -> None:
    got = find(archive.repos, SR_, STUDY, StudyInstanceUID=[archive.a1, archive.b1, generate_uid()])
    assert uids(got, "StudyInstanceUID") == {archive.a1, archive.b1}
    sops = archive.sops[archive.a1_ct][:2]
    got = find(archive.repos, PR, IMAGE, PatientID="PA", StudyInstanceUID=archive.a1, SOPInstanceUID=sops)
    assert uids(got, "SOPInstanceUID") == set(sops)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"StudyDate": "20240101-20240131"}, {"ACC_1"}),
        ({"StudyDate": "20240101-"}, {"ACC_1", "a!b"}),
        ({"StudyDate": "-20231231"}, {"ACCX1", ""}),
        ({"StudyDate": "20230610"}, {"ACCX1"}),
        ({"StudyDate": "2023.06.10"}, {"ACCX1"}),
        ({"StudyTime": "0800-1030"}, {"ACC_1", "ACCX1", ""}),  # "": the studies without a time
        ({"StudyTime": "-08"}, {"ACCX1", ""}),
        ({"StudyTime": "1030"}, {"ACC_1", ""}),
        ({"StudyTime": "2200-"}, {"a!b", ""}),
        ({"StudyDate": "20240101-", "StudyTime": "-1200"}, {"ACC_1"}),
    ],
)
def test_date_and_time_ranges(archive: Archive, keys: dict[str, str], expected: set[str]) -> None:
    results = archive.repos.instances.find(SR_, STUDY, query(STUDY, AccessionNumber="", **keys), None)
    assert uids(results, "AccessionNumber") == expected


def test_wildcards_do_not_let_sql_wildcards_through(archive: Archive) -> None:
    repos = archive.repos

    def accessions(**keys: Any) -> set[str]:
        return uids(find(repos, SR_, STUDY, **({"AccessionNumber": ""} | keys)), "AccessionNumber")

    assert accessions(StudyDescription="Chest 100%") == {"ACC_1"}  # '%' is literal
    assert accessions(StudyDescription="Chest 100*") == {"ACC_1", "ACCX1"}
    assert accessions(StudyDescription="Chest 10?%") == {"ACC_1"}
    # "" are the studies without an accession number, which match every query on it
    assert accessions(AccessionNumber="ACC_1") == {"ACC_1", ""}  # '_' is literal
    assert accessions(AccessionNumber="ACC_*") == {"ACC_1", ""}
    assert accessions(AccessionNumber="ACC?1") == {"ACC_1", "ACCX1", ""}
    assert accessions(AccessionNumber="a!*") == {"a!b", ""}  # the escape character itself
    assert accessions(StudyDescription="Knee_*") == {"a!b"}
    assert accessions(StudyDescription="%") == set()
    assert accessions(PatientName="m?ller*") == {"ACC_1", "ACCX1"}
    assert accessions(PatientName="*brien*") == {"a!b"}


@pytest.mark.parametrize(
    "evil",
    [
        "x' OR '1'='1",
        "'; DROP TABLE instances; --",
        "\\' OR 1=1 --",
        "PA' --",
        "*' OR 'a'='a",
        '" OR ""="',
    ],
)
def test_sql_injection_values_are_plain_values(archive: Archive, evil: str) -> None:
    for keyword in ("PatientID", "PatientName", "StudyDescription"):
        assert archive.repos.instances.find(SR_, STUDY, query(STUDY, **{keyword: evil}), None) == []
    # only the studies without an accession number, which match every query on it
    found = archive.repos.instances.find(
        SR_, STUDY, query(STUDY, StudyInstanceUID="", AccessionNumber=evil), None
    )
    assert uids(found, "StudyInstanceUID") == {archive.c1, archive.c2}
    with pytest.raises(QueryError):
        archive.repos.instances.instances_for(SR_, STUDY, query(STUDY, StudyInstanceUID=""))
    assert archive.repos.instances.instances_for(SR_, STUDY, query(STUDY, StudyInstanceUID=evil)) == []
    assert archive.repos.instances.count_instances() == 9


def test_universal_matching_and_response_keys(archive: Archive) -> None:
    results = find(
        archive.repos, SR_, STUDY, PatientName="", StudyDate="", AccessionNumber="*", RetrieveAETitle=""
    )
    assert len(results) == 5
    for r in results:
        keywords = {e.keyword for e in r}
        assert keywords == {
            "SpecificCharacterSet",
            "QueryRetrieveLevel",
            "PatientName",
            "StudyDate",
            "AccessionNumber",
            "RetrieveAETitle",
        }
        assert r.RetrieveAETitle in (None, "", [])
    # Keys the index does not keep are returned empty and do not restrict.
    results = find(archive.repos, SR_, STUDY, StudyInstanceUID=archive.a1, PatientMotherBirthName="X*")
    assert len(results) == 1 and results[0].PatientMotherBirthName in (None, "")
    # Keys of a lower level are not matched at a higher one.
    assert len(find(archive.repos, SR_, STUDY, SOPInstanceUID="nothing")) == 5


def test_sequence_matching(archive: Archive) -> None:
    repos = archive.repos
    got = find(
        repos,
        SR_,
        SERIES,
        SeriesInstanceUID="",
        RequestAttributesSequence=[item(ScheduledProcedureStepID="SPS2", RequestedProcedureID="")],
    )
    (row,) = got
    assert row.SeriesInstanceUID == archive.b1_ct
    assert [(i.ScheduledProcedureStepID, i.RequestedProcedureID) for i in row.RequestAttributesSequence] == [
        ("SPS2", "RP2")
    ]
    # Both keys must match within one item.
    seq = [item(ScheduledProcedureStepID="SPS1", RequestedProcedureID="RP2")]
    assert find(repos, SR_, SERIES, RequestAttributesSequence=seq) == []
    # An empty item is universal and returns every stored item.
    rows = find(repos, SR_, SERIES, SeriesInstanceUID="", RequestAttributesSequence=[Dataset()])
    assert len(rows) == 6
    (b1,) = [r for r in rows if r.SeriesInstanceUID == archive.b1_ct]
    assert [i.RequestedProcedureID for i in b1.RequestAttributesSequence] == ["RP1", "RP2"]
    # Wild cards inside items; code sequences at study and image level.
    got = find(repos, SR_, STUDY, ProcedureCodeSequence=[item(CodeValue="P?", CodeMeaning="")])
    assert [i.CodeMeaning for r in got for i in r.ProcedureCodeSequence] == ["Chest"]
    got = find(
        repos, SR_, IMAGE, ConceptNameCodeSequence=[item(CodeValue="18748-4", CodingSchemeDesignator="LN")]
    )
    assert len(got) == 1
    with pytest.raises(QueryError):
        find(
            repos,
            SR_,
            SERIES,
            RequestAttributesSequence=[item(RequestedProcedureID="A"), item(RequestedProcedureID="B")],
        )


def test_limit(archive: Archive) -> None:
    repos = archive.repos
    assert len(find(repos, SR_, STUDY, limit=5, StudyInstanceUID="")) == 5
    assert len(find(repos, SR_, STUDY, limit=0, StudyInstanceUID="")) == 5
    with pytest.raises(QueryLimitError, match="more than 4 studies"):
        find(repos, SR_, STUDY, limit=4, StudyInstanceUID="")
    with pytest.raises(QueryLimitError, match="more than 8 instances"):
        find(repos, SR_, IMAGE, limit=8, SOPInstanceUID="")


def test_non_ascii_identifier_decoded_with_its_character_set(archive: Archive) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientName = "Müller*"
    ds.PatientID = ""
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    write_dataset(raw, ds)
    assert "Müller".encode("latin-1") in raw.getvalue()
    decoded = read_dataset(BytesIO(raw.getvalue()), is_implicit_VR=False, is_little_endian=True)
    (row,) = archive.repos.instances.find(PR, PATIENT, decoded, None)
    assert (row.PatientID, str(row.PatientName), row.SpecificCharacterSet) == (
        "PA",
        "Müller^Hans",
        "ISO_IR 192",
    )


@pytest.mark.parametrize(
    "identifier",
    [
        Dataset(),  # no Query/Retrieve Level
        query(SERIES, StudyInstanceUID=""),  # level differs from the request's
        query(STUDY, StudyDate="yesterday"),
        query(STUDY, StudyTime="2500"),
        raw_query(STUDY, 0x00201208, "IS", b"many"),
        raw_query(STUDY, 0x00100010, "PN", b"\xff\xfe" * 3000),
        query(STUDY, StudyDate="-"),
    ],
)
def test_malformed_identifiers(repos: Repositories, identifier: Dataset) -> None:
    with pytest.raises(QueryError):
        repos.instances.find(SR_, STUDY, identifier, None)


def test_wrong_vr_and_model_level(repos: Repositories) -> None:
    ds = query(STUDY)
    ds.add_new(0x00080020, "LO", "20240101")  # StudyDate is DA
    with pytest.raises(QueryError, match="VR"):
        repos.instances.find(SR_, STUDY, ds, None)
    with pytest.raises(QueryError, match="PATIENT"):
        repos.instances.find(SR_, PATIENT, query(PATIENT, PatientID=""), None)


# Retrieval ---------------------------------------------------------------------------------------------
def test_instances_for(archive: Archive) -> None:
    repos = archive.repos
    a1 = archive.sops[archive.a1_ct] + archive.sops[archive.a1_sr]
    a2 = archive.sops[archive.a2_mr]

    def sops(model: QueryModel, level: QueryLevel, **keys: Any) -> list[str]:
        return [
            ref.sop_instance_uid for ref in repos.instances.instances_for(model, level, query(level, **keys))
        ]

    assert sops(SR_, STUDY, StudyInstanceUID=archive.a1) == a1  # ordered by series, instance number
    assert sorted(sops(SR_, STUDY, StudyInstanceUID=[archive.a1, archive.a2])) == sorted(a1 + a2)
    assert sops(PR, PATIENT, PatientID="PA") == a1 + a2
    assert sops(PR, PATIENT, PatientID="PB", IssuerOfPatientID="OTHER") == []
    assert sops(PR, STUDY, PatientID="PB", StudyInstanceUID=archive.a1) == []
    assert (
        sops(SR_, SERIES, StudyInstanceUID=archive.a1, SeriesInstanceUID=archive.a1_sr)
        == archive.sops[archive.a1_sr]
    )
    assert sops(SR_, SERIES, StudyInstanceUID=archive.a2, SeriesInstanceUID=archive.a1_sr) == []
    one = archive.sops[archive.a1_ct][1]
    (ref,) = repos.instances.instances_for(SR_, IMAGE, query(IMAGE, SOPInstanceUID=one))
    assert (ref.study_uid, ref.series_uid, ref.sop_class_uid, ref.transfer_syntax_uid) == (
        archive.a1,
        archive.a1_ct,
        CT,
        ELE,
    )
    assert ref.blob == blob(one)
    assert sops(SR_, STUDY, StudyInstanceUID="1.2.*") == []  # no wild cards in a retrieve
    for level, keys in (
        (STUDY, {"PatientID": "PA"}),
        (SERIES, {"StudyInstanceUID": archive.a1}),
        (IMAGE, {}),
    ):
        with pytest.raises(QueryError):
            repos.instances.instances_for(SR_, level, query(level, **keys))
    with pytest.raises(QueryError):
        repos.instances.instances_for(SR_, PATIENT, query(PATIENT, PatientID="PA"))


def test_instances_for_long_uid_lists(repos: Repositories) -> None:
    study, series = generate_uid(), generate_uid()
    ds_list = [instance(study, series, InstanceNumber=n) for n in range(3)]
    for ds in ds_list:
        repos.instances.add_instance(ds, blob(ds.SOPInstanceUID), ELE)
    wanted = [ds.SOPInstanceUID for ds in ds_list] + [generate_uid() for _ in range(1500)]
    refs = repos.instances.instances_for(SR_, IMAGE, query(IMAGE, SOPInstanceUID=wanted))
    assert [r.sop_instance_uid for r in refs] == [ds.SOPInstanceUID for ds in ds_list]


# Peers and users ---------------------------------------------------------------------------------------
def test_peers(repos: Repositories) -> None:
    a = Peer("MODALITY", "10.0.0.0/8", None, frozenset({Service.STORE, Service.ECHO}))
    b = Peer("VIEWER", "viewer.example", 104, frozenset({Service.FIND, Service.MOVE, Service.GET}))
    repos.directory.add_peer(b)
    repos.directory.add_peer(a)
    with pytest.raises(ConflictError):
        repos.directory.add_peer(a)
    assert repos.directory.get_peer("MODALITY") == a
    assert repos.directory.get_peer("NOBODY") is None
    assert repos.directory.list_peers() == [a, b]
    repos.directory.remove_peer("MODALITY")
    with pytest.raises(NotFoundError):
        repos.directory.remove_peer("MODALITY")
    assert repos.directory.list_peers() == [b]


def test_get_peer_matches_the_sqlalchemy_reference(repos: Repositories) -> None:
    """get_peer's driver statement (SQLite) reads exactly what the SQLAlchemy statement reads, for
    every kind of peer, and sees a peer removed or changed on the very next call (nothing cached)."""
    repos.directory.add_user("reader", "$argon2id$hash", frozenset({"viewer"}))
    registered = [
        Peer("MODALITY", "10.0.0.0/8", None, frozenset({Service.STORE, Service.ECHO})),
        Peer("VIEWER", "viewer.example", 104, frozenset(Service), "reader"),
        Peer(
            "SECURE", "::1/128", 11112, frozenset({Service.FIND}), None,
            tls=TlsMode.REQUIRED, cert_sha256="ab" * 32, user_identity=UserIdentityMode.REQUIRED,
        ),
        Peer("NONE", "127.0.0.1/32", None, frozenset(), user_identity=UserIdentityMode.OPTIONAL),
    ]  # fmt: skip
    for peer in registered:
        repos.directory.add_peer(peer)
    for title in [p.ae_title for p in registered] + ["NOBODY", "", "modality", "MODALITY "]:
        assert repos.directory.get_peer(title) == repos.directory._peer_reference(title)
    assert [repos.directory.get_peer(p.ae_title) for p in registered] == registered
    repos.directory.remove_peer("VIEWER")
    assert repos.directory.get_peer("VIEWER") is None
    narrowed = Peer("VIEWER", "viewer.example", 104, frozenset({Service.ECHO}))
    repos.directory.add_peer(narrowed)
    assert repos.directory.get_peer("VIEWER") == narrowed == repos.directory._peer_reference("VIEWER")


def test_users(repos: Repositories) -> None:
    repos.directory.add_user(
        "admin", "$argon2id$hash", frozenset({"admin", "viewer"}), must_change_password=True
    )
    with pytest.raises(ConflictError):
        repos.directory.add_user("admin", "x", frozenset())
    assert repos.directory.get_user("admin") == UserRecord(
        "admin", "$argon2id$hash", frozenset({"admin", "viewer"}), False, True
    )
    assert repos.directory.get_user("nobody") is None
    repos.directory.update_user("admin", password_hash="new", must_change_password=False, disabled=True)
    assert repos.directory.get_user("admin") == UserRecord(
        "admin", "new", frozenset({"admin", "viewer"}), True, False
    )
    repos.directory.add_user("bob", "h", frozenset())
    assert [u.name for u in repos.directory.list_users()] == ["admin", "bob"]
    with pytest.raises(NotFoundError):
        repos.directory.update_user("nobody", disabled=True)


def test_tokens(repos: Repositories) -> None:
    import datetime as dt

    from safepacs.auth.tokens import check_token, issue_token

    repos.directory.add_user("alice", "h", frozenset({"radiologist"}))
    issued = issue_token("alice", dt.timedelta(days=1), frozenset({"find"}))
    repos.directory.add_token(issued.record)
    assert repos.directory.get_token(issued.record.token_id) == issued.record
    assert check_token(issued.token, repos.directory.get_token, repos.directory.get_user) is not None
    assert [t.token_id for t in repos.directory.list_tokens("alice")] == [issued.record.token_id]
    assert repos.directory.list_tokens("bob") == []
    with pytest.raises(NotFoundError):
        repos.directory.add_token(issue_token("bob", dt.timedelta(days=1)).record)
    repos.directory.revoke_token(issued.record.token_id)
    repos.directory.revoke_token(issued.record.token_id)  # revoking twice is harmless
    revoked = repos.directory.get_token(issued.record.token_id)
    assert revoked is not None and revoked.revoked_at is not None
    assert check_token(issued.token, repos.directory.get_token, repos.directory.get_user) is None
    with pytest.raises(NotFoundError):
        repos.directory.revoke_token("0000000000000000")
    later = issue_token("alice", dt.timedelta(hours=1))
    repos.directory.add_token(later.record)
    assert (
        check_token(
            later.token, repos.directory.get_token, repos.directory.get_user, now=later.record.expires_at
        )
        is None
    )


def test_token_holder_agrees_with_token_and_user(repos: Repositories) -> None:
    """Differential: the one-statement lookup a request makes (``get_token_holder``) gives what the token
    and user lookups give, for every way a token is refused and for a scoped user, and sees a revocation,
    a disabled user, and a changed scope on the very next check (nothing is cached)."""
    import datetime as dt

    from safepacs.auth.tokens import check_token, check_token_holder, issue_token
    from safepacs.types import Scope

    def both(token: str, now: dt.datetime | None = None) -> Any:
        slow = check_token(token, repos.directory.get_token, repos.directory.get_user, now=now)
        fast = check_token_holder(token, repos.directory.get_token_holder, now=now)
        assert fast == slow
        return fast

    repos.directory.add_user("alice", "h", frozenset({"radiologist"}))
    repos.directory.add_user("bob", "h", frozenset({"referrer"}))
    alice = issue_token("alice", dt.timedelta(days=1), frozenset({"find"}))
    bob = issue_token("bob", dt.timedelta(days=1))
    repos.directory.add_token(alice.record)
    repos.directory.add_token(bob.record)
    found = both(alice.token)
    assert found is not None and found[1].name == "alice" and found[0].scopes == frozenset({"find"})
    assert repos.directory.get_token_holder(alice.record.token_id) == (
        repos.directory.get_token(alice.record.token_id),
        repos.directory.get_user("alice"),
    )
    assert repos.directory.get_token_holder("0000000000000000") is None
    assert both("spat_0000000000000000_" + "A" * 43) is None  # unknown id
    assert both(alice.token[:-1] + ("B" if alice.token[-1] != "B" else "C")) is None  # wrong secret
    assert both("spat_" + alice.record.token_id) is None  # malformed
    assert both(alice.token, now=alice.record.expires_at) is None  # expired
    repos.directory.set_user_scope("alice", Scope(modalities=frozenset({"CT"})))
    found = both(alice.token)
    assert found is not None and found[1].scope == Scope(modalities=frozenset({"CT"}))
    repos.directory.set_user_scope("alice", None)
    found = both(alice.token)
    assert found is not None and found[1].scope is None
    repos.directory.update_user("alice", disabled=True)
    assert both(alice.token) is None  # a disabled user's token at once
    repos.directory.update_user("alice", disabled=False)
    assert both(alice.token) is not None
    repos.directory.revoke_token(alice.record.token_id)
    assert both(alice.token) is None  # a revoked token at once
    assert both(bob.token) is not None


# Concurrency -------------------------------------------------------------------------------------------
def _writer(url: str, study: str, series: str, worker: int, count: int) -> None:
    repos = open_repositories(url)
    try:
        for n in range(count):
            # Both workers create the same patient and study and their own series, interleaved.
            ds = instance(study, series, PatientID="SHARED", PatientName=f"W{worker}", InstanceNumber=n)
            repos.instances.add_instance(ds, blob(f"{worker}-{n}"), ELE)
    finally:
        repos.close()


def test_two_processes_write_concurrently(repos: Repositories, db_url: str) -> None:
    study = generate_uid()
    count = 40
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db_url, study, generate_uid(), w, count)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert repos.instances.count_instances() == 2 * count
    (row,) = find(repos, SR_, STUDY, StudyInstanceUID=study, NumberOfStudyRelatedSeries="")
    assert row.NumberOfStudyRelatedSeries == 2
    assert len(find(repos, PR, PATIENT, PatientID="SHARED")) == 1


def _indexed_keys() -> list[tuple[int, str]]:
    from safepacs.dicom import attributes as A

    keys = {(int(tag_for_keyword(a.keyword)), a.vr) for a in A.ATTRIBUTES if a.column is not None}
    keys |= {(int(tag_for_keyword(a.keyword)), a.vr) for s in A.SEQUENCES for a in s.items}
    return sorted(keys)


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize(
    ("vr", "values"), [("US", [0, 512, 65535]), ("SS", [-2, 7]), ("UL", [7, 4294967295]), ("SL", [-3, 9])]
)
def test_binary_integers_are_read_as_pydicom_reads_them(
    vr: str, values: list[int], little_endian: bool
) -> None:
    """US, SS, UL and SL values are decoded from their bytes; multi-valued, in either byte order."""
    from pydicom.values import convert_value

    from safepacs.db.write import _raw_text

    order = "little" if little_endian else "big"
    size = 2 if vr in ("US", "SS") else 4
    data = b"".join(v.to_bytes(size, order, signed=vr in ("SS", "SL")) for v in values)
    raw = RawDataElement(Tag(0x00280010), vr, len(data), data, 0, False, little_endian)
    expected = convert_value(vr, raw)
    assert _raw_text(raw, vr, "iso8859") == "\\".join(
        str(v) for v in (expected if isinstance(expected, list) else [expected])
    )
    assert _raw_text(raw._replace(value=data[:-1], length=len(data) - 1), vr, "iso8859") is None


def test_fast_text_reading_agrees_with_pydicom_on_every_test_file() -> None:
    """The index reads undecoded values itself; on every readable test file (all character sets of
    pydicom's charset files included) it gets what pydicom's own conversion gives."""
    import pydicom

    from safepacs.db.write import _converted_text, _encoding, _raw_text
    from tests.support.corpus import storable_files

    compared = 0
    for path in storable_files():
        header = pydicom.dcmread(path, stop_before_pixels=True)
        encoding = _encoding(header)
        for tag, vr in _indexed_keys():
            raw = header.get_item(tag)
            if not isinstance(raw, RawDataElement) or raw.VR not in (None, vr):
                continue
            fast = _raw_text(raw, vr, encoding)
            if fast is None:
                continue
            assert fast == _converted_text(header, tag), (path.name, hex(tag))
            compared += 1
    assert compared > 2000


def test_find_select_built_once_per_shape_is_the_statement_built_afresh() -> None:
    """Differential: the columns and FROM of a C-FIND are built once per (level, keys, scope) and reused;
    the whole statement (SQL and bound values, on both dialects) is the one built from nothing, for
    queries of every level with counts, sequences, scopes (a grantee's too), values and pages."""
    from dataclasses import replace

    import sqlalchemy.dialects.postgresql as pg
    import sqlalchemy.dialects.sqlite as sqlite_dialect

    from safepacs.db import sql
    from safepacs.dicom.matching import parse_identifier
    from safepacs.types import QueryModel, Scope

    def ident(level: str, **keys: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            ds.add(DataElement(tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword)), value))
        return ds

    shapes = [
        (QueryLevel.PATIENT, ident("PATIENT", PatientID="P1", NumberOfPatientRelatedStudies="",
                                   NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="")),
        (QueryLevel.STUDY, ident("STUDY", PatientID="P1", StudyInstanceUID="", ModalitiesInStudy="",
                                 NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")),
        (QueryLevel.STUDY, ident("STUDY", PatientID="P2", StudyInstanceUID="", ModalitiesInStudy="",
                                 NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")),
        (QueryLevel.STUDY, ident("STUDY", PatientName="DOE*", StudyDate="20200101-", StudyInstanceUID="")),
        (QueryLevel.SERIES, ident("SERIES", StudyInstanceUID="1.2.3", SeriesInstanceUID="", Modality="",
                                  NumberOfSeriesRelatedInstances="")),
        (QueryLevel.IMAGE, ident("IMAGE", SeriesInstanceUID="1.2.3.4", SOPInstanceUID="", InstanceNumber="")),
    ]  # fmt: skip
    scopes = [
        None,
        Scope(modalities=frozenset({"CT"})),
        Scope(groups=frozenset({"g"}), grantee="alice"),
        Scope(groups=frozenset({"g"}), grantee="bob"),
    ]

    def compiled(stmt: Any) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for dialect in (sqlite_dialect.dialect(), pg.dialect()):
            c = stmt.compile(dialect=dialect)
            out.append((str(c), dict(c.params)))
        return out

    cases = [
        (level, ds, scope, limit, offset)
        for level, ds in shapes
        for scope in scopes
        for limit, offset in ((None, 0), (10, 0), (10, 20))
    ]
    for _ in range(2):  # the second pass takes every head from the cache
        for level, ds, scope, limit, offset in cases:
            model = (
                QueryModel.PATIENT_ROOT
                if level in (QueryLevel.PATIENT, QueryLevel.STUDY)
                else QueryModel.STUDY_ROOT
            )
            query = replace(parse_identifier(model, level, ds), scope=scope)
            reused = compiled(sql.find_select(query, limit, offset))
            sql._find_head.cache_clear()
            fresh = compiled(sql.find_select(query, limit, offset))
            assert reused == fresh
            assert sql._find_head.cache_info().currsize == 1
        for level, ds, scope, limit, offset in cases:  # fill the cache for the next pass
            model = (
                QueryModel.PATIENT_ROOT
                if level in (QueryLevel.PATIENT, QueryLevel.STUDY)
                else QueryModel.STUDY_ROOT
            )
            sql.find_select(replace(parse_identifier(model, level, ds), scope=scope), limit, offset)
    # The patient-level counts count the studies the scope shows: a query gets the head of its own scope
    # (its grantee in each of the three counts and in the WHERE), not one cached for another principal.
    patient_query = parse_identifier(QueryModel.PATIENT_ROOT, QueryLevel.PATIENT, shapes[0][1])
    for first, second in ((scopes[3], scopes[2]), (scopes[2], scopes[3])):
        sql.find_select(replace(patient_query, scope=first), None)
        for _dialect_sql, params in compiled(sql.find_select(replace(patient_query, scope=second), None)):
            assert list(params.values()).count(second.grantee) == 4
            assert first.grantee not in params.values()
