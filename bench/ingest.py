"""Ingest benchmark: DCMTK storescu -> SafePACS, Orthanc and DCMTK storescp, over 1 and N associations.

    .venv/bin/python bench/ingest.py --quick            # 100 CT slices + 500 small instances, 1 run
    .venv/bin/python bench/ingest.py --runs 3           # 1,000 + 5,000, median of 3 runs
    .venv/bin/python bench/ingest.py --base /tmp/base --targets safepacs,orthanc   # and an earlier commit

Every measurement starts its receiver on an empty storage directory, sends the whole corpus with
``storescu`` (one process per association, the files split into contiguous groups, TCP_NODELAY=1) and
times from the start of the first storescu to the exit of the last. A measurement counts only if every
storescu exited 0, logged no error and the receiver holds exactly the instances sent afterwards.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import (
    CALLING_AET,
    GOOD_RESPONSE,
    HOST,
    ORTHANC,
    SAFEPACS,
    Corpus,
    Measurement,
    Orthanc,
    OrthancNagle,
    Receiver,
    SafePacs,
    StoreScp,
    dcmtk,
    git_revision,
    make_corpus,
    markdown_table,
    nodelay_env,
    remove_tree,
    running,
    settle_page_cache,
    split,
    version_line,
)
from rich.console import Console
from rich.table import Table

TARGETS: dict[str, type[Receiver]] = {
    "safepacs": SafePacs,
    "orthanc": Orthanc,
    "orthanc-nagle": OrthancNagle,
    "storescp": StoreScp,
    "safepacs-base": SafePacs,  # the code of --base (its src/ first on PYTHONPATH)
}
AETS = {
    "safepacs": "SAFEPACS",
    "safepacs-base": "SAFEPACS",
    "orthanc": "ORTHANC",
    "orthanc-nagle": "ORTHANC",
    "storescp": "STORESCP",
}
LABELS = {
    "safepacs": "SafePACS",
    "orthanc": "Orthanc",
    "orthanc-nagle": "Orthanc, Nagle on",
    "storescp": "DCMTK storescp",
    "safepacs-base": "SafePACS (base)",
}


BASE_SRC = Path()  # set from --base
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def send(corpus: Corpus, receiver: Receiver, associations: int, timeout: float) -> Measurement:
    """Send ``corpus`` to ``receiver`` with ``associations`` storescu processes at once."""
    storescu = dcmtk("storescu")
    logs = [receiver.workdir / f"storescu-{k}.log" for k in range(associations)]
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    cpu_before = receiver.cpu_seconds()
    start = time.perf_counter()
    groups = split(corpus.files, associations)
    for group, log_path in zip(groups, logs, strict=False):
        argv = [
            storescu, "-v", "-nh", "-R", "-aet", CALLING_AET, "-aec", receiver.aet,
            HOST, str(receiver.port), *group,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, cwd=corpus.root, env=nodelay_env(), stdout=log, stderr=log)
        procs.append((proc, log_path))
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
        # With -nh storescu exits 0 even when stores fail; its -v log has one response line per instance.
        lines = log_path.read_text(errors="replace").splitlines()
        errors.extend(line for line in lines if line.startswith(("E:", "F:")))
        responses = [line for line in lines if line.startswith("I: Received Store Response (")]
        good = [line for line in responses if line.startswith(GOOD_RESPONSE)]
        acked += len(good)
        failed = Counter(
            line.removeprefix("I: Received Store Response ") for line in responses if line not in good
        )
        errors.extend(f"{n} x store failed {status}" for status, n in failed.items())
        if len(responses) < len(group):
            errors.append(f"{len(group) - len(responses)} of {len(group)} instances got no response")
    stored = receiver.stored()
    if stored != corpus.count:
        errors.append(f"the receiver holds {stored} instances, {corpus.count} were sent")
    return Measurement(elapsed, corpus.count, stored, errors, cpu, acked)


def measure(
    target: str, corpus: Corpus, associations: int, workdir: Path, env: dict[str, str], timeout: float
) -> Measurement:
    settle_page_cache(corpus)
    rundir = Path(tempfile.mkdtemp(prefix=f"{target}-{corpus.name}-x{associations}-", dir=workdir))
    if target == "safepacs-base":
        env = {**env, "PYTHONPATH": str(BASE_SRC)}
    receiver = TARGETS[target](name=target, aet=AETS[target], workdir=rundir, env=env)
    try:
        with running(receiver):
            result = send(corpus, receiver, associations, timeout)
        if not result.ok:
            tail = receiver.log_tail(8)
            if tail:
                result.errors.append(f"{target} log tail:\n{tail}")
        return result
    except Exception as exc:
        return Measurement(0.0, corpus.count, 0, [f"{type(exc).__name__}: {exc}"])
    finally:
        remove_tree(rundir)


def versions(targets: list[str]) -> str:
    parts = []
    if "safepacs" in targets:
        parts.append(version_line([str(SAFEPACS), "--version"]) + git_revision())
    if any(t.startswith("orthanc") for t in targets):
        parts.append(version_line([str(ORTHANC), "--version"]).replace(str(ORTHANC), "Orthanc"))
    parts.append(version_line([dcmtk("storescu"), "--version"]).strip("$ ").replace("dcmtk: ", "DCMTK "))
    return ", ".join(parts)


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def build_rows(
    results: dict[tuple[str, str, int], list[Measurement]],
    corpora: list[Corpus],
    associations: list[int],
    targets: list[str],
) -> list[list[str]]:
    rows = []
    for corpus in corpora:
        for assoc in associations:
            medians: dict[str, float] = {}
            for target in targets:
                runs = results.get((target, corpus.name, assoc), [])
                if runs and all(m.ok for m in runs):
                    medians[target] = statistics.median(m.elapsed for m in runs)
            for target in targets:
                runs = results.get((target, corpus.name, assoc), [])
                label = [corpus.name, str(assoc), LABELS[target]]
                if target not in medians:
                    failed = [m for m in runs if not m.ok]
                    nacked = sum(m.sent - m.acked for m in failed)
                    note = f"FAILED {len(failed)}/{len(runs)} runs, {nacked:,} stores not acknowledged"
                    rows.append([*label, "failed", "-", "-", "-", note])
                    continue
                elapsed = medians[target]
                rate = corpus.count / elapsed
                mbps = corpus.total_bytes / elapsed / 1e6
                ratio = f"{medians['orthanc'] / elapsed:.2f}" if "orthanc" in medians else "-"
                cpu = statistics.median(m.server_cpu for m in runs) / corpus.count * 1000
                spread = "-"
                if len(runs) > 1:
                    rates = sorted(corpus.count / m.elapsed for m in runs)
                    spread = f"{fmt_rate(rates[0])}-{fmt_rate(rates[-1])}"
                rows.append([*label, fmt_rate(rate), f"{mbps:,.1f}", ratio, f"{cpu:.2f}", spread])
    return rows


HEADERS = ["corpus", "assoc", "receiver", "inst/s", "MB/s", "x Orthanc", "srv CPU ms/inst", "runs inst/s"]


def print_table(rows: list[list[str]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i in (0, 2, 7) else "right")
    previous = None
    for row in rows:
        if previous is not None and row[:2] != previous:
            table.add_section()
        previous = row[:2]
        table.add_row(*row)
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", type=int, default=1000, help="CT slices of 512x512x16 bit (default 1000)")
    p.add_argument("--small", type=int, default=5000, help="small 64x64x16 bit instances (default 5000)")
    p.add_argument("--quick", action="store_true", help="100 CT slices and 500 small instances")
    p.add_argument("--runs", type=int, default=1, help="runs per measurement; the median is reported")
    p.add_argument("--associations", default="1,4", help="comma-separated association counts (default 1,4)")
    p.add_argument(
        "--targets", default="safepacs,orthanc,storescp", help="comma-separated: safepacs,orthanc,storescp"
    )
    p.add_argument(
        "--workdir", type=Path, help="where corpora and receivers live (default: a temp dir, removed at exit)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (corpora) at exit")
    p.add_argument("--safepacs-workers", type=int, help="sets SAFEPACS_SERVER__WORKERS (default: CPU count)")
    p.add_argument(
        "--safepacs-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for SafePACS"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per send (default 1800)")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("--verbose", action="store_true", help="print every error line of failed runs")
    p.add_argument(
        "--base",
        type=Path,
        help="a checkout of the code to compare with (e.g. a git worktree of an earlier commit): adds the"
        " target safepacs-base, run from its src/, interleaved with the others",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.ct, args.small = 100, 500
    args.associations = [int(a) for a in args.associations.split(",") if a]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.base is not None:
        global BASE_SRC
        BASE_SRC = args.base.resolve() / "src"
        if not (BASE_SRC / "safepacs").is_dir():
            p.error(f"--base: {args.base} has no src/safepacs")
        if "safepacs-base" not in args.targets:
            after = args.targets.index("safepacs") + 1 if "safepacs" in args.targets else 0
            args.targets.insert(after, "safepacs-base")
    elif "safepacs-base" in args.targets:
        p.error("the target safepacs-base needs --base")
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.runs < 1 or any(a < 1 for a in args.associations):
        p.error("--runs and --associations must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {}
    if args.safepacs_workers:
        env["SAFEPACS_SERVER__WORKERS"] = str(args.safepacs_workers)
    for item in args.safepacs_env:
        key, _, value = item.partition("=")
        env[key] = value

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-bench-")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        corpora = []
        for name, count, size, per_series in (
            ("CT 512", args.ct, 512, 250),
            ("small 64", args.small, 64, 100),
        ):
            if count > 0:
                folder = workdir / f"corpus-{size}-{count}"
                corpora.append(
                    make_corpus(folder, name, count=count, rows=size, cols=size, per_series=per_series)
                )
        for c in corpora:
            console.print(
                f"corpus {c.name}: {c.count:,} instances, {c.total_bytes / 1e6:,.1f} MB in {c.root}"
            )
        console.print(f"corpora ready in {time.perf_counter() - t0:.1f} s")

        load_before = os.getloadavg()[0]
        results: dict[tuple[str, str, int], list[Measurement]] = {}
        for run in range(args.runs):
            for corpus in corpora:
                for assoc in args.associations:
                    for target in args.targets:
                        m = measure(target, corpus, assoc, workdir, env, args.timeout)
                        results.setdefault((target, corpus.name, assoc), []).append(m)
                        head = f"run {run + 1}/{args.runs} {corpus.name:>8} x{assoc} {target:>13}:"
                        if m.ok:
                            console.print(
                                f"{head} {m.sent:,} in {m.elapsed:6.2f} s = {m.sent / m.elapsed:7.1f} inst/s,"
                                f" server CPU {m.server_cpu:.1f} s"
                            )
                        else:
                            console.print(
                                f"{head} [red]FAILED[/red] stored {m.stored:,}/{m.sent:,},"
                                f" {len(m.errors)} error(s)"
                            )
                            for line in m.errors if args.verbose else m.errors[:3]:
                                console.print(f"    {line}", markup=False)

        command = shlex.join(["python", "bench/ingest.py", *(sys.argv[1:] if argv is None else argv)])
        title = f"Ingest: storescu -> receiver, median of {args.runs} run(s)"
        context = (
            f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs ({platform.machine()}),"
            f" load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after,"
            f" {versions(args.targets)}; corpora: "
            + ", ".join(f"{c.count:,} x {c.name} ({c.total_bytes / 1e6:,.1f} MB)" for c in corpora)
            + f"; `{command}`"
        )
        rows = build_rows(results, corpora, args.associations, args.targets)
        console.print()
        console.print(context, markup=False)
        print_table(rows, title)
        if args.markdown:
            args.markdown.write_text(markdown_table(rows, f"{title}. {context}", HEADERS))
        return 0
    finally:
        if own_workdir and not args.keep:
            remove_tree(workdir)
        elif own_workdir:
            console.print(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())
