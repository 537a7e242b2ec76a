"""``safepacs doctor [--data DIR]``: the local SafePACS (settings, files, peers, accounts) and its
listeners, reported like ``safepacs scan`` (:mod:`safepacs.cli.commands.scan`).  It changes nothing:
the index is opened read-only."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import UsageError, add_data_option
from safepacs.cli.commands.scan import emit, output_options

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser(
        "doctor", help="review this SafePACS: settings, file permissions, peers, accounts, and its listeners"
    )
    add_data_option(sp)
    sp.add_argument(
        "--dicom-port", type=int, metavar="N", help="check this DICOM port (default: the setting)"
    )
    sp.add_argument("--http-port", type=int, metavar="N", help="check this HTTPS port (default: the setting)")
    sp.add_argument("--no-network", action="store_true", help="review the configuration only")
    sp.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="seconds per probe step (default 3)"
    )
    output_options(sp)
    sp.set_defaults(handler=run)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.app import audit_reserve, check_index_choice, free_space, open_repositories_read_only
    from safepacs.config import data_dir_from, load_settings
    from safepacs.errors import DataDirError
    from safepacs.runtime.posture import doctor_input
    from safepacs.scan.doctor import run_doctor

    data = data_dir_from(args.data)
    if not (data / "safepacs.toml").is_file():
        raise DataDirError(
            f"{data} is not a SafePACS data directory; create it with 'safepacs init --data {data}'"
        )
    for port in (args.dicom_port, args.http_port):
        if port is not None and not 0 < port < 65536:
            raise UsageError("--dicom-port and --http-port must be between 1 and 65535")
    settings = load_settings(data)
    check_index_choice(settings, record=False)  # the doctor writes nothing
    reserve = audit_reserve(settings)
    repos = open_repositories_read_only(settings.index_url)
    try:
        inp = doctor_input(settings, repos.directory, free_space(settings, reserve), reserve)
    finally:
        repos.close()
    report = run_doctor(
        inp,
        dicom_port=args.dicom_port,
        http_port=args.http_port,
        network=not args.no_network,
        timeout=args.timeout,
    )
    return emit(args, report)
