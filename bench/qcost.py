"""Per-query fixed cost: server CPU per exact-key C-FIND and QIDO-RS query, this checkout against a base.

    git worktree add --detach /tmp/base-qcost main   # or the commit to compare with
    python bench/qcost.py --base /tmp/base-qcost --workdir /tmp/spbench-qcost --rounds 25   # ~2.5 min
    git worktree remove /tmp/base-qcost

The cost measured here is the one that does not grow with the archive (bench/scale.py shows it flat
from 100,000 to 1,000,000 instances): authentication, the audit record, building the statement, the
request's parsing, TLS and HTTP, pynetdicom.  So a small index is enough: ``--studies`` studies of
bench/scale.py's corpus (default 2,000: 20,000 instances), filled the way bench/scale.py fills it, on
SQLite.  Two ``safepacs serve`` with default settings run at once on copies of the same data directory,
one from this checkout and one from ``--base`` (a checkout of the code to compare with: its ``src`` is
put first on PYTHONPATH); without ``--base`` only this checkout is measured.  Each round sends every
kind of query to both servers in turn, in blocks of ``--queries``, the order of the two alternating
from round to round; ``srv CPU ms/q`` is user+system CPU of the server's process group per query (its
HTTPS process, DIMSE workers and all), the median over ``--rounds`` rounds; ``paired this/base`` the
median of the rounds' own ratios (the two blocks of a round ran back to back, so a busy moment of the
machine hits both).  This VM has no hardware counters (``perf stat -e instructions``: not supported),
so CPU time it is: read the ratios, and give it enough rounds on a busy machine.  Every answer's UIDs are
checked against the corpus.  All traffic is on 127.0.0.1; every process and directory the run made is
removed at exit (Ctrl-C and SIGTERM included), except a ``--workdir``'s filled index, which later
runs reuse.  See bench/README.md, "Where the per-query time goes".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _common import git_revision, markdown_table, remove_tree, rich_table
from scale import (
    BENCH_USER,
    KINDS,
    Corpus,
    FindClient,
    Query,
    Server,
    Target,
    ask,
    console,
    expected,
    run,
)

DEFAULT_KINDS = ("find-study", "find-image", "qido-patient", "qido-series")
HEADERS = [
    "query", "base srv CPU ms/q", "this srv CPU ms/q", "this/base", "paired this/base",
    "rounds (base; this)", "check",
]  # fmt: skip


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


class Side:
    """One server (this checkout or the base) with its C-FIND association and HTTPS connection."""

    def __init__(self, label: str, server: Server, finder: FindClient, web: httpx.Client) -> None:
        self.label, self.server, self.finder, self.web = label, server, finder, web
        self.cpu: dict[str, list[float]] = {}
        self.wrong: list[str] = []


def measure(
    corpus: Corpus, sides: list[Side], kinds: list[str], queries: int, rounds: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    for side in sides:  # warm-up: imports, statement caches, TLS session
        for kind in kinds:
            for s in rng.integers(0, corpus.count, 20):
                ask(kind, corpus, Query(int(s), 0), side.finder, side.web)
    for side in sides:
        side.server.wait_idle()
    for r in range(rounds):
        for kind in kinds:
            picks = [int(s) for s in rng.integers(0, corpus.count, queries)]
            batch = [Query(s, int(rng.integers(0, int(corpus.n_series[s])))) for s in picks]
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                before = side.server.cpu_seconds()
                for q in batch:
                    got = ask(kind, corpus, q, side.finder, side.web)
                    if isinstance(got, str) or sorted(got) != expected(kind, corpus, q):
                        side.wrong.append(
                            f"{kind} study {q.study}: {got if isinstance(got, str) else len(got)}"
                        )
                side.cpu.setdefault(kind, []).append((side.server.cpu_seconds() - before) / queries)
        console.print(f"round {r + 1}/{rounds} done")


def _settings_of_base(data: Path, scratch: Path, env: dict[str, str]) -> None:
    """The base's own default ``safepacs.toml`` in its copy of the data directory: a setting the base
    does not know (one added since) would stop it, and both run on defaults."""
    defaults = scratch / "base-defaults"
    subprocess.run(
        [sys.executable, "-m", "safepacs", "init", "--data", str(defaults)],
        env={**os.environ, **env},
        capture_output=True,
        check=True,
    )
    shutil.copyfile(defaults / "safepacs.toml", data / "safepacs.toml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="a checkout of the code to compare with (its src/ is used)")
    p.add_argument("--workdir", type=Path, help="keep the filled index here for later runs")
    p.add_argument("--studies", type=int, default=2000, help="studies of the index (x10 instances)")
    p.add_argument("--queries", type=int, default=50, help="queries per kind, server and round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma list of " + ",".join(KINDS))
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-qcost-")) if own else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    try:
        corpus = Corpus.make(args.studies, args.seed)
        target = Target("SQLite", corpus, workdir / f"sqlite-{corpus.count}-seed{corpus.seed}", "")
        target.prepare(reload=False)
        labels = ["this"] + (["base"] if args.base else [])
        sides: list[Side] = []
        load_before = os.getloadavg()
        with contextlib.ExitStack() as stack:
            for label in labels:
                data = scratch / f"data-{label}"
                shutil.copytree(target.data, data)
                token = run(["token", "create", "--user", BENCH_USER, "--expires", "1d", "--data", str(data)])
                env = {}
                if label == "base":
                    env["PYTHONPATH"] = str(args.base.resolve() / "src")
                    _settings_of_base(data, scratch, env)
                else:
                    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src")
                server = Server(name=f"serve-{label}", aet="SAFEPACS", workdir=scratch, env=env)
                server.data = data
                stack.callback(server.stop)
                server.start()
                web = stack.enter_context(server.http(token.strip()))
                finder = FindClient(server.port)
                stack.callback(finder.close)
                sides.append(Side(label, server, finder, web))
            measure(corpus, sides, kinds, args.queries, args.rounds, args.seed)
        load_after = os.getloadavg()
        by = {s.label: s for s in sides}
        rows = []
        for kind in kinds:
            this = by["this"].cpu[kind]
            base = by["base"].cpu[kind] if "base" in by else []
            med_this = statistics.median(this) * 1000
            med_base = statistics.median(base) * 1000 if base else float("nan")
            spread = (
                f"{min(base) * 1000:.2f}-{max(base) * 1000:.2f}; " if base else ""
            ) + f"{min(this) * 1000:.2f}-{max(this) * 1000:.2f}"
            wrong = [w for s in sides for w in s.wrong if w.startswith(kind + " ")]
            rows.append(
                [
                    KINDS[kind],
                    f"{med_base:.2f}" if base else "-",
                    f"{med_this:.2f}",
                    f"{med_this / med_base:.2f}" if base else "-",
                    f"{statistics.median(t / b for t, b in zip(this, base, strict=True)):.2f}"
                    if base
                    else "-",
                    spread,
                    "ok" if not wrong else f"{len(wrong)} WRONG",
                ]
            )
        command = shlex.join(["python", "bench/qcost.py", *(sys.argv[1:] if argv is None else argv)])
        context = (
            f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs ({platform.machine()}), load average"
            f" {load_before[0]:.1f} before / {load_after[0]:.1f} after, SafePACS{git_revision()};"
            f" `{command}`,"
            f" {(time.perf_counter() - started) / 60:.1f} min; SQLite, {corpus.instances:,} instances"
        )
        title = (
            f"Server CPU per exact-key query (median of {args.rounds} rounds of {args.queries}, interleaved):"
            " this checkout against --base"
        )
        console.print(context, markup=False)
        console.print(rich_table(rows, title, HEADERS))
        if args.markdown:
            args.markdown.write_text(f"{context}\n\n{markdown_table(rows, title, HEADERS)}")
        return 0 if all(r[-1] == "ok" for r in rows) else 1
    finally:
        remove_tree(scratch)
        if own:
            remove_tree(workdir)


if __name__ == "__main__":
    sys.exit(main())
