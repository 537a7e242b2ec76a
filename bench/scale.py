"""Scale benchmark: C-FIND and QIDO-RS exact-key latency at 1,000,000 instances (and at 100,000 for
comparison), with the index on SQLite (the embedded default) and on PostgreSQL, in the same run.

    python bench/scale.py --workdir /tmp/spbench-scale           # fill once (~15 min), then measure
    python bench/scale.py --workdir /tmp/spbench-scale --queries 400

Corpus: ``--studies`` studies (default 100,000) of 10 instances each in 1-3 series (2 on average), 1.7
studies per patient, dates over ten years, eight modalities, names as in bench/dicomweb.py; the 100,000
instance index holds the first tenth of the same studies.  The index rows are written through the
index's own write path (:class:`safepacs.db.write.Writer`, the code ``add_instance`` runs) for the
first instance of every series, in transactions of 500 studies; the other instances of a series are
the same instance rows inserted many at a time (what ``Writer.add`` inserts for another instance of a
known series, whose study and series rows it leaves as they are).  The rows point at no stored object
(queries never read one).  Before the first measurement a sample of studies is sent through the real
ingest (``safepacs import`` of files built from the same values) and its rows compared column by column
with the filled ones, on both databases.

Servers: ``safepacs serve`` with default settings on each of the four indexes (SQLite and PostgreSQL x
100k and 1M instances), all running at once; queries go to the four in turn, in blocks of 25, so that
whatever else the machine does hits all alike.  C-FIND (Study Root, pynetdicom, one association per
server for every query, Nagle off): PatientID at STUDY level, StudyInstanceUID at SERIES level,
SeriesInstanceUID at IMAGE level.  QIDO-RS (httpx over HTTPS, one keep-alive connection per server,
bearer token of a ``radiologist`` made for the run): ``/studies?PatientID=``,
``/studies?StudyInstanceUID=``, ``/studies/{uid}/series``, ``/studies/{uid}/series/{uid}/instances``.
Every answer's set of UIDs is checked against the corpus.  PostgreSQL: a private database
``bench_scale`` (one schema per size), ANALYZEd after the fill; dropped at the end unless ``--workdir``
keeps it.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa
from _common import HOST, Receiver, free_port, git_revision, markdown_table, remove_tree, rich_table
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from rich.console import Console

from safepacs.app import open_repositories
from safepacs.db.schema import instances, patients, series, studies
from safepacs.db.write import InstanceRows, LevelRows, attribute_values
from safepacs.dicom import attributes as A
from safepacs.types import QueryLevel

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

SAFEPACS = [sys.executable, "-m", "safepacs"]
PG_ENV = "SAFEPACS_TEST_POSTGRES"
PG_DATABASE = "bench_scale"
BENCH_USER = "bench"
BENCH_AET = "BENCH"
CORPUS_VERSION = 1
PER_STUDY = 10  # instances per study
SERIES_CHOICES = (1, 2, 3)
SERIES_WEIGHTS = (0.25, 0.5, 0.25)
BATCH = 500  # studies per fill transaction
BLOCK = 25  # queries to one server before the next one's turn

SYLLABLES = ("BA", "DE", "FI", "GO", "HU", "KA", "LE", "MO", "NI", "PU",
             "RA", "SE", "TI", "VO", "ZU", "MA", "NE", "RO", "SU", "TA")  # fmt: skip
GIVEN = ("ANN", "BEN", "CARL", "DORA", "EVA", "FRED", "GINA", "HUGO",
         "IDA", "JON", "KIM", "LEA", "MAX", "NORA", "OLE", "PIA")  # fmt: skip
MODALITIES = (  # modality, SOP Class UID, share of the studies (as bench/dicomweb.py)
    ("CT", "1.2.840.10008.5.1.4.1.1.2", 0.30),
    ("MR", "1.2.840.10008.5.1.4.1.1.4", 0.20),
    ("CR", "1.2.840.10008.5.1.4.1.1.1", 0.18),
    ("US", "1.2.840.10008.5.1.4.1.1.6.1", 0.12),
    ("DX", "1.2.840.10008.5.1.4.1.1.1.1", 0.10),
    ("MG", "1.2.840.10008.5.1.4.1.1.1.2", 0.05),
    ("PT", "1.2.840.10008.5.1.4.1.1.128", 0.03),
    ("NM", "1.2.840.10008.5.1.4.1.1.20", 0.02),
)
FIRST_DAY = dt.date(2015, 1, 1)
DAYS = 3653
NEW_PATIENT = 0.6


# ------------------------------------------------------------------------------------------ corpus


@dataclass
class Corpus:
    """The studies, generated from the seed alone (nothing is stored but the filled indexes)."""

    seed: int
    count: int
    patient_of: np.ndarray  # study -> patient number
    patient_first: np.ndarray  # patient number -> index of its first study (its PatientID)
    name_parts: np.ndarray  # patient number -> (s1, s2, s3, given)
    birth: np.ndarray  # patient number -> days before FIRST_DAY
    sex: np.ndarray  # patient number -> 0..2
    modality: np.ndarray  # study -> index into MODALITIES
    day: np.ndarray  # study -> days after FIRST_DAY
    hour: np.ndarray
    minute: np.ndarray
    n_series: np.ndarray  # study -> 1..3

    @classmethod
    def make(cls, count: int, seed: int) -> Corpus:
        rng = np.random.default_rng(seed)
        new = rng.random(count) < NEW_PATIENT
        new[0] = True
        patient_of = np.cumsum(new) - 1
        patients_n = int(patient_of[-1]) + 1
        weights = np.array([m[2] for m in MODALITIES])
        return cls(
            seed,
            count,
            patient_of,
            np.flatnonzero(new),
            np.stack(
                [
                    *(rng.integers(0, len(SYLLABLES), patients_n) for _ in range(3)),
                    rng.integers(0, len(GIVEN), patients_n),
                ],
                axis=1,
            ),
            rng.integers(365 * 5, 365 * 90, patients_n),
            rng.integers(0, 3, patients_n),
            rng.choice(len(MODALITIES), count, p=weights / weights.sum()),
            rng.integers(0, DAYS, count),
            rng.integers(7, 20, count),
            rng.integers(0, 60, count),
            rng.choice(SERIES_CHOICES, count, p=SERIES_WEIGHTS),
        )

    def prefix(self, count: int) -> Corpus:
        """The first ``count`` studies (their patients' other studies beyond it left out)."""
        return Corpus(
            self.seed, count, self.patient_of[:count], self.patient_first, self.name_parts, self.birth,
            self.sex, self.modality[:count], self.day[:count], self.hour[:count], self.minute[:count],
            self.n_series[:count],
        )  # fmt: skip

    @property
    def instances(self) -> int:
        return self.count * PER_STUDY

    def study_uid(self, i: int) -> str:
        return f"{PYDICOM_ROOT_UID}{self.seed}.1.{i + 1}"

    def series_uid(self, i: int, j: int) -> str:
        return f"{PYDICOM_ROOT_UID}{self.seed}.2.{i + 1}.{j + 1}"

    def sop_uid(self, i: int, j: int, k: int) -> str:
        return f"{PYDICOM_ROOT_UID}{self.seed}.3.{i + 1}.{j + 1}.{k + 1}"

    def patient_id(self, i: int) -> str:
        return f"SP{int(self.patient_first[self.patient_of[i]]):08d}"

    def series_sizes(self, i: int) -> list[int]:
        n = int(self.n_series[i])
        return [PER_STUDY // n + (1 if j < PER_STUDY % n else 0) for j in range(n)]

    def texts(self, i: int) -> tuple[dict[str, str], list[dict[str, str]], dict[str, str]]:
        """Study ``i`` as DICOM text values: patient and study keys, each series' keys, and the keys its
        instances share (SOPInstanceUID and InstanceNumber come from :meth:`instance`)."""
        p = int(self.patient_of[i])
        s1, s2, s3, given = (int(v) for v in self.name_parts[p])
        modality, sop_class, _ = MODALITIES[int(self.modality[i])]
        date = (FIRST_DAY + dt.timedelta(days=int(self.day[i]))).strftime("%Y%m%d")
        time_ = f"{int(self.hour[i]):02d}{int(self.minute[i]):02d}00"
        top = {
            "PatientName": f"{SYLLABLES[s1]}{SYLLABLES[s2]}{SYLLABLES[s3]}^{GIVEN[given]}",
            "PatientID": self.patient_id(i),
            "PatientBirthDate": (FIRST_DAY - dt.timedelta(days=int(self.birth[p]))).strftime("%Y%m%d"),
            "PatientSex": "FMO"[int(self.sex[p])],
            "StudyInstanceUID": self.study_uid(i),
            "StudyDate": date,
            "StudyTime": time_,
            "AccessionNumber": f"A{i:09d}",
            "StudyID": str(i),
            "ReferringPhysicianName": "REFERRER^BENCH",
            "StudyDescription": f"{modality} BENCHMARK STUDY",
        }
        series_texts = [
            {
                "SeriesInstanceUID": self.series_uid(i, j),
                "Modality": modality,
                "SeriesNumber": str(j + 1),
                "SeriesDescription": f"SERIES {j + 1}",
                "SeriesDate": date,
                "SeriesTime": time_,
                "Manufacturer": "BENCH",
            }
            for j in range(int(self.n_series[i]))
        ]
        shared = {
            "SOPClassUID": sop_class,
            "Rows": "16",
            "Columns": "16",
            "BitsAllocated": "16",
            "PhotometricInterpretation": "MONOCHROME2",
        }
        return top, series_texts, shared

    def studies_of_patient(self, i: int) -> list[int]:
        """The studies (of this corpus) of study ``i``'s patient."""
        return [int(s) for s in np.flatnonzero(self.patient_of == self.patient_of[i])]


_LEVEL_ATTRS = {
    level: [a for a in A.ATTRIBUTES if a.level is level and a.column is not None] for level in QueryLevel
}


def level_rows(level: QueryLevel, texts: dict[str, str]) -> LevelRows:
    """What :func:`safepacs.db.write.read_header` reads for ``level`` from a header holding ``texts``
    (the fill's rows are compared with the real ingest's before any measurement)."""
    columns: dict[str, object] = {}
    present: dict[str, object] = {}
    for attr in _LEVEL_ATTRS[level]:
        text = texts.get(attr.keyword) or None
        values = attribute_values(attr, text)
        columns.update(values)
        if text:
            present.update(values)
    return LevelRows(columns, present, {})


def instance_values(sop_uid: str) -> dict[str, object]:
    """The instance columns that do not come from the header: a stored object that is not there."""
    digest = hashlib.sha256(sop_uid.encode()).hexdigest()
    return {
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "blob_id": f"bench-{sop_uid}",
        "key_id": "bench",
        "sha256": digest,
        "size": 1500,
        "seal_tag": digest[:32],
    }


def dataset(corpus: Corpus, i: int, j: int, k: int) -> Dataset:
    """Instance (i, j, k) as a Part 10 data set: what the fill indexes, for the ingest comparison."""
    top, series_texts, shared = corpus.texts(i)
    sop_uid = corpus.sop_uid(i, j, k)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = shared["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    for texts in (top, series_texts[j], shared):
        for keyword, value in texts.items():
            setattr(ds, keyword, int(value) if keyword in {"Rows", "Columns", "BitsAllocated"} else value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.SamplesPerPixel = 1
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256, dtype=np.uint16) * 16).tobytes()
    return ds


# -------------------------------------------------------------------------------------------- fill


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def fill(url: str, corpus: Corpus, start: int = 0) -> float:
    """Write the index rows of studies ``start..corpus.count`` into the (migrated) index at ``url``;
    the seconds it took."""
    repos = open_repositories(url)
    writer = repos.instances._instance_writer  # the write path add_instance runs, in batches
    engine = repos.db._writer  # BEGIN IMMEDIATE on SQLite
    insert = sa.insert(instances)
    t0 = time.perf_counter()
    last = t0
    try:
        for batch in range(start, corpus.count, BATCH):
            rest: list[dict[str, object]] = []
            with engine.begin() as conn:
                firsts: list[str] = []
                now = _now()
                for i in range(batch, min(corpus.count, batch + BATCH)):
                    top, series_texts, shared = corpus.texts(i)
                    patient = level_rows(QueryLevel.PATIENT, top)
                    study = level_rows(QueryLevel.STUDY, top)
                    image = level_rows(QueryLevel.IMAGE, shared)
                    study_uid, pid = top["StudyInstanceUID"], top["PatientID"]
                    for j, size in enumerate(corpus.series_sizes(i)):
                        se = level_rows(QueryLevel.SERIES, series_texts[j])
                        for k in range(size):
                            sop_uid = corpus.sop_uid(i, j, k)
                            columns = {**image.columns, "sop_instance_uid": sop_uid, "instance_number": k + 1}
                            if k == 0:  # the whole write path: patient, study, series and instance rows
                                rows = InstanceRows(
                                    {
                                        QueryLevel.PATIENT: patient,
                                        QueryLevel.STUDY: study,
                                        QueryLevel.SERIES: se,
                                        QueryLevel.IMAGE: LevelRows(columns, columns, {}),
                                    },
                                    study_uid,
                                    series_texts[j]["SeriesInstanceUID"],
                                    sop_uid,
                                    (pid, "", ""),
                                )
                                writer.add(conn, rows, instance_values(sop_uid), now, replace=False)
                                firsts.append(series_texts[j]["SeriesInstanceUID"])
                            else:  # another instance of a known series: Writer.add's instance row
                                row = {**columns, **instance_values(sop_uid), "_series": series_texts[j]}
                                rest.append(row)
                keys = {
                    uid: (se_pk, st_pk)
                    for uid, se_pk, st_pk in conn.execute(
                        sa.select(series.c.series_instance_uid, series.c.pk, series.c.study_pk).where(
                            series.c.series_instance_uid.in_(firsts)
                        )
                    )
                }
                for row in rest:
                    se_pk, st_pk = keys[row.pop("_series")["SeriesInstanceUID"]]  # type: ignore[index]
                    row.update(series_pk=se_pk, study_pk=st_pk, created_at=now, updated_at=now)
                if rest:
                    conn.execute(insert, rest)
            if time.perf_counter() - last > 15:
                last = time.perf_counter()
                done = (min(corpus.count, batch + BATCH) - start) * PER_STUDY
                console.print(f"  ... {done:,} instances, {done / (last - t0):,.0f}/s")
    finally:
        repos.close()
    return time.perf_counter() - t0


def copy_to_postgres(sqlite_file: Path, url: str) -> float:
    """Copy the patient, study, series and instance rows of a filled SQLite index into the (migrated,
    empty) PostgreSQL index at ``url`` with ``COPY``, keys and timestamps included; the seconds it took.

    Writing them through ``Writer.add`` on PostgreSQL costs ~6 round trips per series (~1 M statements
    for the 1M corpus, ~20 min here); the copied rows are the ones SQLite's write path made, and the
    comparison with the real ingest checks them on PostgreSQL too."""
    t0 = time.perf_counter()
    source = sqlite3.connect(f"file:{sqlite_file}?mode=ro", uri=True)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for table in (patients, studies, series, instances):
                names = [c.name for c in table.c]
                stamps = [n for n, name in enumerate(names) if name in {"created_at", "updated_at"}]
                with cursor.copy(f"COPY {table.name} ({', '.join(names)}) FROM STDIN") as copy:
                    for row in source.execute(f"SELECT {', '.join(names)} FROM {table.name} ORDER BY pk"):  # noqa: S608
                        values = list(row)
                        for n in stamps:  # SQLAlchemy keeps SQLite's timestamps as UTC text
                            values[n] = f"{values[n]}+00"
                        copy.write_row(values)
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table.name}', 'pk'),"  # noqa: S608
                    f" (SELECT max(pk) FROM {table.name}))"
                )
            for name in ("patients", "studies", "series", "instances"):
                count = source.execute(f"SELECT count(*) FROM {name}").fetchone()[0]  # noqa: S608
                copied = conn.exec_driver_sql(f"SELECT count(*) FROM {name}").scalar()  # noqa: S608
                if count != copied:
                    raise RuntimeError(f"{name}: {copied} rows copied of {count}")
    finally:
        source.close()
        engine.dispose()
    return time.perf_counter() - t0


