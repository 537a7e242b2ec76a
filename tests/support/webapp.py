"""The DICOMweb application in-process (httpx's ASGI transport, or uvicorn over TLS on 127.0.0.1)
on a real data directory."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn
from anyio.from_thread import BlockingPortal, start_blocking_portal
from pydicom.dataset import Dataset

from safepacs.app import Archive, open_archive
from safepacs.auth.passwords import hash_password
from safepacs.config import load_settings
from safepacs.protocols.webui.site import create_site
from safepacs.runtime.posture import configuration_review
from safepacs.types import Principal, PrincipalKind

PASSWORD = "correct horse battery"


class AppClient:
    """A synchronous face on an ``httpx.AsyncClient`` over the ASGI app (run in a blocking portal).

    It keeps no cookies between requests: tests send the ``Cookie`` header themselves.
    """

    def __init__(self, portal: BlockingPortal, client: httpx.AsyncClient) -> None:
        self._portal = portal
        self._client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._portal.call(partial(self._client.request, method, url, **kwargs))
        finally:
            self._client.cookies.clear()

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)


@contextmanager
def inprocess(data: Path) -> Iterator[tuple[AppClient, Archive]]:
    """A client of the app built from ``data``'s settings (and the SAFEPACS_ environment)."""
    archive = open_archive(load_settings(data))
    site = create_site(archive, review=configuration_review)  # as the HTTPS process builds it
    transport = httpx.ASGITransport(app=site, client=("127.0.0.1", 40000))
    client = httpx.AsyncClient(transport=transport, base_url="https://testserver", timeout=30)
    try:
        with start_blocking_portal() as portal:
            yield AppClient(portal, client), archive
            portal.call(client.aclose)
    finally:
        archive.close()


@contextmanager
def served(app: Any, keys: Path) -> Iterator[str]:
    """``app`` under uvicorn over real TLS (the data directory's server certificate) on a port of
    127.0.0.1, in a thread: its base URL.  For routes not yet in ``safepacs serve``'s app."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        ssl_certfile=str(keys / "server.pem"),
        ssl_keyfile=str(keys / "server.key"),
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def add_user(archive: Archive, name: str, roles: str, *, must_change: bool = False) -> None:
    archive.directory.add_user(
        name, hash_password(PASSWORD), frozenset(roles.split(",")), must_change_password=must_change
    )


def execute(data: Path, statement: sa.Executable) -> None:
    """Change the index directly (to age a session or a lockout)."""
    engine = sa.create_engine(f"sqlite:///{data / 'index.sqlite3'}")
    try:
        with engine.begin() as conn:
            conn.execute(statement)
    finally:
        engine.dispose()


def part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def store(archive: Archive, ds: Dataset) -> None:
    archive.ingest.ingest_file(Principal(kind=PrincipalKind.SYSTEM, name="test"), part10(ds))


def multipart(files: list[bytes], boundary: str = "safepacs-test-boundary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
        for f in files
    )
    return (
        body + b"--" + boundary.encode() + b"--\r\n",
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )
