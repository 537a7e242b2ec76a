"""``safepacs scan`` and ``safepacs doctor``: the scanner's command lines.

* ``scan TARGET... [--targets-file FILE] [--ports LIST]``: what a stranger can do with the DICOM and
  DICOMweb services of address ranges you own.  Reports hold counts, never patient data.
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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepacs.errors import SafePacsError

if TYPE_CHECKING:
    from safepacs.app import Repositories

__all__ = ["add_parsers", "cmd_doctor", "cmd_scan"]

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2

# Kept here so that building the parser does not import the scanner (pynetdicom, httpx: 0.6 s);
# tests/test_scan.py checks they equal safepacs.scan's.
FORMATS = ("text", "json", "sarif", "html")
SEVERITIES = ("critical", "high", "medium", "low", "info")
DEFAULT_PORTS = (80, 104, 443, 2761, 2762, 4242, 8042, 8080, 8443, 11112)


class ScanUsageError(SafePacsError):
    """A wrong scan or doctor command line."""


def _output_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--format", choices=FORMATS, default="text", help="report format (default text: a table)")
    sp.add_argument("--out", metavar="FILE", help="write the report to FILE (mode 0600) instead of stdout")
    sp.add_argument(
        "--fail-on",
        default="high",
        choices=[*SEVERITIES, "none"],
        help="exit 1 when a finding is at or above this severity (default high)",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")


def add_parsers(sub: Any, data_opt: Any) -> None:
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
    _output_options(sp)

    sp = sub.add_parser(
        "doctor", help="review this SafePACS: settings, file permissions, peers, accounts, and its listeners"
    )
    data_opt(sp)
    sp.add_argument(
        "--dicom-port", type=int, metavar="N", help="check this DICOM port (default: the setting)"
    )
    sp.add_argument("--http-port", type=int, metavar="N", help="check this HTTPS port (default: the setting)")
    sp.add_argument("--no-network", action="store_true", help="review the configuration only")
    sp.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="seconds per probe step (default 3)"
    )
    _output_options(sp)


class _Bar:
    """A rich progress bar fed by the scanner's hook (from its threads too)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task = progress.add_task("Scanning", total=0)

    def add(self, n: int) -> None:
        total = self.progress.tasks[0].total or 0
        self.progress.update(self.task, total=total + n)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def _emit(args: argparse.Namespace, report: Any) -> int:
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
            raise ScanUsageError(
                f"cannot write {path} ({exc.strerror or exc}); choose another --out"
            ) from exc
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


def cmd_scan(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from safepacs.scan import ScanOptions, parse_ports, parse_target, read_targets_file, run_scan
    from safepacs.scan.engine import ProgressHook

    targets = [parse_target(t) for t in args.targets]
    if args.targets_file:
        targets += read_targets_file(Path(args.targets_file))
    if not targets:
        raise ScanUsageError("nothing to scan: give a TARGET (host, host:port, CIDR) or --targets-file FILE")
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
    return _emit(args, report)


def _read_only_repositories(url: str) -> Repositories:
    """The index opened for reading only: its schema is checked, never created or upgraded (the doctor
    changes nothing, and runs on a read-only data directory).  SQLite is opened with ``mode=ro``,
    PostgreSQL sessions with ``default_transaction_read_only``."""
    from urllib.parse import quote

    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    import safepacs.db
    from safepacs.app import open_repositories
    from safepacs.errors import IndexError_

    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        path = Path(parsed.database).resolve()
        if not path.is_file():
            raise IndexError_(f"the index {path} does not exist; 'safepacs doctor' does not create it")
        query = {**parsed.query, "mode": "ro", "uri": "true"}
        parsed = parsed.set(database=f"file:{quote(str(path))}", query=query)
    elif parsed.get_backend_name() == "postgresql":
        # Every transaction of this connection read-only: the server refuses a write, whatever runs.
        options = parsed.query.get("options", "")
        options = " ".join(options) if isinstance(options, tuple) else options
        read_only = f"{options} -c default_transaction_read_only=on".strip()
        parsed = parsed.update_query_dict({"options": read_only})
    url = parsed.render_as_string(hide_password=False)
    head = ScriptDirectory(str(Path(safepacs.db.__file__).parent / "migrations")).get_current_head()
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.SQLAlchemyError as exc:
        raise IndexError_(
            f"the index cannot be read ({type(exc).__name__}): no schema, or index.url is wrong; "
            "'safepacs doctor' does not create or change it"
        ) from exc
    finally:
        engine.dispose()
    if version != head:
        raise IndexError_(
            f"the index schema is at revision {version}, this SafePACS expects {head}; 'safepacs doctor' "
            "does not change it: upgrade it with 'safepacs serve' (run once), then run the doctor again"
        )
    return open_repositories(url)


def cmd_doctor(args: argparse.Namespace) -> int:
    from safepacs.app import audit_reserve, check_index_choice, free_space
    from safepacs.config import data_dir_from, load_settings
    from safepacs.errors import DataDirError
    from safepacs.scan.doctor import AccountInfo, DiskInfo, DoctorInput, run_doctor

    data = data_dir_from(args.data)
    if not (data / "safepacs.toml").is_file():
        raise DataDirError(
            f"{data} is not a SafePACS data directory; create it with 'safepacs init --data {data}'"
        )
    for port in (args.dicom_port, args.http_port):
        if port is not None and not 0 < port < 65536:
            raise ScanUsageError("--dicom-port and --http-port must be between 1 and 65535")
    settings = load_settings(data)
    check_index_choice(settings, record=False)  # the doctor writes nothing
    repos = _read_only_repositories(settings.index_url)
    directory = repos.directory
    try:
        peers = directory.list_peers()
        accounts = []
        for user in directory.list_users():
            state = directory.get_login_state(user.name)
            accounts.append(
                AccountInfo(
                    user.name,
                    frozenset(user.roles),
                    user.disabled,
                    user.must_change_password,
                    state is not None and state.totp_secret is not None,
                )
            )
    finally:
        repos.close()
    reserve = audit_reserve(settings)
    disk = DiskInfo(
        [(str(path), free, needed) for path, free, needed in free_space(settings, reserve).below()],
        str(reserve.path) if reserve is not None else None,
        reserve.held() if reserve is not None else None,
    )
    report = run_doctor(
        DoctorInput(settings, peers, accounts, disk),
        dicom_port=args.dicom_port,
        http_port=args.http_port,
        network=not args.no_network,
        timeout=args.timeout,
    )
    return _emit(args, report)
