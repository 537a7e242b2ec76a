"""``safepacs import PATH...``: store DICOM files and folders through the same path as C-STORE.

Exit status 0 when everything was stored or already present, 1 when a file was rejected or not stored
(other content under the same UID), 2 when the disk filled up (the rest is not imported).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    UsageError,
    add_data_option,
    err,
    settings_of,
)
from safepacs.errors import SafePacsError, StorageFullError

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser("import", help="store DICOM files and folders through the same path as C-STORE")
    add_data_option(sp)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.set_defaults(handler=run)


def _iter_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{raw} is neither a file nor a folder")
    return files


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rich.progress import Progress

    from safepacs._memory import keep_large_buffers
    from safepacs.app import open_archive, upgrade_index
    from safepacs.services.audit import StoreBatch, operator
    from safepacs.types import IngestOutcome, Principal, PrincipalKind

    settings = settings_of(args)
    files = _iter_files(args.paths)
    keep_large_buffers()
    upgrade_index(settings)
    archive = open_archive(settings)
    principal = Principal(kind=PrincipalKind.SYSTEM, name="safepacs import", user=operator("import").user_id)
    batch = StoreBatch()
    conflict = "not stored (other content under the same UID)"
    counts = {"stored": 0, "already present": 0, "replaced": 0, conflict: 0}
    rejected: list[tuple[Path, str]] = []
    full: StorageFullError | None = None
    try:
        with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task("Importing", total=len(files))
            for path in files:
                try:
                    result = archive.ingest.ingest_file(principal, path.read_bytes(), batch=batch)
                except StorageFullError as exc:  # the rest would be refused the same way
                    full = exc
                    break
                except SafePacsError as exc:
                    rejected.append((path, str(exc)))
                except OSError as exc:
                    rejected.append((path, f"cannot read the file ({exc.strerror})"))
                else:
                    key = {
                        IngestOutcome.STORED: "stored",
                        IngestOutcome.DUPLICATE: "already present",
                        IngestOutcome.REPLACED: "replaced",
                        IngestOutcome.CONFLICT: conflict,
                    }[result.outcome]
                    counts[key] += 1
                progress.advance(task)
        archive.ingest.end_batch(principal, batch, imported=True)
    finally:
        archive.close()
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    done = sum(counts.values()) + len(rejected)
    of = f"{done} of {len(files)}" if done < len(files) else f"{len(files)}"
    print(f"Imported {of} files: {summary}, {len(rejected)} rejected", file=sys.stderr)
    for path, reason in rejected:
        print(f"  rejected {path}: {reason}", file=sys.stderr)
    if full is not None:
        err(f"import stopped, {len(files) - done} files not imported: {full}")
        return EXIT_ERROR
    return EXIT_REFUSED if rejected or counts[conflict] else EXIT_OK
