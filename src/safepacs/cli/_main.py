"""``safepacs``: init, serve, peer, user, token, access, trash, restore, purge, audit, scan, doctor,
import, viewer.

Each command is one module of :mod:`safepacs.cli.commands`; this builds the parser from them and runs
the one asked for.  Exit status: 0 success, 1 the command ran but something was refused (e.g. an import
rejection), 2 usage, configuration or runtime errors.  Errors are one sentence on standard error, never
a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from safepacs import __version__
from safepacs.cli._common import EXIT_ERROR, Handler, err
from safepacs.cli.commands import REGISTRATIONS
from safepacs.errors import SafePacsError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safepacs", description="A PACS that is secure with zero configuration.")
    p.add_argument("--version", action="version", version=f"safepacs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRATIONS:
        register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # everything SafePACS creates (index WAL files, objects, keys) is private to its user
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args, list(sys.argv[1:] if argv is None else argv))
    except SafePacsError as exc:
        err(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a one-line message, never a traceback, for the user
        err(f"unexpected internal error ({type(exc).__name__}: {exc}); please report it")
        return EXIT_ERROR
