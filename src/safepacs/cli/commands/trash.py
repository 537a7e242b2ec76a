"""``safepacs trash``: deleted instances whose bytes are still kept, and until when."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, add_data_option, admin_service

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser("trash", help="list deleted instances whose bytes are still kept")
    add_data_option(sp)
    sp.set_defaults(handler=run)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    with admin_service(args) as admin:
        records = admin.trash()
    if not records:
        print("The trash is empty.", file=sys.stderr)
    for r in records:
        print(
            f"{r.deleted_at:%Y-%m-%d %H:%M}  {r.deleted_by:<16}  purge after {r.purge_after:%Y-%m-%d %H:%M}  "
            f"study {r.study_instance_uid}  instance {r.sop_instance_uid}"
        )
    return EXIT_OK
