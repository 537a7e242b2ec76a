"""WADO-RS series metadata in process: what OHIF waits for before its first image (issue 19).

    python bench/metadata.py --workdir /tmp/spbench-meta                # 500 slices, 5 runs
    python bench/metadata.py --workdir /tmp/spbench-meta --slices 100 --runs 3

A data directory with one series of ``--slices`` 512 x 512 CT slices (Explicit VR Little Endian, as
bench/ui.py imports them; stored encrypted through the ingest service) is made once in the workdir.
Then, in this process, without TLS or a socket (the WADO-RS router on its own, behind a fixed
radiologist principal, through httpx's ASGI transport):

* the route ``GET /dicomweb/studies/{s}/series/{se}/metadata`` as it is (the fast path of
  safepacs.dicom.fastjson) and with that fast path made to decline for every instance (the slow path,
  pydicom's reader and converter: what the route did before); both answers must be the same bytes;
* per instance, one object in memory at a time as in the route: reading and decrypting the stored
  object (``RetrieveService.fetch``), the fast JSON, and the slow path's parse and conversion.

CPU time of this process (all threads) and wall time, medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import ct_dataset
from anyio.from_thread import start_blocking_portal
from fastapi import FastAPI, Request
from pydicom.uid import generate_uid

from safepacs.app import Archive, initialize, open_archive
from safepacs.audit.events import EventID
from safepacs.config import load_settings
from safepacs.dicom import bulkdata, fastjson
from safepacs.protocols.dicomweb.retrieval import locate
from safepacs.protocols.dicomweb.wado import wado_router
from safepacs.types import InstanceRef, Principal, PrincipalKind, Service

READER = Principal(
    kind=PrincipalKind.USER,
    name="bench",
    roles=frozenset({"radiologist"}),
    allow=frozenset({Service.FIND, Service.GET, Service.MOVE}),
    user="bench",
)
SYSTEM = Principal(kind=PrincipalKind.SYSTEM, name="bench")
PARTS = (
    "read + decrypt (RetrieveService.fetch)",
    "fast JSON (fastjson.metadata_json)",
    "slow JSON (load_pruned + metadata)",
    "  of which pydicom's read (load_pruned)",
)


def prepare(workdir: Path, slices: int) -> tuple[Path, str, str]:
    """The data directory with the series (made once), its study and series UIDs."""
    data = workdir / "data"
    marker = workdir / "series.json"
    if marker.exists() and json.loads(marker.read_text())["slices"] == slices:
        saved = json.loads(marker.read_text())
        return data, saved["study"], saved["series"]
    workdir.mkdir(parents=True, exist_ok=True)
    if data.exists():
        raise SystemExit(f"{data} exists without {marker}; remove it or use another --workdir")
    initialize(data)
    archive = open_archive(load_settings(data))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(19)
    try:
        for number in range(1, slices + 1):
            ds = ct_dataset(
                rng,
                rows=512,
                cols=512,
                patient=1,
                study_uid=study,
                series_uid=series,
                frame_uid=frame,
                number=number,
            )
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            archive.ingest.ingest_file(SYSTEM, buf.getvalue())
    finally:
        archive.close()
    marker.write_text(json.dumps({"slices": slices, "study": study, "series": series}))
    return data, study, series


@contextmanager
def client_of(archive: Archive) -> Iterator[Callable[[str], httpx.Response]]:
    """GET through the WADO-RS router in process, as :data:`READER`."""

    def principal_of(request: Request) -> Principal:
        return READER

    app = FastAPI()
    app.include_router(wado_router(principal_of, archive.retrieve), prefix="/dicomweb")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://bench", timeout=120)
    with start_blocking_portal() as portal:
        yield lambda url: portal.call(client.get, url)
        portal.call(client.aclose)


def timed(call: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    """Median CPU and wall seconds of ``runs`` calls, and the last result."""
    cpu, wall, result = [], [], None
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        result = call()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), result


def parts_of(archive: Archive, refs: list[InstanceRef]) -> list[tuple[float, float]]:
    """CPU and wall seconds of each of :data:`PARTS`, summed over the instances."""
    sums = [[0.0, 0.0] for _ in PARTS]

    def clock(index: int, call: Callable[..., Any], *args: Any) -> Any:
        c0, w0 = time.process_time(), time.perf_counter()
        result = call(*args)
        sums[index][0] += time.process_time() - c0
        sums[index][1] += time.perf_counter() - w0
        return result

    def uri(path: str) -> str:
        return "https://bench/" + path

    for ref in refs:
        part10 = clock(0, archive.retrieve.fetch, SYSTEM, ref, EventID.INSTANCES_ACCESSED)
        clock(1, fastjson.metadata_json, part10, uri)
        ds, _ = clock(3, bulkdata.load_pruned, part10)
        clock(2, bulkdata.metadata, ds, uri)
    sums[2][0] += sums[3][0]
    sums[2][1] += sums[3][1]
    return [(cpu, wall) for cpu, wall in sums]


@contextmanager
def slow_path_only() -> Iterator[None]:
    """The route as before: the fast path declines every instance."""
    fast = fastjson.metadata_json
    fastjson.metadata_json = lambda part10, uri_of: None  # type: ignore[assignment]
    try:
        yield
    finally:
        fastjson.metadata_json = fast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    data, study, series = prepare(args.workdir, args.slices)
    archive = open_archive(load_settings(data))
    url = f"/dicomweb/studies/{study}/series/{series}/metadata"
    rows: list[tuple[str, float, float]] = []
    try:
        with client_of(archive) as get:
            get(url)  # warm-up: imports, caches, page cache
            cpu, wall, after = timed(lambda: get(url), args.runs)
            rows.append(("route, fast path (now)", cpu, wall))
            with slow_path_only():
                cpu, wall, before = timed(lambda: get(url), args.runs)
            rows.append(("route, slow path (before)", cpu, wall))
            assert after.status_code == before.status_code == 200
            assert after.content == before.content, "the fast and slow answers differ"
        refs = locate(
            archive.retrieve, SYSTEM, (study, series), event=EventID.INSTANCES_ACCESSED, record=False
        )
        runs = [parts_of(archive, refs) for _ in range(args.runs)]
        for index, name in enumerate(PARTS):
            cpu = statistics.median(run[index][0] for run in runs)
            wall = statistics.median(run[index][1] for run in runs)
            rows.append((f"  {name}", cpu, wall))
    finally:
        archive.close()
    n = len(refs)
    print(f"{n} instances of 512x512x16 bit, {len(after.content):,} bytes of JSON, medians of {args.runs}")
    print(f"{'':45s} {'CPU s':>8s} {'wall s':>8s} {'CPU ms/inst':>12s}")
    for name, cpu, wall in rows:
        print(f"{name:45s} {cpu:8.3f} {wall:8.3f} {1000 * cpu / n:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
