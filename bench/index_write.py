"""Index write micro-benchmark: ``SqlInstances.add_instance`` alone, ms per insert.

    .venv/bin/python bench/index_write.py                        # SQLite on disk and on tmpfs
    .venv/bin/python bench/index_write.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/index_write.py --profile sqlite-tmpfs  # cProfile of one target

Inserts ``--count`` instances (``--studies`` studies of one series each, one patient per study) into a
fresh database: SQLite files (WAL, synchronous=FULL) on disk and on tmpfs (where fsync costs nothing),
and PostgreSQL when ``--postgres`` or SAFEPACS_TEST_POSTGRES names a server (in a schema of its own,
dropped afterwards).  Headers are CT headers encoded and read back with pydicom beforehand, so their
elements are undecoded as in ingest; only ``add_instance`` is timed.  "work" is the time before the
commit starts (statements and header reading), measured with the engine's ``commit`` event.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import sqlalchemy as sa
from _common import ct_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from rich.console import Console
from rich.table import Table
from sqlalchemy import event

from safepacs.app import open_repositories
from safepacs.db.database import migrate
from safepacs.types import StoredBlob

PG_ENV = "SAFEPACS_TEST_POSTGRES"
_RNG = np.random.default_rng(1)


def _header(patient: int, study: str, series: str, number: int) -> bytes:
    """A 64x64 CT instance as Part 10 bytes (the same header as the ingest benchmark's corpus)."""
    ds = ct_dataset(
        _RNG,
        rows=64,
        cols=64,
        patient=patient,
        study_uid=study,
        series_uid=series,
        frame_uid=study,
        number=number,
    )
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def corpus(count: int, studies: int) -> list[bytes]:
    per_study = max(1, count // studies)
    out: list[bytes] = []
    study = series = ""
    for n in range(count):
        if n % per_study == 0:
            study, series = generate_uid(), generate_uid()
        out.append(_header(n // per_study, study, series, n % per_study + 1))
    return out


@dataclass
class Result:
    target: str
    first: list[float]  # ms of the first instance of each study
    others: list[float]  # ms of the other instances
    work: list[float]  # ms before the commit started, every insert
    connects: int = 0  # database connections opened while inserting


@contextmanager
def database(target: str, pg_url: str | None) -> Iterator[str]:
    if target.startswith("sqlite"):
        base = "/dev/shm" if target == "sqlite-tmpfs" else None
        with tempfile.TemporaryDirectory(prefix="safepacs-bench-", dir=base) as tmp:
            yield f"sqlite:///{Path(tmp) / 'index.sqlite3'}"
        return
    assert pg_url is not None
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield (
            sa.make_url(pg_url)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run(target: str, pg_url: str | None, files: list[bytes], per_study: int, profile: bool) -> Result:
    headers = [pydicom.dcmread(BytesIO(raw)) for raw in files]
    result = Result(target, [], [], [])
    with database(target, pg_url) as url:
        migrate(url)
        repos = open_repositories(url)
        repos.instances.count_instances()  # the pool's first connection
        commit_started: list[float] = []
        connects: list[object] = []
        event.listen(repos.db.engine, "commit", lambda _conn: commit_started.append(time.perf_counter()))
        event.listen(repos.db.engine, "connect", lambda dbapi_conn, _record: connects.append(dbapi_conn))
        profiler = cProfile.Profile() if profile else None
        try:
            for n, header in enumerate(headers):
                digest = hashlib.sha256(str(n).encode()).hexdigest()
                blob = StoredBlob(f"blob-{n}", "kek-1", digest, 10_000)
                commit_started.clear()
                if profiler:
                    profiler.enable()
                start = time.perf_counter()
                repos.instances.add_instance(header, blob, ExplicitVRLittleEndian)
                end = time.perf_counter()
                if profiler:
                    profiler.disable()
                (result.first if n % per_study == 0 else result.others).append((end - start) * 1000)
                result.work.append(((commit_started[-1] if commit_started else end) - start) * 1000)
            assert repos.instances.count_instances() == len(headers)
            result.connects = len(connects)
        finally:
            repos.close()
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="instances per target (default 1000)")
    parser.add_argument("--studies", type=int, default=10, help="studies they fall into (default 10)")
    parser.add_argument("--postgres", default=os.environ.get(PG_ENV), help=f"PostgreSQL URL (${PG_ENV})")
    parser.add_argument("--targets", default="sqlite-disk,sqlite-tmpfs,postgresql")
    parser.add_argument("--profile", metavar="TARGET", help="print a cProfile of this target")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t != "postgresql" or args.postgres]
    files = corpus(args.count, args.studies)
    per_study = max(1, args.count // args.studies)
    console = Console(highlight=False, width=120)
    table = Table(title=f"add_instance, {args.count} instances in {args.studies} studies, ms per insert")
    columns = (
        "target",
        "mean",
        "median",
        "p95",
        "first of study",
        "others (median)",
        "work (median)",
        "connects",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "target" else "right")
    for target in targets:
        r = run(target, args.postgres, files, per_study, profile=args.profile == target)
        every = r.first + r.others
        table.add_row(
            target,
            f"{statistics.fmean(every):.2f}",
            f"{statistics.median(every):.2f}",
            f"{statistics.quantiles(every, n=20)[-1]:.2f}",
            f"{statistics.median(r.first):.2f}",
            f"{statistics.median(r.others):.2f}" if r.others else "-",
            f"{statistics.median(r.work):.2f}",
            str(r.connects),
        )
    console.print(table)
    console.print(
        '"work": the time before the commit starts (statements, header reading); the rest is commit.'
    )


if __name__ == "__main__":
    main()
