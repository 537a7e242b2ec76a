"""Using the web UI's pages in-process as a person would: sign in through ``/login``, read a form's
token from a page, post forms with the browser's ``Origin`` (see :mod:`tests.support.webapp`)."""

from __future__ import annotations

import base64
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

__all__ = ["ORIGIN", "SESSION_COOKIE", "add_admin", "form_token", "post_form", "sign_in"]

SESSION_COOKIE = "__Host-safepacs_session"
ORIGIN = {"Origin": "https://testserver"}
_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')


def sign_in(client: AppClient, name: str, *, totp: str | None = None, agent: str = "") -> dict[str, str]:
    """Sign ``name`` in with the sign-in form; the headers a browser then sends (its session cookie,
    and ``agent`` as its User-Agent when given)."""
    fields = {"username": name, "password": PASSWORD, "next": "/studies"}
    if totp is not None:
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
    capsys.readouterr()
    assert run_cli("user", "totp-enroll", name, "--data", str(data)) == 0
    uri = capsys.readouterr().out.strip()
    encoded = urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)["secret"][0]
    secret = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
    return sign_in(client, name, totp=code_at(secret, time.time()))


def form_token(html: str) -> str:
    """The form token the page's forms carry."""
    found = _TOKEN.search(html)
    assert found is not None, "no form token on the page"
    return found.group(1)


def post_form(client: AppClient, url: str, headers: dict[str, str], **fields: Any) -> httpx.Response:
    """POST a page's form as the browser does (same-origin ``Origin``, urlencoded)."""
    return client.post(url, data={k: str(v) for k, v in fields.items()}, headers={**headers, **ORIGIN})
