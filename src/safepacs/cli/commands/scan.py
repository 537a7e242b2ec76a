"""``safepacs scan``: the scanner's command line, and the report options ``doctor`` shares.

* ``scan TARGET... [--targets-file FILE] [--ports LIST] [--save-to-data DIR]``: what a stranger can do
  with the DICOM and DICOMweb services of address ranges you own.  Reports hold counts, never patient
  data; ``--save-to-data`` also keeps the report as ``DIR/reports/scan-latest.json`` for the web UI's
  posture page.
* ``doctor [--data DIR]``: the local SafePACS (settings, files, peers, accounts) and its listeners.

Both print a table on the terminal (``--format text``) or write ``--format json|sarif|html`` to
standard output or ``--out FILE``.  Exit status: 0 nothing at or above ``--fail-on`` (default high),
1 something is (this wins), 2 usage or runtime errors (an unresolvable target, a probe of an open
endpoint that failed or timed out; a closed port is none).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.cli._common import UsageError

if TYPE_CHECKING:
    from rich.progress import Progress

    from safepacs.cli._common import Subparsers
    from safepacs.scan import ScanReport

__all__ = ["DEFAULT_PORTS", "FORMATS", "SEVERITIES", "emit", "output_options", "register", "run"]

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2

# Kept here so that building the parser does not import the scanner (pynetdicom, httpx: 0.6 s);
# tests/interop/test_scan.py checks they equal safepacs.scan's.
FORMATS = ("text", "json", "sarif", "html")
SEVERITIES = ("critical", "high", "medium", "low", "info")
DEFAULT_PORTS = (80, 104, 443, 2761, 2762, 4242, 8042, 8080, 8443, 11112)


def output_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--format", choices=FORMATS, default="text", help="report format (default text: a table)")
    sp.add_argument("--out", metavar="FILE", help="write the report to FILE (mode 0600) instead of stdout")
    sp.add_argument(
        "--fail-on",
        default="high",
        choices=[*SEVERITIES, "none"],
        help="exit 1 when a finding is at or above this severity (default high)",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")


def register(sub: Subparsers) -> None:
    sp = sub.add_parser(
        "scan",
        help="scan address ranges you own for exposed DICOM and DICOMweb services (counts only, never PHI)",
        description="Only scan networks you are responsible for.  Reports hold counts, never patient data.",
    )
    sp.add_argument(
        "targets", nargs="*", metavar="TARGET", help="host, host:port, [IPv6]:port or CIDR network"
    )
    sp.add_argument("--targets-file", metavar="FILE", help="more targets, one per line (# comments)")
    sp.add_argument(
        "--ports",
        metavar="LIST",
        help=f"ports and ranges, e.g. 104,11112,8000-8100 (default {','.join(map(str, DEFAULT_PORTS))})",
    )
    sp.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="seconds per probe step (default 3)"
    )
    sp.add_argument(
        "--connect-timeout",
        type=float,
        default=1.5,
        metavar="S",
        help="seconds per TCP connect (default 1.5)",
    )
    sp.add_argument(
        "--rate",
        type=float,
        default=500.0,
        metavar="N",
        help="new connections/requests per second (0: no limit)",
    )
    sp.add_argument(
        "--concurrency", type=int, default=256, metavar="N", help="TCP connects at once (default 256)"
    )
    sp.add_argument(
        "--workers", type=int, default=8, metavar="N", help="endpoints probed at once (default 8)"
    )
    sp.add_argument(
        "--called-ae",
        action="append",
        default=[],
        metavar="AE",
        help="also try this called AE title (repeatable)",
    )
    sp.add_argument(
        "--guess-ae", action="store_true", help="also try a short built-in list of called AE titles"
    )
    sp.add_argument("--calling-ae", metavar="AE", help="calling AE title (default: a random one)")
    sp.add_argument(
        "--intrusive",
        action="store_true",
        help="C-STORE one synthetic test object where storage is accepted (it stays in the archive)",
    )
    sp.add_argument(
        "--try-default-credentials", action="store_true", help="try Orthanc's default login orthanc:orthanc"
    )
    sp.add_argument(
        "--find-cap", type=int, default=1000, metavar="N", help="stop counting (C-CANCEL) after N matches"
    )
    sp.add_argument("--ca-file", metavar="FILE", help="PEM CA certificates to trust besides the system's")
    sp.add_argument(
        "--max-addresses",
        type=int,
        default=65536,
        metavar="N",
        help="refuse targets larger than this (a /16)",
    )
    sp.add_argument(
        "--save-to-data",
        metavar="DIR",
        help="also keep the report (JSON, mode 0600) in this SafePACS data directory as "
        "reports/scan-latest.json, for the web UI's posture page",
    )
    output_options(sp)
    sp.set_defaults(handler=run)


def _saved_report_file(option: str) -> Path:
    """Where ``--save-to-data DIR`` keeps the report (``Settings.scan_report_file``), checked before
    the scan starts so that a long scan does not fail at its end."""
    from safepacs.config import load_settings

    data = Path(option)
    if not (data / "safepacs.toml").is_file():
        raise UsageError(f"{data} is not a SafePACS data directory; give --save-to-data the server's --data")
    return load_settings(data).scan_report_file


def _save(report: ScanReport, path: Path) -> None:
    """Write the report as JSON to ``path`` (mode 0600, its folder 0700), replacing the previous one at
    once: the posture page never reads half a report.  The report holds counts and the scanner's own
    words, never patient data (:mod:`safepacs.scan`), so it may sit beside the index."""
    from safepacs.scan.report import render

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render(report, "json"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise UsageError(f"cannot save the report to {path} ({exc.strerror or exc})") from exc
    print(f"Report saved to {path} (shown on the posture page).", file=sys.stderr)


class _Bar:
    """A rich progress bar fed by the scanner's hook (from its threads too)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("Scanning", total=0)

    def add(self, n: int) -> None:
        total = self.progress.tasks[0].total or 0
        self.progress.update(self.task, total=total + n)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def emit(args: argparse.Namespace, report: ScanReport) -> int:
    """Write or print ``report`` as ``--format``/``--out`` say; the exit status ``--fail-on`` gives."""
    from rich.console import Console

    from safepacs.scan import Severity
    from safepacs.scan.report import print_table, render

    if args.out:
        path = Path(args.out)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(render(report, args.format))
        except OSError as exc:
            raise UsageError(f"cannot write {path} ({exc.strerror or exc}); choose another --out") from exc
        print(f"Report written to {path} ({args.format}).", file=sys.stderr)
        if sys.stdout.isatty():
            print_table(report, Console())
    elif args.format == "text":
        print_table(report, Console(width=None if sys.stdout.isatty() else 160))
    else:
        sys.stdout.write(render(report, args.format))
        sys.stdout.flush()
    errors = report.runtime_errors()
    if errors and (args.out or args.format != "text"):  # the table lists them itself
        more = f" (and {len(errors) - 1} more, listed in the report)" if len(errors) > 1 else ""
        print(f"safepacs: not scanned completely: {errors[0]}{more}", file=sys.stderr)
    # 1 wins over 2: what was found matters more than what could not be looked at.
    worst = report.worst()
    if args.fail_on != "none" and worst is not None and worst >= Severity.parse(args.fail_on):
        return EXIT_FOUND
    return EXIT_ERROR if errors else EXIT_OK


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from safepacs.scan import ScanOptions, parse_ports, parse_target, read_targets_file, run_scan
    from safepacs.scan.engine import ProgressHook

    targets = [parse_target(t) for t in args.targets]
    if args.targets_file:
        targets += read_targets_file(Path(args.targets_file))
    if not targets:
        raise UsageError("nothing to scan: give a TARGET (host, host:port, CIDR) or --targets-file FILE")
    saved = _saved_report_file(args.save_to_data) if args.save_to_data else None
    options = ScanOptions(
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        rate=args.rate,
        concurrency=args.concurrency,
        workers=args.workers,
        called_aes=tuple(a.strip() for a in args.called_ae),
        guess_ae=args.guess_ae,
        calling_ae=(args.calling_ae or "").strip(),
        intrusive=args.intrusive,
        try_default_credentials=args.try_default_credentials,
        find_cap=args.find_cap,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        max_addresses=args.max_addresses,
    )
    if args.ports:
        options = replace(options, ports=parse_ports(args.ports))
    show = sys.stderr.isatty() and not args.no_progress
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not show) as progress:
        hook: ProgressHook = _Bar(progress)
        report = run_scan(targets, options, hook)
    if saved is not None:
        _save(report, saved)
    return emit(args, report)
