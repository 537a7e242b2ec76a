"""``safepacs restore STUDY_UID``: put a deleted study back while its retention period lasts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, add_data_option, settings_of
from safepacs.services.admininput import study_uid

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser("restore", help="put a deleted study back while its retention period lasts")
    add_data_option(sp)
    sp.add_argument("study_uid", metavar="STUDY_UID")
    sp.set_defaults(handler=run)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.app import open_archive, upgrade_index
    from safepacs.services.audit import operator

    settings = settings_of(args)
    upgrade_index(settings)
    archive = open_archive(settings)
    try:
        report = archive.restore.restore(study_uid(args.study_uid), operator("restore"))
    finally:
        archive.close()
    kept = f"; {report.kept} kept in the trash (stored again since)" if report.kept else ""
    print(f"Restored {report.restored} instances of study {args.study_uid}{kept}", file=sys.stderr)
    return EXIT_OK
