"""What the audit trail costs: ingest and C-FIND with audit recording on vs off, same corpus, same run.

    .venv/bin/python bench/audit.py --quick          # 500 small instances, 200 C-FINDs, 1 run
    .venv/bin/python bench/audit.py --runs 3         # 2,000 small + 200 CT, 1,000 C-FINDs, median of 3

Each measurement starts two SafePACS fresh (``init``; peer BENCH allowed echo,store,find; ``serve``,
one with ``SAFEPACS_AUDIT__RECORD=true``, one with ``false``) on empty stores, sends the corpus with
DCMTK ``storescu`` over one association (TCP_NODELAY=1) to one and then the other (the order swaps
from run to run), then sends C-FINDs over one pynetdicom association to each: STUDY level, PatientID
of a stored patient (one match each), Study Root, alternating between the two servers in blocks of
25 so that whatever else the machine does hits both alike.  With recording on, the first instance
of each study in the association is recorded in the index transaction that stores it and the
association's end sums up the rest; each association and each query is recorded (committed before
the answer, synced within a second).  Target: auditing costs under 10% of the throughput
without it.  All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    HOST,
    SAFEPACS,
    Corpus,
    Measurement,
    SafePacs,
    ct_corpus,
    git_revision,
    markdown_table,
    remove_tree,
    rich_table,
    running,
    small_corpus,
    version_line,
)
from ingest import send
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from rich.console import Console

TARGET_COST = 0.10
MODES = ("on", "off")

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


@dataclass
class Finds:
    elapsed: float
    count: int
    latencies: list[float]
    errors: list[str]


class FindClient:
    """One association for C-FINDs (STUDY level by PatientID, Study Root), Nagle off."""

    def __init__(self, port: int) -> None:
        self.ae = AE(ae_title="BENCH")
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        self.assoc = self.ae.associate(HOST, port, ae_title="SAFEPACS")
        if not self.assoc.is_established:
            raise RuntimeError("the C-FIND association was not accepted")
        sock = getattr(self.assoc.dul.socket, "socket", None)
        if sock is not None:  # else each query waits for a delayed ACK (40 ms) on loopback
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def query(self, patient: str) -> tuple[float, str | None]:
        """(seconds, error or None) of one C-FIND that must match exactly one study."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.PatientID = patient
        ident.StudyInstanceUID = ""
        ident.PatientName = ""
        t0 = time.perf_counter()
        matches, final = 0, -1
        for status, _ in self.assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                final = -2
                break
            if status.Status in (0xFF00, 0xFF01):
                matches += 1
            else:
                final = int(status.Status)
        elapsed = time.perf_counter() - t0
        if final != 0 or matches != 1:
            return elapsed, f"C-FIND of {patient}: status {final:#06x}, {matches} matches (expected 1)"
        return elapsed, None

    def close(self) -> None:
        self.assoc.release()
        self.ae.shutdown()


def interleaved_finds(
    ports: dict[str, int], patients: list[str], count: int, block: int = 25
) -> dict[str, Finds]:
    """``count`` C-FINDs to each server, in alternating blocks of ``block``, so that whatever else the
    machine does hits both alike."""
    clients = {mode: FindClient(port) for mode, port in ports.items()}
    out = {mode: Finds(0.0, 0, [], []) for mode in ports}
    try:
        for start in range(0, count, block):
            for mode, client in clients.items():
                found = out[mode]
                for i in range(start, min(count, start + block)):
                    seconds, error = client.query(patients[i % len(patients)])
                    found.latencies.append(seconds)
                    found.elapsed += seconds
                    found.count += 1
                    if error is not None and len(found.errors) < 5:
                        found.errors.append(error)
    finally:
        for client in clients.values():
            client.close()
    return out


def patients_of(corpus: Corpus) -> list[str]:
    """The PatientIDs the corpus holds (one study and patient per series, see _common.make_corpus)."""
    series = max(1, len({Path(f).parent for f in corpus.files}))
    return [f"BENCH{p:06d}" for p in range(series)]


def measure_pair(
    corpus: Corpus, order: tuple[str, ...], workdir: Path, finds: int, timeout: float
) -> dict[str, tuple[Measurement, Finds | None]]:
    """Two servers, recording on and off, both running: the corpus sent to each in ``order``, then
    ``finds`` C-FINDs to each, interleaved."""
    receivers = {}
    for mode in order:
        rundir = Path(tempfile.mkdtemp(prefix=f"audit-{mode}-{corpus.name}-", dir=workdir))
        receiver = SafePacs(
            name="safepacs",
            aet="SAFEPACS",
            workdir=rundir,
            env={"SAFEPACS_AUDIT__RECORD": "true" if mode == "on" else "false"},
        )
        receiver.allow = "echo,store,find"
        receivers[mode] = receiver
    out: dict[str, tuple[Measurement, Finds | None]] = {}
    try:
        with contextlib.ExitStack() as stack:
            for receiver in receivers.values():
                stack.enter_context(running(receiver))  # each waits until the server is idle
            ingests = {mode: send(corpus, receivers[mode], 1, timeout) for mode in order}
            queried: dict[str, Finds] = {}
            if finds and all(m.ok for m in ingests.values()):
                ports = {mode: receivers[mode].port for mode in order}
                queried = interleaved_finds(ports, patients_of(corpus), finds)
            for mode in order:
                if not ingests[mode].ok and receivers[mode].log_tail(8):
                    ingests[mode].errors.append(f"safepacs log tail:\n{receivers[mode].log_tail(8)}")
                out[mode] = (ingests[mode], queried.get(mode))
        return out
    except Exception as exc:  # a failed measurement is reported, not raised
        failed = Measurement(0.0, corpus.count, 0, [f"{type(exc).__name__}: {exc}"])
        return {mode: (failed, None) for mode in order}
    finally:
        for receiver in receivers.values():
            remove_tree(receiver.workdir)


