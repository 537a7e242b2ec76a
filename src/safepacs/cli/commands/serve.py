"""``safepacs serve``: run the archive (DICOM, DICOM TLS and HTTPS listeners) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import UsageError, add_data_option, settings_of
from safepacs.errors import SafePacsError
from safepacs.types import Peer, TlsMode

if TYPE_CHECKING:
    from safepacs.audit.events import Participant
    from safepacs.cli._common import Subparsers
    from safepacs.config import Settings

__all__ = ["plain_peer_warning", "register", "run"]


def register(sub: Subparsers) -> None:
    sp = sub.add_parser("serve", help="run the archive (DICOM and HTTPS listeners) until SIGTERM/SIGINT")
    add_data_option(sp)
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
    sp.set_defaults(handler=run)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs._memory import keep_large_buffers
    from safepacs._net import bind_listener
    from safepacs.app import configure_logging, open_archive
    from safepacs.audit.recorder import operator
    from safepacs.audit.syslog import check_collectors
    from safepacs.db import migrate
    from safepacs.protocols.dicomweb.server import run_https
    from safepacs.protocols.dimse.server import serve
    from safepacs.protocols.dimse.tls import ensure_client_certificate

    ports = {
        "dicom_port": args.dicom_port,
        "dicom_tls_port": args.dicom_tls_port,
        "http_port": args.http_port,
    }
    settings = settings_of(args, {"server": {"bind": args.bind, **ports}})
    configure_logging(args.log_level, json=args.log_format == "json")
    keep_large_buffers()  # before the workers fork: they inherit it
    migrate(settings.index_url)
    archive = open_archive(settings)  # fail here, once, with a clear message, not in every worker
    launcher = operator("serve")
    try:
        peers = archive.index.list_peers()
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


def _record_activity(settings: Settings, launcher: Participant, *, start: bool) -> None:
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


def plain_peer_warning(peers: Iterable[Peer]) -> str | None:
    """The posture warning when the plain DICOM port is on a non-loopback address: which peers may use
    it (``--tls off``), or None when none may."""
    plain = sorted(p.ae_title for p in peers if p.tls is TlsMode.OFF)
    if not plain:
        return None
    return (
        f"plain DICOM port on a non-loopback address, serving {len(plain)} peer(s) registered --tls off "
        f"({', '.join(plain[:10])}{', ...' if len(plain) > 10 else ''}): their traffic is not encrypted; "
        "move them to DICOM TLS with 'safepacs peer cert' when they support it"
    )
