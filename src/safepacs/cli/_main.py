"""``safepacs``: init, serve, peer, user, token, access, import, trash, purge.

Exit status: 0 success, 1 the command ran but something was refused (e.g. an import rejection),
2 usage, configuration or runtime errors.  Errors are one sentence on standard error, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepacs import __version__
from safepacs.cli._access import add_parsers as add_access_parsers
from safepacs.cli._access import cmd_access, cmd_purge, cmd_restore, cmd_trash
from safepacs.cli._accounts import add_parsers as add_account_parsers
from safepacs.cli._accounts import cmd_token, cmd_user
from safepacs.cli._audit import add_parsers as add_audit_parsers
from safepacs.cli._audit import cmd_audit
from safepacs.cli._changes import change_of, record_change
from safepacs.cli._peers import (
    add_cert_parsers,
    add_security_options,
    cmd_peer_cert,
    cmd_peer_revoke,
    describe_security,
    peer_security,
    plain_peer_warning,
    record_pinned,
)
from safepacs.cli._scan import add_parsers as add_scan_parsers
from safepacs.cli._scan import cmd_doctor, cmd_scan
from safepacs.errors import SafePacsError, StorageFullError

if TYPE_CHECKING:
    from safepacs.app import Repositories

__all__ = ["main"]

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class UsageError(SafePacsError):
    """The command line is wrong."""


def _err(message: str) -> None:
    print(f"safepacs: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safepacs", description="A PACS that is secure with zero configuration.")
    p.add_argument("--version", action="version", version=f"safepacs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--data", metavar="DIR", help="data directory (default $SAFEPACS_DATA or ./safepacs-data)"
        )

    sp = sub.add_parser("init", help="create a new data directory: settings, keys, CA, index, admin account")
    data_opt(sp)

    sp = sub.add_parser("serve", help="run the archive (DICOM and HTTPS listeners) until SIGTERM/SIGINT")
    data_opt(sp)
    sp.add_argument("--bind", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    sp.add_argument(
        "--dicom-port", type=int, metavar="N", help="DICOM port (default 11112; 0 picks a free one)"
    )
    sp.add_argument(
        "--dicom-tls-port", type=int, metavar="N", help="DICOM TLS port (default 2762; 0 picks a free one)"
    )
    sp.add_argument(
        "--http-port",
        type=int,
        metavar="N",
        help="HTTPS port for DICOMweb (default 8443; 0 picks a free one)",
    )
    sp.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sp.add_argument(
        "--log-format",
        default="console",
        choices=["console", "json"],
        help="log lines for people (default) or one JSON object per line",
    )

    peer = sub.add_parser("peer", help="register, list and remove DICOM peers").add_subparsers(
        dest="peer_command", required=True, metavar="ACTION"
    )
    sp = peer.add_parser("add", help="register a peer: AE title, its host, the services it may use")
    data_opt(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    sp.add_argument(
        "--host", required=True, metavar="HOST_OR_CIDR", help="IP address, CIDR network or host name"
    )
    sp.add_argument(
        "--port", type=int, metavar="N", help="port the peer listens on (needed as a C-MOVE destination)"
    )
    sp.add_argument(
        "--allow", required=True, metavar="SERVICES", help="comma list of echo,store,find,get,move"
    )
    sp.add_argument(
        "--user",
        metavar="NAME",
        help="the user this AE acts for: it gets no more than that user's rights and sees what they see",
    )
    add_security_options(sp)
    sp = peer.add_parser("list", help="list registered peers")
    data_opt(sp)
    sp = peer.add_parser("remove", help="remove a registered peer")
    data_opt(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    add_cert_parsers(peer, data_opt)

    add_account_parsers(sub, data_opt)
    add_access_parsers(sub, data_opt)
    add_audit_parsers(sub, data_opt)
    add_scan_parsers(sub, data_opt)

    sp = sub.add_parser("import", help="store DICOM files and folders through the same path as C-STORE")
    data_opt(sp)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    return p


def _settings(args: argparse.Namespace, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    """The settings of an initialised data directory (a clear error otherwise)."""
    from safepacs.app import check_data_dir
    from safepacs.config import data_dir_from, load_settings

    settings = load_settings(data_dir_from(args.data), overrides)
    check_data_dir(settings)
    return settings


def _cmd_init(args: argparse.Namespace) -> int:
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from safepacs._memory import keep_large_buffers
    from safepacs._net import bind_listener
    from safepacs.app import configure_logging, open_archive
    from safepacs.audit.recorder import operator
    from safepacs.audit.syslog import check_collectors
    from safepacs.db.database import migrate
    from safepacs.protocols.dicomweb.server import run_https
    from safepacs.protocols.dimse.server import serve
    from safepacs.protocols.dimse.tls import ensure_client_certificate

    ports = {
        "dicom_port": args.dicom_port,
        "dicom_tls_port": args.dicom_tls_port,
        "http_port": args.http_port,
    }
    settings = _settings(args, {"server": {"bind": args.bind, **ports}})
    configure_logging(args.log_level, json=args.log_format == "json")
    keep_large_buffers()  # before the workers fork: they inherit it
    migrate(settings.index_url)
    archive = open_archive(settings)  # fail here, once, with a clear message, not in every worker
    launcher = operator("serve")
    try:
        peers = archive.directory.list_peers()
        if archive.reserve is not None:
            archive.reserve.ensure()  # the audit trail's disk space: created, or refilled after use
    finally:
        archive.close()
    ensure_client_certificate(settings.keys_dir, settings.server.ae_title)  # for C-MOVE to TLS peers
    check_collectors(settings)  # the audit collectors' CA and client certificate files
    plain_warning = plain_peer_warning(peers)
    if not _is_loopback(settings.server.bind) and plain_warning:
        import logging

        logging.getLogger("safepacs.posture").warning(plain_warning, extra={"address": settings.server.bind})

    try:
        https = bind_listener(settings.server.bind, settings.server.http_port)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {settings.server.bind}:{settings.server.http_port} ({exc.strerror}); "
            "choose another --bind or --http-port"
        ) from exc
    https_host, https_port = https.getsockname()[:2]

    def ready(plain: tuple[str, int], tls: tuple[str, int]) -> None:
        print(
            f"SafePACS listening for DICOM on {plain[0]}:{plain[1]} as AE title {settings.server.ae_title}",
            flush=True,
        )
        print(
            f"SafePACS listening for HTTPS (DICOMweb at /dicomweb) on {https_host}:{https_port}", flush=True
        )
        print(f"SafePACS listening for DICOM TLS on {tls[0]}:{tls[1]}", flush=True)

    def setup() -> None:
        configure_logging(args.log_level, json=args.log_format == "json")

    def run_web() -> None:
        run_https(settings, https, open_archive, setup)

    _record_activity(settings, launcher, start=True)  # nothing is served unless this is recorded
    try:
        return serve(
            settings, open_archive, setup=setup, ready=ready, companions=[("safepacs-https", run_web)]
        )
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {settings.server.bind}:{settings.server.dicom_port} ({exc.strerror}); "
            "choose another --bind or --dicom-port"
        ) from exc
    finally:
        _record_activity(settings, launcher, start=False)


def _record_activity(settings: Any, launcher: Any, *, start: bool) -> None:
    """Application Start or Stop (110100), checkpointed.  A start that cannot be recorded stops
    ``serve`` (SafePacsError); a stop that cannot be recorded is logged (it has stopped anyway)."""
    import logging

    from safepacs.app import open_archive

    try:
        archive = open_archive(settings)
        try:
            archive.auditor.application(launcher, start=start)
        finally:
            archive.close()
    except SafePacsError as exc:
        if start:
            raise
        logging.getLogger("safepacs.audit").error(
            "the application stop could not be recorded", extra={"error": type(exc).__name__}
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _parse_allow(text: str) -> frozenset[Any]:
    from safepacs.types import DIMSE_SERVICES

    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--allow needs at least one of echo,store,find,get,move")
    known = {s.value: s for s in DIMSE_SERVICES}
    bad = [n for n in names if n not in known]
    if bad:
        raise UsageError(f"unknown service {bad[0]!r} in --allow; use echo,store,find,get,move")
    return frozenset(known[n] for n in names)


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_network(host, strict=False))
    except ValueError:
        pass
    if _HOSTNAME_RE.match(host):
        return host.lower()
    raise UsageError(f"--host {host!r} is neither an IP address, a CIDR network nor a host name")


def _open_repositories(args: argparse.Namespace) -> Repositories:
    from safepacs.app import open_repositories
    from safepacs.db.database import migrate

    settings = _settings(args)
    migrate(settings.index_url)
    return open_repositories(settings.index_url)


def _cmd_peer(args: argparse.Namespace) -> int:
    from safepacs.config._settings import validate_ae_title
    from safepacs.types import Peer

    if args.peer_command == "add":
        try:
            ae_title = validate_ae_title(args.ae_title)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.port is not None and not 0 < args.port < 65536:
            raise UsageError("--port must be between 1 and 65535")
        security, pinned_pem = peer_security(args)
        peer = Peer(
            ae_title, _check_host(args.host), args.port, _parse_allow(args.allow), args.user, **security
        )
    repos = _open_repositories(args)
    directory = repos.directory
    try:
        if args.peer_command == "add":
            if peer.user is not None and directory.get_user(peer.user) is None:
                raise UsageError(f"no user named {peer.user!r}; add one with 'safepacs user add'")
            directory.add_peer(peer)
            record_pinned(directory, peer, pinned_pem)
            acting = f", acting for user {peer.user}" if peer.user else ""
            print(
                f"Peer {peer.ae_title} registered: host {peer.host}, "
                f"allowed {','.join(sorted(peer.allow))}{acting}{describe_security(peer, ', ')}",
                file=sys.stderr,
            )
        elif args.peer_command == "cert":
            return cmd_peer_cert(args, directory, _settings(args).keys_dir)
        elif args.peer_command == "revoke-cert":
            return cmd_peer_revoke(args, directory)
        elif args.peer_command == "remove":
            directory.remove_peer(args.ae_title.strip())
            print(f"Peer {args.ae_title.strip()} removed", file=sys.stderr)
        else:
            peers = directory.list_peers()
            if not peers:
                print(
                    "No peers registered: nothing can connect. Add one with 'safepacs peer add'.",
                    file=sys.stderr,
                )
            for p in peers:
                port = p.port if p.port is not None else "-"
                user = f"  user {p.user}" if p.user else ""
                allow = ",".join(sorted(p.allow))
                print(f"{p.ae_title:<16}  {p.host:<24}  {port!s:<5}  {allow}{user}{describe_security(p)}")
    finally:
        repos.close()
    return EXIT_OK


def _cmd_access(args: argparse.Namespace) -> int:
    repos = _open_repositories(args)
    try:
        if args.command == "access":
            return cmd_access(args, repos.directory)
        return cmd_trash(args, repos.instances)
    finally:
        repos.close()


def _cmd_audit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    repos = _open_repositories(args)
    try:
        return cmd_audit(args, repos.audit_log, settings)
    finally:
        repos.close()


def _cmd_with_archive(args: argparse.Namespace) -> int:
    from safepacs.app import open_archive
    from safepacs.db.database import migrate

    settings = _settings(args)
    migrate(settings.index_url)
    archive = open_archive(settings)
    try:
        return (cmd_purge if args.command == "purge" else cmd_restore)(args, archive)
    finally:
        archive.close()


def _cmd_accounts(args: argparse.Namespace) -> int:
    repos = _open_repositories(args)
    try:
        return (cmd_user if args.command == "user" else cmd_token)(args, repos.directory)
    finally:
        repos.close()


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


def _cmd_import(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from safepacs._memory import keep_large_buffers
    from safepacs.app import open_archive
    from safepacs.audit.recorder import StoreBatch, operator
    from safepacs.db.database import migrate
    from safepacs.types import IngestOutcome, Principal

    settings = _settings(args)
    files = _iter_files(args.paths)
    keep_large_buffers()
    migrate(settings.index_url)
    archive = open_archive(settings)
    principal = Principal(kind="system", name="safepacs import", user=operator("import").user_id)
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
        _err(f"import stopped, {len(files) - done} files not imported: {full}")
        return EXIT_ERROR
    return EXIT_REFUSED if rejected or counts[conflict] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # everything SafePACS creates (index WAL files, objects, keys) is private to its user
    args = _parser().parse_args(argv)
    handlers = {
        "init": _cmd_init,
        "serve": _cmd_serve,
        "peer": _cmd_peer,
        "user": _cmd_accounts,
        "token": _cmd_accounts,
        "import": _cmd_import,
        "access": _cmd_access,
        "trash": _cmd_access,
        "purge": _cmd_with_archive,
        "restore": _cmd_with_archive,
        "audit": _cmd_audit,
        "scan": cmd_scan,
        "doctor": cmd_doctor,
    }
    try:
        status = handlers[args.command](args)
        if status == EXIT_OK and change_of(args) is not None:
            try:
                record_change(args, list(sys.argv[1:] if argv is None else argv), _settings(args))
            except SafePacsError as exc:
                _err(f"the change was made but could not be recorded on the audit trail: {exc}")
                return EXIT_ERROR
        return status
    except UsageError as exc:
        _err(str(exc))
        return EXIT_ERROR
    except SafePacsError as exc:
        _err(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a one-line message, never a traceback, for the user
        _err(f"unexpected internal error ({type(exc).__name__}: {exc}); please report it")
        return EXIT_ERROR
