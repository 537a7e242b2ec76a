"""The HTTPS listener: one process running uvicorn on a socket the parent bound, TLS 1.2 or newer,
with the server certificate ``safepacs init`` issued."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

import uvicorn

from safepacs._memory import freeze_start_up
from safepacs.audit.syslog import start_forwarders
from safepacs.config import Settings

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["run_https"]

log = logging.getLogger(__name__)

PURGE_INTERVAL = 3600.0  # seconds between purges of the trash whose retention has ended


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
    freeze_start_up()
    assert config.ssl is not None
    config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    config.ssl.set_ciphers("ECDHE+AESGCM")  # TLS 1.2: the BCP 195 / PS3.15 B.12 suites only
    stop = threading.Event()
    # The audit trail goes to the configured collectors from this process only (one thread each).
    forwarders = start_forwarders(archive.index, settings, stop)
    purger = threading.Thread(target=_purge_loop, args=(archive, stop), name="safepacs-purge", daemon=True)
    purger.start()
    try:
        _Server(config).run(sockets=[sock])
    finally:
        stop.set()
        purger.join(30)
        for forwarder in forwarders:
            forwarder.join(15)
        archive.close()


def _purge_loop(archive: Archive, stop: threading.Event) -> None:
    """Destroy deleted instances once their retention has ended: at start and then hourly."""
    while not stop.is_set():
        try:
            archive.delete.purge()
        except Exception as exc:  # noqa: BLE001 - a failed purge is retried next hour; serving goes on
            log.error(  # no traceback: it could carry the values of the statement that failed
                "purging the trash failed; retrying in an hour", extra={"error": type(exc).__name__}
            )
        stop.wait(PURGE_INTERVAL)


class _Server(uvicorn.Server):
    """uvicorn, letting the stop signals through only once its own handlers are in place (the
    process starts with them blocked, so a SIGTERM during start-up waits instead of being lost)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            yield