def pg_url(base: str, schema: str) -> str:
    return (
        sa.make_url(base)
        .set(database=PG_DATABASE)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


def pg_admin(base: str, sql: str, database: str = "postgres") -> None:
    engine = sa.create_engine(sa.make_url(base).set(database=database), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


def pg_database_exists(base: str) -> bool:
    engine = sa.create_engine(sa.make_url(base).set(database="postgres"))
    try:
        with engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": PG_DATABASE}
                ).first()
            )
    finally:
        engine.dispose()


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*SAFEPACS, *argv], capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"safepacs {' '.join(argv[:2])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return done.stdout


@dataclass
class Target:
    """One data directory and its index: SQLite in the directory, or a PostgreSQL schema."""

    backend: str  # "SQLite" | "PostgreSQL"
    corpus: Corpus
    data: Path
    index_url: str
    fill_seconds: float = 0.0
    reused: bool = False

    @property
    def label(self) -> str:
        return f"{self.backend}, {self.corpus.instances:,}"

    @property
    def env(self) -> dict[str, str]:
        return {"SAFEPACS_INDEX__URL": self.index_url} if self.backend == "PostgreSQL" else {}

    @property
    def schema(self) -> str:
        """The PostgreSQL schema of the index (its URL's search_path)."""
        return str(sa.make_url(self.index_url).query["options"]).split("=", 1)[1]

    @property
    def marker(self) -> Path:
        return self.data.parent / f"{self.data.name}.filled.json"

    def spec(self) -> dict[str, object]:
        return {"version": CORPUS_VERSION, "seed": self.corpus.seed, "studies": self.corpus.count}

    def prepare(self, reload: bool, source: Path | None = None) -> None:
        if not reload and self.marker.exists():
            saved = json.loads(self.marker.read_text())
            if saved.get("spec") == self.spec():
                self.fill_seconds, self.reused = float(saved["seconds"]), True
                console.print(f"{self.label}: reusing {self.data} (filled in {self.fill_seconds:.0f} s)")
                return
        remove_tree(self.data)
        self.marker.unlink(missing_ok=True)
        if self.backend == "PostgreSQL":
            pg_admin(self.index_url, f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE', PG_DATABASE)
            pg_admin(self.index_url, f'CREATE SCHEMA "{self.schema}"', PG_DATABASE)
        run(["init", "--data", str(self.data)], self.env)
        run(["user", "add", BENCH_USER, "--role", "radiologist", "--data", str(self.data)], self.env)
        run(
            ["peer", "add", BENCH_AET, "--host", HOST, "--allow", "echo,find", "--tls", "off",
             "--user", BENCH_USER, "--data", str(self.data)],
            self.env,
        )  # fmt: skip
        console.print(f"{self.label}: filling ...")
        note = ""
        if self.backend == "SQLite":
            self.fill_seconds = fill(f"sqlite:///{self.data / 'index.sqlite3'}", self.corpus)
        else:
            scratch = None
            if source is None:  # no SQLite index of this corpus: fill one to copy from
                scratch = Path(tempfile.mkdtemp(prefix="fill-", dir=self.data.parent))
                run(["init", "--data", str(scratch / "data")])
                source = scratch / "data" / "index.sqlite3"
                filled = fill(f"sqlite:///{source}", self.corpus)
                note = f"SQLite fill {filled:.0f} s, "
            try:
                copied = copy_to_postgres(source, self.index_url)
            finally:
                if scratch is not None:
                    remove_tree(scratch)
            t0 = time.perf_counter()
            # autovacuum would, some time later: the plans need the statistics (and the visibility map)
            engine = sa.create_engine(self.index_url, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
            engine.dispose()
            analyzed = time.perf_counter() - t0
            self.fill_seconds = copied + analyzed
            note += f"COPY from SQLite {copied:.0f} s, VACUUM ANALYZE {analyzed:.0f} s, "
        console.print(
            f"{self.label}: filled in {self.fill_seconds:.0f} s"
            f" ({note}{self.corpus.instances / self.fill_seconds:,.0f} instances/s)"
        )
        self.marker.write_text(json.dumps({"spec": self.spec(), "seconds": self.fill_seconds}))


# -------------------------------------------------------------------------- comparison with ingest

_SKIP = {"pk", "patient_pk", "study_pk", "series_pk", "created_at", "updated_at"}
_OBJECT = {"blob_id", "key_id", "sha256", "size", "seal_tag"}


def _rows(url: str, sop_uids: list[str]) -> dict[str, dict[str, dict[str, object]]]:
    """Each instance's rows (instance, series, study, patient), without keys and timestamps."""
    engine = sa.create_engine(url)
    out: dict[str, dict[str, dict[str, object]]] = {}
    try:
        with engine.connect() as conn:
            stmt = (
                sa.select(instances, series, studies, patients)
                .select_from(
                    instances.join(series, instances.c.series_pk == series.c.pk)
                    .join(studies, series.c.study_pk == studies.c.pk)
                    .join(patients, studies.c.patient_pk == patients.c.pk)
                )
                .where(instances.c.sop_instance_uid.in_(sop_uids))
            )
            for row in conn.execute(stmt):
                values = list(row)
                record: dict[str, dict[str, object]] = {}
                n = 0
                for table in (instances, series, studies, patients):
                    names = [c.name for c in table.c]
                    record[table.name] = {
                        k: v
                        for k, v in zip(names, values[n : n + len(names)], strict=True)
                        if k not in _SKIP and k not in _OBJECT
                    }
                    n += len(names)
                out[str(record["instances"]["sop_instance_uid"])] = record
    finally:
        engine.dispose()
    return out


def compare_with_ingest(corpus: Corpus, targets: list[Target], workdir: Path, sample: int) -> list[str]:
    """Ingest ``sample`` studies' files with ``safepacs import`` into a fresh data directory and compare
    their rows with the filled ones of every target; the differences found."""
    smallest = min(t.corpus.count for t in targets)
    picks = sorted({int(v) for v in np.random.default_rng(7).integers(0, smallest, sample)} | {0})
    root = Path(tempfile.mkdtemp(prefix="ingest-", dir=workdir))
    try:
        files = root / "files"
        files.mkdir()
        sop_uids = []
        for i in picks:
            for j, size in enumerate(corpus.series_sizes(i)):
                for k in range(size):
                    ds = dataset(corpus, i, j, k)
                    ds.save_as(files / f"{i}-{j}-{k}.dcm", enforce_file_format=True)
                    sop_uids.append(corpus.sop_uid(i, j, k))
        run(["init", "--data", str(root / "data")])
        run(["import", "--data", str(root / "data"), str(files)])
        reference = _rows(f"sqlite:///{root / 'data' / 'index.sqlite3'}", sop_uids)
        problems = []
        if len(reference) != len(sop_uids):
            problems.append(f"ingest indexed {len(reference)} of {len(sop_uids)} instances")
        for target in targets:
            url = (
                target.index_url
                if target.backend == "PostgreSQL"
                else f"sqlite:///{target.data / 'index.sqlite3'}"
            )
            filled = _rows(url, sop_uids)
            for uid, want in reference.items():
                got = filled.get(uid)
                if got != want:
                    diff = (
                        "missing"
                        if got is None
                        else {
                            f"{t}.{c}": (got[t].get(c), v)
                            for t, cols in want.items()
                            for c, v in cols.items()
                            if got[t].get(c) != v
                        }
                    )
                    problems.append(f"{target.label}: {uid}: {diff}")
        return problems
    finally:
        remove_tree(root)


# ---------------------------------------------------------------------------------------- servers


class Server(Receiver):
    """``safepacs serve`` with default settings on a filled data directory."""

    http_port: int = 0
    data: Path = Path()

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        argv = [
            *SAFEPACS, "serve", "--data", str(self.data), "--dicom-port", str(self.port),
            "--http-port", str(self.http_port), "--dicom-tls-port", str(free_port()),
        ]  # fmt: skip
        self._spawn(argv, env={**os.environ, **self.env})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc is not None and self.log_path is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            text = self.log_path.read_text(errors="replace")
            if "listening for HTTPS" in text and "listening for DICOM on" in text:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after 180 s:\n{self.log_tail()}")

    def http(self, token: str) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.data / "keys" / "ca.pem"))
        return httpx.Client(
            base_url=f"https://{HOST}:{self.http_port}/dicomweb",
            verify=context,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/dicom+json",
                "Accept-Encoding": "identity",
            },
            timeout=60,
        )


