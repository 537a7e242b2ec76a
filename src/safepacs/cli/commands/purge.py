"""``safepacs purge``: destroy deleted instances whose retention period has ended (``--now``: all)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, add_data_option, settings_of

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser("purge", help="destroy deleted instances whose retention period has ended")
    add_data_option(sp)
    sp.add_argument("--now", action="store_true", help="destroy every deleted instance now, retention or not")
    sp.set_defaults(handler=run)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.app import open_archive, upgrade_index
    from safepacs.services.audit import operator

    settings = settings_of(args)
    upgrade_index(settings)
    archive = open_archive(settings)
    try:
        report = archive.delete.purge(everything=args.now, who=operator("purge"))
    finally:
        archive.close()
    print(
        f"Purged {report.instances} deleted instances ({report.bytes / 1e6:.1f} MB destroyed)",
        file=sys.stderr,
    )
    return EXIT_OK
