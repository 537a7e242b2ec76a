"""C-FIND benchmark: server CPU per match and latency, SafePACS beside Orthanc (and optionally an older
SafePACS tree) in the same run, over DCMTK ``findscu``.

    .venv/bin/python bench/find_cpu.py                                   # 10,000 studies, 5 runs
    .venv/bin/python bench/find_cpu.py --workdir /tmp/spbench-find       # keep the filled archives
    .venv/bin/python bench/find_cpu.py --base-src /tmp/base/src --targets safepacs,base   # A/B

The archives hold bench/dicomweb.py's study corpus (``--studies`` single-instance studies over ten years):
SafePACS filled with ``safepacs import``, Orthanc with ``storescu``; neither fill is timed. Each query is one
``findscu`` run (its own association, as a modality or viewer asks), three kinds with seeded parameters:
a one-month StudyDate range and a PatientName prefix at STUDY level with a dozen return keys, and an exact
PatientID. The servers answer the same query list, interleaved: every run goes through the kinds, and for
each kind through the servers in an order that rotates from run to run. Per server and kind: the median
and p95 wall time of a query (findscu start to exit), and the CPU (user+system) its process group used per
query and per match, over all runs. Every answer is checked: the same number of matches from every server.
All traffic is on 127.0.0.1; every process and temp dir it starts is removed at exit. See bench/README.md,
"C-FIND encoding".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this tree's code, as its servers
from _common import (
    CALLING_AET,
    HOST,
    REPO,
    Orthanc,
    Receiver,
    dcmtk,
    free_port,
    git_revision,
    nodelay_env,
    remove_tree,
    running,
)
from dicomweb import DAYS, FIRST_DAY, Studies, make_studies

LABELS = {"safepacs": "SafePACS", "base": "SafePACS (--base-src)", "orthanc": "Orthanc"}
STUDY_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
    "StudyID", "StudyDescription", "StudyInstanceUID", "ModalitiesInStudy", "ReferringPhysicianName",
    "NumberOfStudyRelatedInstances",
)  # fmt: skip


@dataclass
class SafePacsServer(Receiver):
    """``safepacs serve`` of the tree ``src`` on an archive filled already (``workdir/data``)."""

    src: Path = REPO / "src"

    def start(self) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        argv = [
            sys.executable, "-m", "safepacs", "serve", "--data", str(self.workdir / "data"),
            "--dicom-port", str(self.port), "--http-port", str(free_port()),
            "--dicom-tls-port", str(free_port()),
        ]  # fmt: skip
        self._spawn(argv, env=env)
        self._wait_ready(120, ready="SafePACS listening for DICOM on")


class OrthancFind(Orthanc):
    """Orthanc as bench/_common.py starts it, answering C-FIND from BENCH."""

    def config(self) -> dict[str, object]:
        return {**super().config(), "DicomAlwaysAllowFind": True, "LimitFindResults": 0}


def _safepacs(src: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-m", "safepacs", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"safepacs {args[0]} failed:\n{done.stderr[-2000:]}")


def fill_safepacs(store: Path, studies: Studies, processes: int) -> None:
    marker = store / "filled.json"
    if marker.exists() and json.loads(marker.read_text()).get("count") == studies.count:
        return
    remove_tree(store)
    store.mkdir(parents=True)
    data = store / "data"
    src = REPO / "src"
    _safepacs(src, "init", "--data", str(data))
    peer = ["peer", "add", CALLING_AET, "--host", HOST, "--allow", "echo,find", "--tls", "off"]
    _safepacs(src, *peer, "--data", str(data))
    folders = studies.folders()
    groups = [folders[k::processes] for k in range(processes)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "safepacs", "import", "--data", str(data)]
    procs = [
        subprocess.Popen(
            [*command, *map(str, g)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for g in groups
        if g
    ]
    if any(p.wait() for p in procs):
        raise RuntimeError("safepacs import failed")
    marker.write_text(json.dumps({"count": studies.count}))


def fill_orthanc(store: Path, studies: Studies) -> None:
    marker = store / "filled.json"
    if marker.exists() and json.loads(marker.read_text()).get("count") == studies.count:
        return
    remove_tree(store)
    store.mkdir(parents=True)
    with running(OrthancFind(name="orthanc", aet="ORTHANC", workdir=store)) as orthanc:
        folders = studies.folders()
        procs = [
            subprocess.Popen([dcmtk("storescu"), "-nh", "-R", "+sd", "-aet", CALLING_AET, "-aec", orthanc.aet,
                              HOST, str(orthanc.port), *map(str, folders[k::4])], env=nodelay_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for k in range(4)
        ]  # fmt: skip
        for p in procs:
            p.wait()
        stored = orthanc.stored()
    if stored != studies.count:
        raise RuntimeError(f"Orthanc holds {stored} instances, expected {studies.count}")
    marker.write_text(json.dumps({"count": studies.count}))


@dataclass
class Query:
    kind: str
    keys: list[str]


def make_queries(studies: Studies, n: int, seed: int, days: int = 30) -> dict[str, list[Query]]:
    rng = np.random.default_rng(seed)
    study = ["QueryRetrieveLevel=STUDY", *STUDY_KEYS]
    date_kind = "StudyDate one month" if days == 30 else f"StudyDate {days + 1} days"
    out: dict[str, list[Query]] = {date_kind: [], "PatientName prefix*": [], "PatientID exact": []}
    for _ in range(n):
        day = FIRST_DAY + dt.timedelta(days=int(rng.integers(0, DAYS - days - 1)))
        end = day + dt.timedelta(days=days)
        rng_keys = [k for k in study if k != "StudyDate"] + [f"StudyDate={day:%Y%m%d}-{end:%Y%m%d}"]
        out[date_kind].append(Query("date", rng_keys))
        name = studies.names[int(rng.integers(0, studies.count))]
        prefix = [k for k in study if k != "PatientName"] + [f"PatientName={name[:4]}*"]
        out["PatientName prefix*"].append(Query("name", prefix))
        pid = studies.patient_ids[int(rng.integers(0, studies.count))]
        out["PatientID exact"].append(
            Query("pid", [k for k in study if k != "PatientID"] + [f"PatientID={pid}"])
        )
    return out


def run_query(server: Receiver, query: Query) -> tuple[float, int]:
    """One findscu run: its wall time and the number of pending responses it received."""
    args = [a for k in query.keys for a in ("-k", k)]
    argv = [
        dcmtk("findscu"),
        "-v",
        "-S",
        "-aet",
        CALLING_AET,
        "-aec",
        server.aet,
        *args,
        HOST,
        str(server.port),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=nodelay_env(), capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    out = done.stdout + done.stderr
    final = [line for line in out.splitlines() if "Final Find Response" in line]
    if done.returncode != 0 or not final or "(Success)" not in final[-1]:
        raise RuntimeError(f"findscu against {server.name} failed or was refused:\n{out[-1500:]}")
    return elapsed, out.count("(Pending)")


@dataclass
class Result:
    times: list[float] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)
    cpu: float = 0.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def in_process(data: Path, studies: Studies, n: int, seed: int, days: int) -> None:
    """Old path (data sets, then pynetdicom's encoder) against the rows written as bytes, interleaved, in
    this process on the filled archive: CPU per query of the StudyDate queries, SQL included."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    from safepacs.app import open_archive
    from safepacs.config import load_settings
    from safepacs.types import QueryLevel, QueryModel

    archive = open_archive(load_settings(data))
    model, level = QueryModel.STUDY_ROOT, QueryLevel.STUDY
    idents = []
    for q in next(iter(make_queries(studies, n, seed, days).values())):
        ident = Dataset()
        for key in q.keys:
            keyword, _, value = key.partition("=")
            setattr(ident, keyword, value)
        idents.append(ident)
    cpu = {"data sets + pynetdicom encode": 0.0, "rows -> bytes (find_encoded)": 0.0}
    matches = 0
    try:
        for ident in idents:
            t0 = time.process_time()
            old = [encode(ds, True, True) for ds in archive.instances.find(model, level, ident, None)]
            t1 = time.process_time()
            new = archive.instances.find_encoded(model, level, ident, None, implicit_vr=True)
            t2 = time.process_time()
            if new != old:
                raise RuntimeError("the two paths answered different bytes")
            cpu["data sets + pynetdicom encode"] += t1 - t0
            cpu["rows -> bytes (find_encoded)"] += t2 - t1
            matches += len(new)
    finally:
        archive.close()
    per_query = matches / len(idents)
    print(f"\nIn-process, {len(idents)} StudyDate queries, {per_query:.1f} matches/query (same bytes):\n")
    print("| path | CPU ms/query | CPU ms/match |\n|---|---|---|")
    for name, seconds in cpu.items():
        print(f"| {name} | {seconds * 1000 / len(idents):.1f} | {seconds * 1000 / matches:.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=20, help="queries per kind per run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--days", type=int, default=30, help="StudyDate ranges span DAYS+1 days (6: ~165 matches at 100,000)"
    )
    p.add_argument("--targets", default="safepacs,orthanc", help="of safepacs, base, orthanc")
    p.add_argument("--base-src", type=Path, help="the src/ of another SafePACS tree (target 'base')")
    p.add_argument("--workdir", type=Path, help="keep corpus and filled archives here, reuse them next time")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    p.add_argument(
        "--in-process", action="store_true", help="also time the index's two paths in this process"
    )
    args = p.parse_args(argv)
    targets = args.targets.split(",")
    if "base" in targets and args.base_src is None:
        p.error("target 'base' needs --base-src")
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-find-")) if own else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        studies = make_studies(workdir / f"studies-{args.studies}-seed{args.seed}", args.studies, args.seed,
                               args.processes)  # fmt: skip
        store = workdir / f"safepacs-{args.studies}-seed{args.seed}"
        if "safepacs" in targets or "base" in targets:
            fill_safepacs(store, studies, args.processes)
        if "orthanc" in targets:
            fill_orthanc(workdir / f"orthanc-{args.studies}-seed{args.seed}", studies)
        queries = make_queries(studies, args.queries, args.seed, args.days)
        if args.in_process and "safepacs" in targets:
            in_process(store / "data", studies, args.queries, args.seed, args.days)
        load_before = os.getloadavg()
        with contextlib.ExitStack() as stack:
            servers: dict[str, Receiver] = {}
            for t in targets:
                server: Receiver
                if t == "orthanc":
                    server = OrthancFind(
                        name=t, aet="ORTHANC", workdir=workdir / f"orthanc-{args.studies}-seed{args.seed}"
                    )
                elif t == "base":  # its own copy: two servers never share one data directory
                    copy = workdir / "base-copy"
                    remove_tree(copy)
                    shutil.copytree(store, copy)
                    stack.callback(remove_tree, copy)
                    server = SafePacsServer(name=t, aet="SAFEPACS", workdir=copy, src=args.base_src.resolve())
                else:
                    server = SafePacsServer(name=t, aet="SAFEPACS", workdir=store)
                servers[t] = stack.enter_context(running(server))
            for server in servers.values():  # warm-up: caches, first imports
                for q in next(iter(queries.values()))[:3]:
                    run_query(server, q)
                server.wait_idle()
            results = {(k, t): Result() for k in queries for t in targets}
            for run in range(args.runs):
                order = targets[run % len(targets) :] + targets[: run % len(targets)]
                for kind, qs in queries.items():
                    for t in order:
                        server, res = servers[t], results[(kind, t)]
                        before = server.cpu_seconds()
                        for q in qs:
                            elapsed, n = run_query(server, q)
                            res.times.append(elapsed)
                            res.matches.append(n)
                        res.cpu += server.cpu_seconds() - before
                print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        load_after = os.getloadavg()
        report(results, queries, targets, args, load_before, load_after)
    finally:
        if own:
            remove_tree(workdir)
    return 0