class FindClient:
    """One association (Study Root C-FIND) for every query to one server, Nagle off."""

    def __init__(self, port: int) -> None:
        self.ae = AE(ae_title=BENCH_AET)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        self.assoc = self.ae.associate(HOST, port, ae_title="SAFEPACS")
        if not self.assoc.is_established:
            raise RuntimeError("the C-FIND association was not accepted")
        sock = getattr(self.assoc.dul.socket, "socket", None)
        if sock is not None:  # else each query waits for a delayed ACK (40 ms) on loopback
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rescued = 0
        serve = self.assoc._serve_request

        def put_back(msg: Any, context_id: int) -> None:
            """pynetdicom's association thread can take the first C-FIND-RSP off the queue before
            ``send_c_find`` waits for it (its pause of that thread is racy: pydicom/pynetdicom#875) and
            drop it as an unexpected message; ~0.3% of queries here lost their first match that way,
            with DCMTK findscu none in 3,000.  Such a response goes back to the front of the queue."""
            if msg.is_valid_request:
                serve(msg, context_id)
                return
            queue = self.assoc.dimse.msg_queue
            with queue.mutex:
                queue.queue.appendleft((context_id, msg))
                queue.not_empty.notify()
            self.rescued += 1

        self.assoc._serve_request = put_back  # type: ignore[method-assign]

    def find(self, level: str, key: str, value: str, answer: str) -> list[str] | str:
        """The ``answer`` UIDs of every match, or an error."""
        ident = Dataset()
        ident.QueryRetrieveLevel = level
        setattr(ident, key, value)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if keyword not in ident:
                setattr(ident, keyword, "")
        got: list[str] = []
        for status, identifier in self.assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                return "no response"
            if status.Status in (0xFF00, 0xFF01):
                got.append(str(identifier.get(answer, "")))
            elif status.Status != 0:
                return f"status {int(status.Status):#06x}"
        return got

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.assoc.release()
        self.ae.shutdown()


