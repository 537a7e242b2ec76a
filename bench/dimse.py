"""DIMSE retrieval benchmark: C-GET and C-MOVE of a CT series and C-FIND at STUDY level, SafePACS beside
Orthanc 1.10 in the same run, interleaved.

    .venv/bin/python bench/dimse.py --quick                          # 2,000 studies, 100 slices, 1 run
    .venv/bin/python bench/dimse.py --workdir /tmp/spbench-dicomweb  # 100,000 studies, 500 slices, 3 runs

The archives are bench/dicomweb.py's (its corpora, fill functions and ``--workdir`` layout, so one filled
archive serves both benchmarks). Each run, for each server in turn (the order alternates):

* C-GET: DCMTK ``getscu -S`` of the series' study, files written to a fresh directory under --workdir;
* C-MOVE: DCMTK ``movescu -S`` to a DCMTK ``storescp`` (started here, registered on both servers as a move
  destination) that writes the files to a fresh directory, the same disk for both servers;
* C-FIND: DCMTK ``findscu`` at STUDY level, one process per query: exact PatientID, PatientName prefix
  (``ABCD*``) and a six-day StudyDate range (~165 studies on the 100,000-study corpus: a month there
  matches ~830, more than SafePACS's default ``query.max_results``, which refuses it), the same seeded
  queries for both servers.

Every answer is checked: the number of files received is the series' size and each parses with the
stored SOP Instance UIDs; each C-FIND answers as many studies as the corpus holds for it (a query the
server refuses, final status not Success, is counted as refused, not as a wrong count). Server CPU is
user+system time of the server's process group. All traffic is on 127.0.0.1; every process started
here is stopped and every temp dir removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from _common import (
    CALLING_AET,
    HOST,
    SAFEPACS,
    Receiver,
    dcmtk,
    free_port,
    git_revision,
    nodelay_env,
    running,
)
from dicomweb import (
    OrthancWeb,
    SafePacsWeb,
    SeriesInfo,
    Studies,
    fill_orthanc,
    fill_safepacs,
    make_series,
    make_studies,
    markdown,
    percentile,
    print_table,
)

SCP_AET = "BENCHSCP"
LABELS = {"safepacs": "SafePACS", "orthanc": "Orthanc"}
#: "StudyDate 6 days": 27 studies a day on the 100,000-study corpus (ten years), so ~165 matches, the
#: size of the issue's "one month" on a corpus of 5 instances per study; a month here would exceed
#: SafePACS's default query.max_results, which the benchmark keeps.
FIND_KINDS = ("PatientID exact", "PatientName prefix*", "StudyDate 6 days")
DATE_RANGE_DAYS = 6


@dataclass
class Transfer:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Finds:
    seconds: list[float] = field(default_factory=list)
    cpu: float = 0.0
    results: int = 0
    wrong: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # final status not Success (e.g. too many matches)


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env=nodelay_env(), timeout=timeout, check=False
    )


def _check_files(out: Path, series: SeriesInfo) -> str | None:
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) != len(series.sop_uids):
        return f"{len(files)} files received, expected {len(series.sop_uids)}"
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    return None if got == series.sop_uids else "the files received are not the series' instances"


def retrieve(kind: str, server: Receiver, aet: str, series: SeriesInfo, out: Path, result: Transfer) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={series.study_uid}"]
    if kind == "C-GET":
        argv = [dcmtk("getscu"), "-S", "-aet", CALLING_AET, "-aec", aet, "-od", str(out), *keys]
    else:
        argv = [dcmtk("movescu"), "-S", "-aet", CALLING_AET, "-aec", aet, "-aem", SCP_AET, *keys]
    server.wait_idle()
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    done = _run([*argv, HOST, str(server.port)])
    elapsed, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    error = f"exit {done.returncode}: {done.stderr[-300:]}" if done.returncode else _check_files(out, series)
    if error:
        result.errors.append(error)
    else:
        result.seconds.append(elapsed)
        result.cpu.append(cpu)
    shutil.rmtree(out, ignore_errors=True)


def make_finds(
    studies: Studies, series: SeriesInfo, n: int, seed: int
) -> dict[str, list[tuple[list[str], int]]]:
    """Per kind, ``n`` (findscu keys, expected number of studies)."""
    rng = np.random.default_rng([seed, 17])
    pids = [*studies.patient_ids, series.patient_id]
    names = [*studies.names, series.name]
    dates = [*studies.dates, series.date]
    by_pid: dict[str, int] = {}
    for pid in pids:
        by_pid[pid] = by_pid.get(pid, 0) + 1
    out: dict[str, list[tuple[list[str], int]]] = {k: [] for k in FIND_KINDS}
    common = [
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "StudyDate",
        "-k",
        "PatientName",
    ]
    for _ in range(n):
        pid = pids[int(rng.integers(0, len(pids)))]
        out["PatientID exact"].append(([*common, "-k", f"PatientID={pid}"], by_pid[pid]))
        prefix = names[int(rng.integers(0, len(names)))][:4]
        count = sum(1 for name in names if name.startswith(prefix))
        out["PatientName prefix*"].append(([*common, "-k", f"PatientName={prefix}*"], count))
        start = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3653 - DATE_RANGE_DAYS)))
        end = start + dt.timedelta(days=DATE_RANGE_DAYS - 1)  # inclusive
        lo, hi = int(start.strftime("%Y%m%d")), int(end.strftime("%Y%m%d"))
        count = sum(1 for d in dates if lo <= d <= hi)
        out["StudyDate 6 days"].append(([*common, "-k", f"StudyDate={lo}-{hi}"], count))
    return out


def run_finds(server: Receiver, aet: str, queries: list[tuple[list[str], int]], result: Finds) -> None:
    server.wait_idle()
    cpu0 = server.cpu_seconds()
    for keys, expected in queries:
        t0 = time.perf_counter()
        done = _run(
            [dcmtk("findscu"), "-v", "-S", "-aet", CALLING_AET, "-aec", aet, *keys, HOST, str(server.port)]
        )
        result.seconds.append(time.perf_counter() - t0)
        lines = done.stderr.splitlines()
        got = sum("Find Response" in line and "Pending" in line for line in lines)
        final = [line for line in lines if "Final Find Response" in line]
        if final and "Success" not in final[-1]:  # the server answered, with a failure status
            result.refused.append(f"{keys[-1]}: {final[-1].strip()}")
        elif done.returncode or got != expected:
            result.wrong.append(f"{keys[-1]}: {got} results (exit {done.returncode}), expected {expected}")
        result.results += got
    result.cpu += server.cpu_seconds() - cpu0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def transfer_rows(
    results: dict[tuple[str, str], Transfer], targets: list[str], count: int
) -> list[list[str]]:
    rows = []
    for kind in ("C-GET", "C-MOVE"):
        rates = {
            t: count / statistics.median(results[(kind, t)].seconds)
            for t in targets
            if results[(kind, t)].seconds
        }
        for t in targets:
            res = results[(kind, t)]
            if not res.seconds:
                rows.append([kind, LABELS[t], "FAILED", "", "", "", "; ".join(res.errors[:1])])
                continue
            rate = rates[t]
            ref = rates.get("orthanc")
            cpu = statistics.median(res.cpu) / count * 1000
            spread = f"{count / max(res.seconds):,.0f}-{count / min(res.seconds):,.0f}"
            check = "ok" if not res.errors else f"{len(res.errors)} failed"
            rows.append(
                [
                    kind,
                    LABELS[t],
                    f"{rate:,.0f}",
                    f"{rate / ref:.2f}" if ref else "",
                    f"{cpu:.2f}",
                    spread,
                    check,
                ]
            )
    return rows


def find_rows(results: dict[tuple[str, str], Finds], targets: list[str]) -> list[list[str]]:
    rows = []
    for kind in FIND_KINDS:
        for t in targets:
            res = results[(kind, t)]
            n = len(res.seconds)
            per_q = res.cpu / n * 1000 if n else 0.0
            per_match = res.cpu / res.results * 1000 if res.results else 0.0
            p50, p95, p99 = (statistics.median(res.seconds), percentile(res.seconds, 95),
                             percentile(res.seconds, 99))  # fmt: skip
            rows.append([
                kind, LABELS[t], str(n), _ms(p50), _ms(p95), _ms(p99), f"{res.results / n:.1f}",
                f"{per_q:.2f}", f"{per_match:.3f}", _find_check(res),
            ])  # fmt: skip
    return rows


def _find_check(res: Finds) -> str:
    bad = [f"{len(res.refused)} refused"] * bool(res.refused) + [f"{len(res.wrong)} wrong"] * bool(res.wrong)
    return ", ".join(bad) or "ok"


TRANSFER_HEADERS = ["operation", "server", "inst/s", "x Orthanc", "srv CPU ms/inst", "runs inst/s", "check"]
FIND_HEADERS = ["query", "server", "n", "p50 ms", "p95 ms", "p99 ms", "results/query", "srv CPU ms/q",
                "srv CPU ms/match", "check"]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=100_000, help="single-instance studies (default 100,000)")
    p.add_argument(
        "--instances", type=int, default=500, help="512x512 CT slices in the retrieved series (500)"
    )
    p.add_argument("--runs", type=int, default=3, help="C-GET/C-MOVE runs per server (3)")
    p.add_argument("--finds", type=int, default=100, help="C-FIND queries per kind and server (100)")
    p.add_argument("--quick", action="store_true", help="2,000 studies, 100 slices, 1 run, 20 queries")
    p.add_argument("--targets", default="safepacs,orthanc")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    p.add_argument(
        "--workdir", type=Path, help="keep corpora and filled archives here (shared with dicomweb.py)"
    )
    p.add_argument("--reload", action="store_true", help="fill the archives again")
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.studies, args.instances, args.runs, args.finds = 2000, 100, 1, 20
    args.targets = [t for t in args.targets.split(",") if t]
    return args


class _Orthanc(OrthancWeb):
    """The benchmark's Orthanc, with the C-GET/C-MOVE/C-FIND client and the move destination known."""

    scp_port: int = 0
    client_port: int = 0

    def config(self) -> dict[str, object]:
        return {
            **super().config(),
            "DicomModalities": {
                "bench": [CALLING_AET, HOST, self.client_port],
                "benchscp": [SCP_AET, HOST, self.scp_port],
            },
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-dimse-")) if own else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="received-", dir=workdir))
    try:
        studies = make_studies(workdir / f"studies-{args.studies}-seed{args.seed}", args.studies, args.seed,
                               args.processes)  # fmt: skip
        series = make_series(workdir / f"series-512-{args.instances}", args.instances)
        spec = {"studies": studies.root.name, "series": series.corpus.root.name, "uid": series.series_uid}
        stores = {t: workdir / f"{t}-{args.studies}-seed{args.seed}-{args.instances}" for t in args.targets}
        if "safepacs" in stores:
            fill_safepacs(stores["safepacs"], studies, series, spec, args)
        if "orthanc" in stores:
            fill_orthanc(stores["orthanc"], studies, series, spec, args)
        scp_port = free_port()
        servers: dict[str, Receiver] = {}
        aets = {"safepacs": "SAFEPACS", "orthanc": "ORTHANC"}
        load_before = os.getloadavg()[0]
        with contextlib.ExitStack() as stack:
            scp_out = scratch / "storescp"
            scp_out.mkdir()
            scp = subprocess.Popen([dcmtk("storescp"), "-aet", SCP_AET, "-od", str(scp_out), str(scp_port)],
                                   env=nodelay_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)  # fmt: skip
            stack.callback(lambda: (scp.terminate(), scp.wait(10)))
            if "safepacs" in stores:
                data = stores["safepacs"] / "data"
                subprocess.run([str(SAFEPACS), "peer", "remove", CALLING_AET, "--data", str(data)],
                               capture_output=True, check=False)  # fmt: skip
                subprocess.run([str(SAFEPACS), "peer", "remove", SCP_AET, "--data", str(data)],
                               capture_output=True, check=False)  # fmt: skip
                for peer in (
                    [CALLING_AET, "--host", HOST, "--allow", "echo,find,get,move", "--tls", "off"],
                    [SCP_AET, "--host", HOST, "--port", str(scp_port), "--allow", "echo", "--tls", "off"],
                ):
                    subprocess.run([str(SAFEPACS), "peer", "add", *peer, "--data", str(data)],
                                   capture_output=True, check=True)  # fmt: skip
                sp = SafePacsWeb(name="safepacs", aet="SAFEPACS", workdir=stores["safepacs"])
                servers["safepacs"] = stack.enter_context(running(sp))
            if "orthanc" in stores:
                orthanc = _Orthanc(name="orthanc", aet="ORTHANC", workdir=stores["orthanc"])
                orthanc.scp_port, orthanc.client_port = scp_port, free_port()
                servers["orthanc"] = stack.enter_context(running(orthanc))
            transfers = {(k, t): Transfer() for k in ("C-GET", "C-MOVE") for t in args.targets}
            for run in range(args.runs):
                order = args.targets if run % 2 == 0 else list(reversed(args.targets))
                for kind in ("C-GET", "C-MOVE"):
                    for t in order:
                        out = scratch / "getscu" if kind == "C-GET" else scp_out
                        retrieve(kind, servers[t], aets[t], series, out, transfers[(kind, t)])
                        if kind == "C-MOVE":
                            scp_out.mkdir(exist_ok=True)
                        res = transfers[(kind, t)]
                        last = (
                            f"{series.corpus.count / res.seconds[-1]:,.0f} inst/s"
                            if res.seconds
                            else "FAILED"
                        )
                        print(f"run {run + 1} {kind} {t}: {last}", flush=True)
            finds = {(k, t): Finds() for k in FIND_KINDS for t in args.targets}
            queries = make_finds(studies, series, args.finds, args.seed)
            for kind in FIND_KINDS:
                for block in range(0, args.finds, 10):  # alternating blocks of 10 queries
                    for t in args.targets if block % 20 == 0 else list(reversed(args.targets)):
                        run_finds(servers[t], aets[t], queries[kind][block : block + 10], finds[(kind, t)])
                for t in args.targets:
                    res = finds[(kind, t)]
                    print(f"C-FIND {kind} {t}: median {_ms(statistics.median(res.seconds))} ms,"
                          f" {len(res.wrong)} wrong, {len(res.refused)} refused", flush=True)  # fmt: skip
                    for line in [*res.wrong[:3], *res.refused[:3]]:
                        print("   ", line)
        command = shlex.join(["python", "bench/dimse.py", *(sys.argv[1:] if argv is None else argv)])
        context = (
            f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs ({platform.machine()}),"
            f" load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after, SafePACS"
            f" {git_revision()}; `{command}`, {(time.perf_counter() - started) / 60:.0f} min in all"
        )
        t_title = (f"C-GET (getscu) and C-MOVE (movescu -> storescp) of {series.corpus.count} x 512x512 CT,"
                   f" median of {args.runs} runs, files written under --workdir for both")  # fmt: skip
        f_title = f"C-FIND (findscu, one process per query) STUDY level on {studies.count + 1:,} studies"
        t_rows = transfer_rows(transfers, args.targets, series.corpus.count)
        f_rows = find_rows(finds, args.targets)
        print()
        print(context)
        print_table(t_title, TRANSFER_HEADERS, t_rows, len(args.targets))
        print_table(f_title, FIND_HEADERS, f_rows, len(args.targets))
        if args.markdown:
            args.markdown.write_text(
                f"{context}\n\n" + markdown(t_title, TRANSFER_HEADERS, t_rows) + "\n"
                + markdown(f_title, FIND_HEADERS, f_rows)
            )  # fmt: skip
        bad = any(r.errors for r in transfers.values()) or any(r.wrong or r.refused for r in finds.values())
        return 1 if bad else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
