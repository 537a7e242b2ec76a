"""DICOM TLS benchmark: ingest over DICOM TLS against plain DICOM, same corpus, same SafePACS, same run.

    .venv/bin/python bench/tls.py --quick            # 100 CT slices + 500 small instances, 1 run
    .venv/bin/python bench/tls.py --runs 3           # 500 + 2,000, median of 3 runs

Each measurement starts SafePACS fresh (``init``; peer BENCH ``--tls off`` for the plain port, peer
BENCHTLS ``--tls required`` with a certificate from ``safepacs peer cert``; ``serve``) on an empty store
and sends the whole corpus with DCMTK ``storescu`` (TCP_NODELAY=1): plain to the DICOM port, or
``+tls key cert +cf ca`` to the DICOM TLS port (DCMTK's default BCP 195 non-downgrading profile, so
TLS 1.3 here).  Plain and TLS alternate within each run, so drift of the machine hits both alike.  A
measurement counts only if every storescu exited 0, every C-STORE was acknowledged with Success or
Warning and the store holds exactly the instances sent.  Target (issue 4): TLS costs under 15% of the
plain throughput.  All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import (
    GOOD_RESPONSE,
    HOST,
    SAFEPACS,
    Corpus,
    Measurement,
    Receiver,
    count_files,
    ct_corpus,
    dcmtk,
    free_port,
    git_revision,
    markdown_table,
    nodelay_env,
    remove_tree,
    rich_table,
    running,
    small_corpus,
    split,
    version_line,
)
from rich.console import Console

PLAIN_AET, TLS_AET = "BENCH", "BENCHTLS"
TARGET_COST = 0.15
MODES = ("plain", "tls")

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


class SafePacsTls(Receiver):
    """``safepacs init`` + a plain and a TLS peer + ``safepacs serve`` in ``workdir/data``."""

    tls_port: int = 0

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def certs(self) -> Path:
        return self.workdir / "bench-cert"

    def start(self) -> None:
        env = {**os.environ, **self.env}
        d = str(self.data)
        for argv in (
            [str(SAFEPACS), "init", "--data", d],
            [str(SAFEPACS), "peer", "add", PLAIN_AET, "--host", HOST, "--allow", "echo,store",
             "--tls", "off", "--data", d],
            [str(SAFEPACS), "peer", "add", TLS_AET, "--host", HOST, "--allow", "echo,store",
             "--tls", "required", "--data", d],
            [str(SAFEPACS), "peer", "cert", TLS_AET, "--out", str(self.certs), "--data", d],
        ):  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(argv[1:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
                )
        self.port, self.tls_port = free_port(), free_port()
        argv = [
            str(SAFEPACS), "serve", "--data", d, "--dicom-port", str(self.port),
            "--dicom-tls-port", str(self.tls_port), "--http-port", str(free_port()),
        ]  # fmt: skip
        self._spawn(argv, env=env)
        self._wait_ready(120, ready="SafePACS listening for DICOM TLS on")

    def stored(self) -> int:
        return count_files(self.data / "objects")


def send(corpus: Corpus, receiver: SafePacsTls, mode: str, associations: int, timeout: float) -> Measurement:
    storescu = dcmtk("storescu")
    if mode == "tls":
        c = receiver.certs
        target = ["+tls", str(c / "key.pem"), str(c / "cert.pem"), "+cf", str(c / "ca.pem"), "-aet", TLS_AET]
        port = receiver.tls_port
    else:
        target, port = ["-aet", PLAIN_AET], receiver.port
    logs = [receiver.workdir / f"storescu-{mode}-{k}.log" for k in range(associations)]
    groups = split(corpus.files, associations)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    cpu_before = receiver.cpu_seconds()
    start = time.perf_counter()
    for group, log_path in zip(groups, logs, strict=False):
        argv = [storescu, "-v", "-nh", "-R", *target, "-aec", "SAFEPACS", HOST, str(port), *group]
        with log_path.open("wb") as log:
            procs.append(
                (subprocess.Popen(argv, cwd=corpus.root, env=nodelay_env(), stdout=log, stderr=log), log_path)
            )
    errors: list[str] = []
    deadline = start + timeout
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.append(f"storescu timed out after {timeout:.0f} s")
    elapsed = time.perf_counter() - start
    cpu = receiver.cpu_seconds() - cpu_before
    acked = 0
    for (proc, log_path), group in zip(procs, groups, strict=True):
        if proc.returncode != 0:
            errors.append(f"storescu exit status {proc.returncode}")
        lines = log_path.read_text(errors="replace").splitlines()
        errors.extend(line for line in lines if line.startswith(("E:", "F:")))
        responses = [line for line in lines if line.startswith("I: Received Store Response (")]
        good = [line for line in responses if line.startswith(GOOD_RESPONSE)]
        acked += len(good)
        failed = Counter(line for line in responses if line not in good)
        errors.extend(f"{n} x {status}" for status, n in failed.items())
        if len(responses) < len(group):
            errors.append(f"{len(group) - len(responses)} of {len(group)} instances got no response")
    stored = receiver.stored()
    if stored != corpus.count:
        errors.append(f"the store holds {stored} instances, {corpus.count} were sent")
    return Measurement(elapsed, corpus.count, stored, errors, cpu, acked)


def measure(
    corpus: Corpus, mode: str, associations: int, workdir: Path, env: dict[str, str], timeout: float
) -> Measurement:
    rundir = Path(tempfile.mkdtemp(prefix=f"tls-{mode}-{corpus.name}-x{associations}-", dir=workdir))
    receiver = SafePacsTls(name="safepacs", aet="SAFEPACS", workdir=rundir, env=env)
    try:
        with running(receiver):
            result = send(corpus, receiver, mode, associations, timeout)
        if not result.ok and receiver.log_tail(8):
            result.errors.append(f"safepacs log tail:\n{receiver.log_tail(8)}")
        return result
    except Exception as exc:  # a failed measurement is reported, not raised
        return Measurement(0.0, corpus.count, 0, [f"{type(exc).__name__}: {exc}"])
    finally:
        remove_tree(rundir)


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


HEADERS = [
    "corpus", "assoc", "plain inst/s", "TLS inst/s", "TLS cost", "plain CPU ms/inst", "TLS CPU ms/inst",
    "target <15%",
]  # fmt: skip


def build_rows(
    results: dict[tuple[str, str, int], list[Measurement]], corpora: list[Corpus], associations: list[int]
) -> list[list[str]]:
    rows = []
    for corpus in corpora:
        for assoc in associations:
            cells: dict[str, tuple[float, float] | None] = {}
            for mode in MODES:
                runs = results.get((mode, corpus.name, assoc), [])
                if runs and all(m.ok for m in runs):
                    elapsed = statistics.median(m.elapsed for m in runs)
                    cpu = statistics.median(m.server_cpu for m in runs) / corpus.count * 1000
                    cells[mode] = (corpus.count / elapsed, cpu)
                else:
                    cells[mode] = None
            plain, secure = cells["plain"], cells["tls"]
            if plain is None or secure is None:
                rows.append([corpus.name, str(assoc), "-", "-", "FAILED", "-", "-", "-"])
                continue
            cost = 1 - secure[0] / plain[0]
            met = "yes" if cost < TARGET_COST else "NO"
            rows.append([
                corpus.name, str(assoc), fmt_rate(plain[0]), fmt_rate(secure[0]), f"{cost:+.1%}",
                f"{plain[1]:.2f}", f"{secure[1]:.2f}", met,
            ])  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", type=int, default=500, help="CT slices of 512x512x16 bit (default 500)")
    p.add_argument("--small", type=int, default=2000, help="small 64x64x16 bit instances (default 2000)")
    p.add_argument("--quick", action="store_true", help="100 CT slices and 500 small instances")
    p.add_argument("--runs", type=int, default=1, help="runs per measurement; the median is reported")
    p.add_argument("--associations", default="1,4", help="comma-separated association counts (default 1,4)")
    p.add_argument("--workdir", type=Path, help="where corpora and servers live (default: a temp dir)")
    p.add_argument("--safepacs-workers", type=int, help="sets SAFEPACS_SERVER__WORKERS (default: CPU count)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per send (default 1800)")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("--verbose", action="store_true", help="print every error line of failed runs")
    args = p.parse_args(argv)
    if args.quick:
        args.ct, args.small = 100, 500
    args.associations = [int(a) for a in args.associations.split(",") if a]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-tls-bench-")) if owned else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"SAFEPACS_SERVER__WORKERS": str(args.safepacs_workers)} if args.safepacs_workers else {}
    try:
        corpora = []
        if args.ct:
            corpora.append(ct_corpus(workdir, args.ct))
        if args.small:
            corpora.append(small_corpus(workdir, args.small))
        results: dict[tuple[str, str, int], list[Measurement]] = {}
        for run in range(args.runs):
            for corpus in corpora:
                for assoc in args.associations:
                    order = MODES if run % 2 == 0 else MODES[::-1]
                    for mode in order:
                        m = measure(corpus, mode, assoc, workdir, env, args.timeout)
                        results.setdefault((mode, corpus.name, assoc), []).append(m)
                        state = f"{corpus.count / m.elapsed:,.0f} inst/s" if m.ok else "FAILED"
                        console.print(f"run {run + 1}: {corpus.name} x{assoc} {mode}: {state}")
                        if not m.ok and args.verbose:
                            for error in m.errors:
                                console.print(f"  {error}")
        version = version_line([str(SAFEPACS), "--version"]) + git_revision()
        title = f"Ingest over DICOM TLS vs plain ({version}, median of {args.runs} run(s))"
        rows = build_rows(results, corpora, args.associations)
        console.print(rich_table(rows, title, HEADERS))
        if args.markdown:
            args.markdown.write_text(markdown_table(rows, title, HEADERS))
        failed = any(not m.ok for runs in results.values() for m in runs)
        return 1 if failed else 0
    finally:
        if owned:
            remove_tree(workdir)


if __name__ == "__main__":
    sys.exit(main())