# ---------------------------------------------------------------------------------------- queries


@dataclass
class Query:
    study: int  # the corpus study it is about
    series: int  # its series index (SERIES/IMAGE queries)


KINDS = {
    "find-study": "C-FIND STUDY, PatientID",
    "find-series": "C-FIND SERIES, StudyInstanceUID",
    "find-image": "C-FIND IMAGE, SeriesInstanceUID",
    "qido-patient": "QIDO /studies?PatientID",
    "qido-study": "QIDO /studies?StudyInstanceUID",
    "qido-series": "QIDO /studies/{uid}/series",
    "qido-instances": "QIDO /studies/{uid}/series/{uid}/instances",
}


def expected(kind: str, corpus: Corpus, q: Query) -> list[str]:
    i, j = q.study, q.series
    if kind in {"find-study", "qido-patient"}:
        return sorted(corpus.study_uid(s) for s in corpus.studies_of_patient(i))
    if kind == "qido-study":
        return [corpus.study_uid(i)]
    if kind in {"find-series", "qido-series"}:
        return sorted(corpus.series_uid(i, s) for s in range(int(corpus.n_series[i])))
    return sorted(corpus.sop_uid(i, j, k) for k in range(corpus.series_sizes(i)[j]))


def _json_uids(body: list[dict[str, Any]], tag: str) -> list[str]:
    return [str(item.get(tag, {}).get("Value", [""])[0]) for item in body]


