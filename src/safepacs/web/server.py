"""The HTTPS listener: one process running uvicorn on a socket the parent bound, TLS 1.2 or newer,
with the server certificate ``safepacs init`` issued."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

from safepacs.config import Settings

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["bind_https", "run_https"]

log = logging.getLogger(__name__)


def bind_https(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def run_https(
    settings: Settings,
    sock: socket.socket,
    open_archive: Callable[[Settings], Archive],
    setup: Callable[[], None],
) -> None:
    """Serve DICOMweb until SIGTERM/SIGINT (uvicorn finishes the requests in progress)."""
    from safepacs.web.app import create_app

    setup()
    archive = open_archive(settings)
    keys = settings.keys_dir
    config = uvicorn.Config(
        create_app(archive),
        ssl_certfile=str(keys / "server.pem"),
        ssl_keyfile=str(keys / "server.key"),
        log_config=None,
        access_log=False,  # URLs carry patient names and IDs in their query strings
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.server.shutdown_grace) or None,
        h11_max_incomplete_event_size=64 * 1024,
    )
    config.load()
    assert config.ssl is not None
    config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        archive.close()