HEADERS = ["measure", "audit on", "audit off", "audit cost", "target <10%"]


def _row(name: str, on: list[float], off: list[float], unit: str, higher_is_better: bool) -> list[str]:
    if not on or not off:
        return [name, "-", "-", "FAILED", "-"]
    a, b = statistics.median(on), statistics.median(off)
    cost = (1 - a / b) if higher_is_better else (a / b - 1)
    return [
        name,
        f"{a:,.1f} {unit}",
        f"{b:,.1f} {unit}",
        f"{cost:+.1%}",
        "yes" if cost < TARGET_COST else "NO",
    ]


def build_rows(
    ingests: dict[tuple[str, str], list[Measurement]],
    finds: dict[str, list[Finds]],
    corpora: list[Corpus],
) -> list[list[str]]:
    rows = []
    for corpus in corpora:
        rates = {
            mode: [corpus.count / m.elapsed for m in ingests.get((mode, corpus.name), []) if m.ok]
            for mode in MODES
        }
        cpu = {
            mode: [m.server_cpu / corpus.count * 1000 for m in ingests.get((mode, corpus.name), []) if m.ok]
            for mode in MODES
        }
        runs = len(ingests.get(("on", corpus.name), []))
        if any(len(r) != runs for r in rates.values()):
            rows.append([f"ingest {corpus.name}", "-", "-", "FAILED", "-"])
        else:
            rows.append(
                _row(f"ingest {corpus.name}, 1 association", rates["on"], rates["off"], "inst/s", True)
            )
            rows.append(_row(f"ingest {corpus.name}, server CPU", cpu["on"], cpu["off"], "ms/inst", False))
    qps = {mode: [f.count / f.elapsed for f in finds.get(mode, []) if not f.errors] for mode in MODES}
    median_ms = {
        mode: [statistics.median(f.latencies) * 1000 for f in finds.get(mode, []) if not f.errors]
        for mode in MODES
    }
    if finds:
        rows.append(_row("C-FIND, 1 association", qps["on"], qps["off"], "queries/s", True))
        rows.append(_row("C-FIND median latency", median_ms["on"], median_ms["off"], "ms", False))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", type=int, default=200, help="CT slices of 512x512x16 bit (default 200)")
    p.add_argument("--small", type=int, default=2000, help="small 64x64x16 bit instances (default 2000)")
    p.add_argument("--finds", type=int, default=1000, help="C-FINDs after the small corpus (default 1000)")
    p.add_argument("--quick", action="store_true", help="no CT, 500 small instances, 200 C-FINDs")
    p.add_argument("--runs", type=int, default=1, help="runs per measurement; the median is reported")
    p.add_argument("--workdir", type=Path, help="where corpora and servers live (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per send (default 1800)")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("--verbose", action="store_true", help="print every error line of failed runs")
    args = p.parse_args(argv)
    if args.quick:
        args.ct, args.small, args.finds = 0, 500, 200
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-audit-bench-")) if owned else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        corpora = []
        if args.small:
            corpora.append(small_corpus(workdir, args.small))
        if args.ct:
            corpora.append(ct_corpus(workdir, args.ct, per_series=100))
        ingests: dict[tuple[str, str], list[Measurement]] = {}
        finds: dict[str, list[Finds]] = {}
        failed = False
        for run in range(args.runs):
            for k, corpus in enumerate(corpora):
                order = MODES if run % 2 == 0 else MODES[::-1]
                count = args.finds if k == 0 else 0  # queries once per run, after the small corpus
                for mode, (m, f) in measure_pair(corpus, order, workdir, count, args.timeout).items():
                    ingests.setdefault((mode, corpus.name), []).append(m)
                    if f is not None:
                        finds.setdefault(mode, []).append(f)
                    state = "FAILED"
                    if m.ok:
                        cpu_ms = m.server_cpu / corpus.count * 1000
                        state = f"{corpus.count / m.elapsed:,.0f} inst/s ({cpu_ms:.2f} CPU ms/inst)"
                    if f is not None:
                        state += (
                            f", {f.count / f.elapsed:,.0f} C-FIND/s" if not f.errors else ", C-FIND FAILED"
                        )
                    console.print(f"run {run + 1}: {corpus.name} audit {mode}: {state}")
                    problems = m.errors + (f.errors if f is not None else [])
                    failed = failed or bool(problems) or (count > 0 and f is None)
                    if problems and args.verbose:
                        for error in problems:
                            console.print(f"  {error}")
        version = version_line([str(SAFEPACS), "--version"]) + git_revision()
        title = f"Audit recording on vs off ({version}, median of {args.runs} run(s))"
        rows = build_rows(ingests, finds, corpora)
        console.print(rich_table(rows, title, HEADERS))
        if args.markdown:
            args.markdown.write_text(markdown_table(rows, title, HEADERS))
        return 1 if failed else 0
    finally:
        if owned:
            remove_tree(workdir)


if __name__ == "__main__":
    sys.exit(main())
