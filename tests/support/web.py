"""DICOMweb over HTTPS against a running ``safepacs serve``: the ``web`` server fixture, tokens and users
made with the CLI, an HTTPS client trusting the local CA, and multipart/related bodies both ways."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from tests.support.dicom_client import associate
from tests.support.server import Server, run_cli, start_server


def _token(data: Path, user: str, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert run_cli("token", "create", "--user", user, "--data", str(data), *extra) == 0
    return capsys.readouterr().out.strip()


def _user(data: Path, name: str, role: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("user", "add", name, "--role", role, "--data", str(data)) == 0
    capsys.readouterr()


@pytest.fixture
def web(data_dir: Path) -> Iterator[Server]:
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        yield srv
    finally:
        srv.stop()


def _client(srv: Server, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    verify = ssl.create_default_context(cafile=str(srv.ca_file))
    return httpx.Client(base_url=srv.base_url, verify=verify, headers=headers, timeout=20)


def _store(srv: Server, datasets: list[Dataset]) -> None:
    srv.add_peer("CT1", "store")
    with associate(srv.port, [build_context(CTImageStorage)], calling="CT1") as assoc:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related answer."""
    media = response.headers["content-type"]
    assert media.startswith("multipart/related")
    boundary = media.split("boundary=")[1].strip('"').encode()
    out = []
    for chunk in response.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        ctype = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type")
        )
        out.append((ctype, body[:-2] if body.endswith(b"\r\n") else body))
    return out


def _multipart_body(files: list[bytes], boundary: str = "safepacs-test-boundary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
        for f in files
    )
    return (
        body + b"--" + boundary.encode() + b"--\r\n",
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )
