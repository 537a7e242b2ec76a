"""``safepacs serve``: run the archive (DICOM, DICOM TLS and HTTPS listeners) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import add_data_option, settings_of
from safepacs.types import Peer, TlsMode

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

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
    import logging

    from safepacs.app import configure_logging
    from safepacs.runtime.supervisor import bind_https, prepare
    from safepacs.runtime.supervisor import run as supervise

    ports = {
        "dicom_port": args.dicom_port,
        "dicom_tls_port": args.dicom_tls_port,
        "http_port": args.http_port,
    }
    settings = settings_of(args, {"server": {"bind": args.bind, **ports}})

    def setup() -> None:
        configure_logging(args.log_level, json=args.log_format == "json")

    setup()
    peers = prepare(settings)
    plain_warning = plain_peer_warning(peers)
    if not _is_loopback(settings.server.bind) and plain_warning:
        logging.getLogger("safepacs.posture").warning(plain_warning, extra={"address": settings.server.bind})

    https = bind_https(settings)
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

    return supervise(settings, https=https, setup=setup, ready=ready)


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
