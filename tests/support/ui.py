"""Signing in to the web UI in-process (:func:`tests.support.webapp.inprocess`) and reading its pages.

The client keeps no cookies: :func:`sign_in` returns the ``Cookie`` header of the new session, which a
test sends itself.  Posts from pages carry the site's own ``Origin`` (:data:`ORIGIN`) and the page's
form token (:func:`form_token`).
"""

from __future__ import annotations

import html
import re

from tests.support.webapp import PASSWORD, AppClient

__all__ = ["COOKIE", "ORIGIN", "form_token", "sign_in", "text_of"]

COOKIE = "__Host-safepacs_session"
ORIGIN = {"Origin": "https://testserver"}
_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')
_TAGS = re.compile(r"<[^>]+>")


def sign_in(client: AppClient, name: str, *, password: str = PASSWORD, totp: str = "") -> dict[str, str]:
    """Sign ``name`` in through the sign-in form; the headers that carry the session."""
    r = client.post(
        "/login",
        data={"username": name, "password": password, "totp": totp, "next": "/studies"},
        headers=ORIGIN,
    )
    assert r.status_code == 303, r.text
    cookie = r.headers["set-cookie"].split(";")[0]
    assert cookie.startswith(f"{COOKIE}=")
    return {"Cookie": cookie}


def form_token(page: str) -> str:
    """The form token of a page's forms."""
    found = _TOKEN.search(page)
    assert found is not None, "the page has no form token"
    return found.group(1)


def text_of(page: str) -> str:
    """A page's text as a reader sees it: tags dropped, entities decoded, white space collapsed."""
    return " ".join(html.unescape(_TAGS.sub(" ", page)).split())