RECONNECTS = [0]  # GETs sent again on a new connection (see ask)


def ask(kind: str, corpus: Corpus, q: Query, finder: FindClient, web: httpx.Client) -> list[str] | str:
    i, j = q.study, q.series
    study, series_uid = corpus.study_uid(i), corpus.series_uid(i, j)
    if kind == "find-study":
        return finder.find("STUDY", "PatientID", corpus.patient_id(i), "StudyInstanceUID")
    if kind == "find-series":
        return finder.find("SERIES", "StudyInstanceUID", study, "SeriesInstanceUID")
    if kind == "find-image":
        ident = finder.find("IMAGE", "SeriesInstanceUID", series_uid, "SOPInstanceUID")
        return ident
    if kind == "qido-patient":
        path, params, tag = "/studies", {"PatientID": corpus.patient_id(i)}, "0020000D"
    elif kind == "qido-study":
        path, params, tag = "/studies", {"StudyInstanceUID": study}, "0020000D"
    elif kind == "qido-series":
        path, params, tag = f"/studies/{study}/series", {}, "0020000E"
    else:
        path, params, tag = f"/studies/{study}/series/{series_uid}/instances", {}, "00080018"
    try:
        response = web.get(path, params=params)
    except (httpx.RemoteProtocolError, httpx.ConnectError):
        # The server closes a keep-alive connection idle for 5 s (uvicorn's timeout_keep_alive); on a
        # busy machine the three other servers' turn can last that long, and a request sent just as it
        # closes finds no answer.  A browser resends such a GET on a new connection; so do we (timed).
        RECONNECTS[0] += 1
        response = web.get(path, params=params)
    if response.status_code == 204:
        return []
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    return _json_uids(response.json(), tag)


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    cpu: float = 0.0
    results: int = 0
    wrong: list[str] = field(default_factory=list)


