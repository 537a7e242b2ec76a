"""``safepacs viewer``: the OHIF viewer the web UI serves at ``/viewer``.

* ``viewer install [--tarball FILE] [--to DIR]``: ``npm pack`` the pinned ``@ohif/app`` (or take
  ``FILE``), check it against the registry's integrity, unpack and rewrite it for ``/viewer``; nothing
  to do when that version is installed already.
* ``viewer status``: the version installed, or how to install it.

Neither needs a data directory: the default place is the ``ui.viewer_dir`` setting, read from the data
directory's ``safepacs.toml`` and the environment when there is one, else its default (inside the
Python environment).  Exit status: 0 done (or installed), 1 ``status`` finds none, 2 an error (no npm,
a tarball that is not the pinned one).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, EXIT_REFUSED, add_data_option

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser("viewer", help="install the OHIF viewer the web UI serves at /viewer")
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    ins = actions.add_parser(
        "install",
        help="fetch the pinned OHIF viewer with npm, check its integrity, and install it",
        description="Downloads @ohif/app with 'npm pack' unless --tarball names it, refuses it unless "
        "its SHA-512 is the registry's pinned integrity, and installs its built files.",
    )
    ins.add_argument("--tarball", metavar="FILE", help="the @ohif/app tarball ('npm pack' made elsewhere)")
    ins.add_argument("--to", metavar="DIR", help="install here (default: the ui.viewer_dir setting)")
    add_data_option(ins)
    ins.set_defaults(handler=_install)
    st = actions.add_parser("status", help="the OHIF version installed, if any")
    st.add_argument("--to", metavar="DIR", help="look here (default: the ui.viewer_dir setting)")
    add_data_option(st)
    st.set_defaults(handler=_status)


def _viewer_dir(args: argparse.Namespace) -> Path:
    """``--to``, else the setting; an uninitialised data directory is no error (its defaults hold)."""
    if args.to:
        return Path(args.to)
    from safepacs.config import data_dir_from, load_settings

    return load_settings(data_dir_from(args.data)).viewer_dir


def _install(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.protocols.webui.ohif import OHIF_PACKAGE, install

    target = _viewer_dir(args)
    started = time.monotonic()
    done = install(target, Path(args.tarball) if args.tarball else None)
    if done.already:
        print(f"{OHIF_PACKAGE} {done.version} is installed in {done.directory} already")
    else:
        took = time.monotonic() - started
        print(f"installed {OHIF_PACKAGE} {done.version} in {done.directory} ({took:.0f} s)")
    return EXIT_OK


def _status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.protocols.webui.ohif import INSTALL_HINT, OHIF_PACKAGE, installed_version

    target = _viewer_dir(args)
    version = installed_version(target)
    if version is None:
        print(f"{target}: {INSTALL_HINT}")
        return EXIT_REFUSED
    print(f"{OHIF_PACKAGE} {version} is installed in {target}")
    return EXIT_OK