def report(
    results: dict[tuple[str, str], Result],
    queries: dict[str, list[Query]],
    targets: list[str],
    args: argparse.Namespace,
    before: tuple[float, ...],
    after: tuple[float, ...],
) -> None:
    print(
        f"\nC-FIND on {args.studies:,} studies, findscu, {args.runs} runs x {args.queries} queries per kind,"
        f" {os.cpu_count()} CPUs, load average {before[0]:.2f} before / {after[0]:.2f} after,"
        f" SafePACS{git_revision()}\n"
    )
    print("| query | server | n | matches/query | median ms | p95 ms | speed x Orthanc | srv CPU ms/query"
          " | srv CPU ms/match | check |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in queries:
        reference = results.get((kind, "orthanc"))
        for t in targets:
            r = results[(kind, t)]
            n = len(r.times)
            med = statistics.median(r.times)
            ratio = f"{statistics.median(reference.times) / med:.2f}" if reference else "-"
            total = sum(r.matches)
            same = all(r.matches == results[(kind, o)].matches for o in targets)
            p95 = percentile(r.times, 95) * 1000
            per_match = r.cpu * 1000 / total if total else 0.0
            print(
                f"| {kind} | {LABELS[t]} | {n} | {total / n:.1f} | {med * 1000:.1f} | {p95:.1f} | {ratio}"
                f" | {r.cpu * 1000 / n:.1f} | {per_match:.3f} | {'ok' if same else 'MATCH COUNTS DIFFER'} |"
            )
    # What one more match costs, apart from what every query costs (association, audit record, SQL):
    # the slope between the query kind with the most matches and the one with the fewest.
    print()
    for t in targets:
        by_kind = [results[(kind, t)] for kind in queries]
        many = max(by_kind, key=lambda r: sum(r.matches) / len(r.matches))
        few = min(by_kind, key=lambda r: sum(r.matches) / len(r.matches))
        extra = sum(many.matches) / len(many.matches) - sum(few.matches) / len(few.matches)
        if extra > 0:
            slope = (many.cpu / len(many.times) - few.cpu / len(few.times)) * 1000 / extra
            print(
                f"- {LABELS[t]}: {slope:.3f} ms of server CPU per further match (slope between query kinds)"
            )


if __name__ == "__main__":
    sys.exit(main())
