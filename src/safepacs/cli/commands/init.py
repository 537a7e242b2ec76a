"""``safepacs init``: create a new data directory (settings, keys, CA, index, admin account)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, add_data_option

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser("init", help="create a new data directory: settings, keys, CA, index, admin account")
    add_data_option(sp)
    sp.set_defaults(handler=run)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.app import ADMIN_PASSWORD_FILE, initialize
    from safepacs.config import data_dir_from

    data_dir = data_dir_from(args.data)
    password = initialize(data_dir)
    print(
        f"Initialised {data_dir}: settings, encryption key, local CA, server certificate, index.",
        file=sys.stderr,
    )
    print(
        "The admin account's one-time password (also in "
        f"{data_dir / ADMIN_PASSWORD_FILE}, mode 0600; it must be changed at first login):",
        file=sys.stderr,
    )
    print(password)
    return EXIT_OK
