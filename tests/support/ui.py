"""Using the web UI's pages in-process as a person would: sign in through ``/login``, read a form's
token from a page, post forms with the browser's ``Origin`` (see :mod:`tests.support.webapp`)."""

from __future__ import annotations

import base64
import html
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

from safepacs.app import Archive
from safepacs.auth.totp import code_at
from tests.support.server import run_cli
from tests.support.webapp import PASSWORD, AppClient, add_user

__all__ = [
    "COOKIE",
    "ORIGIN",
    "SESSION_COOKIE",
    "add_admin",
    "enrol_totp",
    "form_token",
    "post_form",
    "sign_in",
    "text_of",
    "totp_now",
]

SESSION_COOKIE = COOKIE = "__Host-safepacs_session"
ORIGIN = {"Origin": "https://testserver"}
_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')
_TAGS = re.compile(r"<[^>]+>")


def sign_in(
    client: AppClient, name: str, *, password: str = PASSWORD, totp: str | None = None, agent: str = ""
) -> dict[str, str]:
    """Sign ``name`` in with the sign-in form; the headers a browser then sends (its session cookie,
    and ``agent`` as its User-Agent when given)."""
    fields = {"username": name, "password": password, "next": "/studies"}
    if totp:
        fields["totp"] = totp
    r = client.post("/login", data=fields, headers=ORIGIN)
    assert r.status_code == 303, r.text
    cookie = r.headers["set-cookie"].split(";")[0]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    headers = {"Cookie": cookie}
    if agent:
        headers["User-Agent"] = agent
    return headers


def add_admin(
    client: AppClient, archive: Archive, data: Path, capsys: pytest.CaptureFixture[str], name: str = "root"
) -> dict[str, str]:
    """An administrator (TOTP enrolled, as administrators must be), signed in: their browser's headers."""
    add_user(archive, name, "admin")
    return sign_in(client, name, totp=totp_now(enrol_totp(data, name, capsys)))


def enrol_totp(data: Path, name: str, capsys: pytest.CaptureFixture[str]) -> bytes:
    """``safepacs user totp-enroll NAME`` as an administrator runs it: the secret of the
    ``otpauth://`` URI it prints, as an authenticator app would read it."""
    capsys.readouterr()
    assert run_cli("user", "totp-enroll", name, "--data", str(data)) == 0
    uri = capsys.readouterr().out.strip()
    encoded = urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)["secret"][0]
    return base64.b32decode(encoded + "=" * (-len(encoded) % 8))


def totp_now(secret: bytes) -> str:
    """The one-time code an authenticator shows now for ``secret``."""
    return code_at(secret, time.time())


def form_token(html: str) -> str:
    """The form token the page's forms carry."""
    found = _TOKEN.search(html)
    assert found is not None, "no form token on the page"
    return found.group(1)


def post_form(client: AppClient, url: str, headers: dict[str, str], **fields: Any) -> httpx.Response:
    """POST a page's form as the browser does (same-origin ``Origin``, urlencoded)."""
    return client.post(url, data={k: str(v) for k, v in fields.items()}, headers={**headers, **ORIGIN})


def text_of(page: str) -> str:
    """A page's text as a reader sees it: tags dropped, entities decoded, white space collapsed."""
    return " ".join(html.unescape(_TAGS.sub(" ", page)).split())
