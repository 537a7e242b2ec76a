"""The web UI's pages in tests: signing in through the form, and reading a page's form token."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.support.webapp import PASSWORD

__all__ = ["COOKIE", "ORIGIN", "form_token", "post_form", "session_cookie", "sign_in"]

COOKIE = "__Host-safepacs_session"
ORIGIN = "https://testserver"  # the in-process app's own origin (tests/support/webapp.py)
_TOKEN = re.compile(r'name="form_token" value="([0-9a-f]{64})"')


def session_cookie(response: httpx.Response) -> str:
    """The ``Cookie`` header value of the session a response opened."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(COOKIE + "=") and "Max-Age=0" not in header:
            return header.split(";")[0]
    raise AssertionError(f"no session cookie in {response.status_code} {response.headers!r}")


def sign_in(client: Any, user: str, password: str = PASSWORD, **fields: str) -> str:
    """Sign in through the sign-in form; the ``Cookie`` header value of the new session."""
    response = client.post(
        "/login", data={"username": user, "password": password, **fields}, headers={"Origin": ORIGIN}
    )
    assert response.status_code == 303, response.text
    return session_cookie(response)


def form_token(html: str) -> str:
    """The form token of a page's forms."""
    found = _TOKEN.search(html)
    assert found is not None, "the page has no form with a form token"
    return found.group(1)


def post_form(
    client: Any, url: str, cookie: str, fields: dict[str, str], token: str | None
) -> httpx.Response:
    """POST ``fields`` as a page's form would (same Origin, the form token when given)."""
    data = dict(fields) if token is None else {**fields, "form_token": token}
    return client.post(url, data=data, headers={"Cookie": cookie, "Origin": ORIGIN})