def measure(
    kinds: list[str],
    targets: list[Target],
    servers: dict[str, Server],
    finders: dict[str, FindClient],
    webs: dict[str, httpx.Client],
    queries: int,
    warmup: int,
    seed: int,
) -> dict[tuple[str, str], Samples]:
    out: dict[tuple[str, str], Samples] = {}
    for kind in kinds:
        rng = np.random.default_rng([seed, list(KINDS).index(kind)])
        # the same picks for every target of a size; a pick of the 100k corpus is in the 1M one too
        smallest = min(t.corpus.count for t in targets)
        picks: dict[str, list[Query]] = {}
        for t in targets:
            # half of the queries in the first 10% of the studies (in both sizes), half anywhere in it
            studies_ = [
                int(rng.integers(0, smallest)) if n % 2 else int(rng.integers(0, t.corpus.count))
                for n in range(warmup + queries)
            ]
            picks[t.label] = [Query(s, int(rng.integers(0, int(t.corpus.n_series[s])))) for s in studies_]
        for t in targets:
            for q in picks[t.label][:warmup]:
                ask(kind, t.corpus, q, finders[t.label], webs[t.label])
            out[(kind, t.label)] = Samples()
        for start in range(warmup, warmup + queries, BLOCK):
            for t in targets:
                s, server = out[(kind, t.label)], servers[t.label]
                cpu = server.cpu_seconds()
                for q in picks[t.label][start : start + BLOCK]:
                    t0 = time.perf_counter()
                    got = ask(kind, t.corpus, q, finders[t.label], webs[t.label])
                    s.seconds.append(time.perf_counter() - t0)
                    want = expected(kind, t.corpus, q)
                    if isinstance(got, str) or sorted(got) != want:
                        answer = got if isinstance(got, str) else f"{len(got)} results"
                        s.wrong.append(f"study {q.study}: {answer}, expected {len(want)}")
                    else:
                        s.results += len(got)
                s.cpu += server.cpu_seconds() - cpu
        for t in targets:
            s = out[(kind, t.label)]
            console.print(
                f"{KINDS[kind]:>45} {t.label:>22}: median {_ms(statistics.median(s.seconds))},"
                f" p99 {_ms(_pct(s.seconds, 99))} ms"
                + (f", [red]{len(s.wrong)} wrong[/red]" if s.wrong else "")
            )
            for line in s.wrong[:3]:
                console.print(f"    {line}", markup=False)
    return out


