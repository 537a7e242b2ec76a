"""What every ``safepacs`` command shares: exit statuses, the ``--data`` option, the settings of the
data directory, the administrative service, and who runs the command."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeAlias

from safepacs.errors import SafePacsError

if TYPE_CHECKING:
    from safepacs.app import Administration
    from safepacs.config import Settings
    from safepacs.services.admin import AdminService, Change
    from safepacs.services.trail import TrailService

    #: The ``add_subparsers`` result a command module registers its parser on.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REFUSED",
    "Handler",
    "UsageError",
    "add_data_option",
    "admin_service",
    "change",
    "err",
    "settings_of",
    "trail_service",
]

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2


class UsageError(SafePacsError):
    """The command line is wrong."""


#: A command's handler: the parsed arguments and the arguments as typed; the exit status.
Handler = Callable[[argparse.Namespace, Sequence[str]], int]


def err(message: str) -> None:
    print(f"safepacs: {message}", file=sys.stderr)


def add_data_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--data", metavar="DIR", help="data directory (default $SAFEPACS_DATA or ./safepacs-data)"
    )


def settings_of(
    args: argparse.Namespace, overrides: dict[str, dict[str, str | int | None]] | None = None
) -> Settings:
    """The settings of an initialised data directory (a clear error otherwise); ``overrides``: settings
    given on the command line, by section (None values: not given)."""
    from safepacs.app import check_data_dir
    from safepacs.config import data_dir_from, load_settings

    settings = load_settings(data_dir_from(args.data), overrides)
    check_data_dir(settings)
    return settings


@contextlib.contextmanager
def _administration(args: argparse.Namespace) -> Iterator[Administration]:
    from safepacs.app import open_admin, upgrade_index

    settings = settings_of(args)
    upgrade_index(settings)
    administration = open_admin(settings)
    try:
        yield administration
    finally:
        administration.close()


@contextlib.contextmanager
def admin_service(args: argparse.Namespace) -> Iterator[AdminService]:
    """The administrative service of ``--data``'s archive, its index created or upgraded first."""
    with _administration(args) as administration:
        yield administration.admin


@contextlib.contextmanager
def trail_service(args: argparse.Namespace) -> Iterator[TrailService]:
    """Reading the audit trail of ``--data``'s archive, its index created or upgraded first."""
    with _administration(args) as administration:
        yield administration.trail


def change(command: str, argv: Sequence[str]) -> Change:
    """Who makes a change with ``safepacs COMMAND ...`` and the command line, for the audit trail."""
    from safepacs.services.admin import Change
    from safepacs.services.audit import operator

    return Change(operator(command), "safepacs " + shlex.join(argv))
