"""One module per ``safepacs`` command: each registers its parser (``register``), whose default
``handler`` runs it; :mod:`safepacs.cli._main` dispatches to that handler, once.  Commands call the
services (:mod:`safepacs.services.admin` for administrative changes), never the database."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from safepacs.cli.commands import (
    access,
    audit,
    doctor,
    import_,
    init,
    peer,
    purge,
    restore,
    scan,
    serve,
    token,
    trash,
    user,
    viewer,
)

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["REGISTRATIONS"]

#: In the order ``safepacs --help`` lists the commands.
REGISTRATIONS: tuple[Callable[[Subparsers], None], ...] = (
    init.register,
    serve.register,
    peer.register,
    user.register,
    token.register,
    access.register,
    trash.register,
    restore.register,
    purge.register,
    audit.register,
    scan.register,
    doctor.register,
    import_.register,
    viewer.register,
)