def _pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


HEADERS = [
    "query",
    "index",
    "instances",
    "n",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "results/q",
    "srv CPU ms/q",
    "target",
    "check",
]


def table_rows(results: dict[tuple[str, str], Samples], targets: list[Target]) -> list[list[str]]:
    rows = []
    for kind, title in KINDS.items():
        for t in targets:
            s = results.get((kind, t.label))
            if s is None:
                continue
            n = len(s.seconds)
            p50, p99 = statistics.median(s.seconds), _pct(s.seconds, 99)
            ok = not s.wrong
            rows.append(
                [
                    title, t.backend, f"{t.corpus.instances:,}", str(n), _ms(p50), _ms(_pct(s.seconds, 95)),
                    _ms(p99), f"{s.results / max(1, n - len(s.wrong)):.1f}", f"{s.cpu / n * 1000:.2f}",
                    "yes" if ok and p50 < 0.010 and p99 < 0.100 else "NO",
                    "ok" if ok else f"FAILED ({len(s.wrong)} wrong)",
                ]
            )  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="keep the data directories (and PostgreSQL database) here")
    p.add_argument("--studies", type=int, default=100_000, help="studies of the large index (x10 instances)")
    p.add_argument("--small", type=int, default=0, help="studies of the small index (default studies/10)")
    p.add_argument("--pg-url", default=os.environ.get(PG_ENV), help=f"PostgreSQL server URL (${PG_ENV})")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--queries", type=int, default=200, help="timed queries per kind and index (default 200)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ",".join(KINDS))
    p.add_argument("--sample", type=int, default=5, help="studies compared with the real ingest (default 5)")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--reload", action="store_true", help="fill again even if --workdir holds the fill")
    p.add_argument("--fill-only", action="store_true")
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    args.small = args.small or max(1, args.studies // 10)
    args.kinds = [k for k in args.kinds.split(",") if k]
    for kind in args.kinds:
        if kind not in KINDS:
            p.error(f"unknown kind {kind!r}")
    args.backends = [b for b in args.backends.split(",") if b]
    if "postgresql" in args.backends and not args.pg_url:
        console.print(f"no PostgreSQL URL (--pg-url or ${PG_ENV}): SQLite only")
        args.backends.remove("postgresql")
    return args


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # a stop signal unwinds like Ctrl-C: servers and temp dirs are cleaned up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-scale-")) if own else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    created_pg = False
    signal.signal(signal.SIGTERM, _interrupt)
    targets: list[Target] = []
    try:
        big = Corpus.make(args.studies, args.seed)
        corpora = [big.prefix(args.small), big] if args.small < args.studies else [big]
        if "postgresql" in args.backends and not pg_database_exists(args.pg_url):
            pg_admin(args.pg_url, f'CREATE DATABASE "{PG_DATABASE}"')
            created_pg = True
        for backend in args.backends:
            for c in corpora:
                name = f"{backend}-{c.count}-seed{c.seed}"
                if backend == "sqlite":
                    targets.append(Target("SQLite", c, workdir / name, ""))
                else:
                    targets.append(
                        Target("PostgreSQL", c, workdir / name, pg_url(args.pg_url, f"s{c.count}_{c.seed}"))
                    )
        targets.sort(key=lambda t: t.backend != "SQLite")
        for t in targets:  # SQLite first: PostgreSQL copies the rows of the same corpus from it
            same = [s for s in targets if s.backend == "SQLite" and s.corpus.count == t.corpus.count]
            t.prepare(
                args.reload, same[0].data / "index.sqlite3" if same and t.backend == "PostgreSQL" else None
            )
        problems = compare_with_ingest(big, targets, workdir, args.sample)
        if problems:
            for line in problems[:20]:
                console.print(f"[red]rows differ from ingest's[/red]: {line}", markup=True)
            return 1
        console.print(f"rows of {args.sample + 1} studies compared with `safepacs import`'s: identical")
        if args.fill_only:
            return 0
        servers: dict[str, Server] = {}
        finders: dict[str, FindClient] = {}
        webs: dict[str, httpx.Client] = {}
        revision = git_revision()
        load_before = os.getloadavg()
        with contextlib.ExitStack() as stack:
            for t in targets:
                token = run(
                    ["token", "create", "--user", BENCH_USER, "--expires", "1d", "--data", str(t.data)], t.env
                ).strip()
                server = Server(name=f"serve-{t.data.name}", aet="SAFEPACS", workdir=workdir, env=t.env)
                server.data = t.data
                stack.callback(server.stop)
                server.start()
                servers[t.label] = server
                webs[t.label] = stack.enter_context(server.http(token))
            for server in servers.values():
                server.wait_idle()
            for t in targets:
                finders[t.label] = FindClient(servers[t.label].port)
                stack.callback(finders[t.label].close)
            results = measure(
                args.kinds, targets, servers, finders, webs, args.queries, args.warmup, args.seed
            )
            rescued = sum(f.rescued for f in finders.values())
        load_after = os.getloadavg()
        command = shlex.join(["python", "bench/scale.py", *(sys.argv[1:] if argv is None else argv)])
        fills = "; ".join(
            f"{t.label}: {t.fill_seconds:.0f} s ({t.corpus.instances / t.fill_seconds:,.0f}/s)"
            for t in targets
        )
        context = (
            f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs ({platform.machine()}), load average"
            f" {load_before[0]:.1f} before / {load_after[0]:.1f} after, SafePACS{revision}; `{command}`,"
            f" {(time.perf_counter() - started) / 60:.0f} min in all. Fill times: {fills}. C-FIND responses"
            f" pynetdicom's own thread took and the client put back (pydicom/pynetdicom#875): {rescued};"
            f" QIDO-RS requests resent after an idle keep-alive close: {RECONNECTS[0]}"
        )
        title = (
            "Exact-key C-FIND (one association per server) and QIDO-RS (one keep-alive HTTPS connection),"
            f" {args.queries} per kind and index after {args.warmup} untimed;"
            " target p50 < 10 ms, p99 < 100 ms"
        )
        rows = table_rows(results, targets)
        console.print()
        console.print(context, markup=False)
        console.print(rich_table(rows, title, HEADERS))
        if args.markdown:
            args.markdown.write_text(f"{context}\n\n{markdown_table(rows, title, HEADERS)}")
        return 0 if all(r[-1] == "ok" for r in rows) else 1
    finally:
        if own:
            remove_tree(workdir)
            with contextlib.suppress(Exception):
                if created_pg:
                    pg_admin(args.pg_url, f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)')
                else:  # a database a --workdir run keeps: only the schemas this run made
                    for t in targets:
                        if t.backend == "PostgreSQL":
                            pg_admin(t.index_url, f'DROP SCHEMA IF EXISTS "{t.schema}" CASCADE', PG_DATABASE)


if __name__ == "__main__":
    sys.exit(main())
