"""Driving the web UI's pages in-process like a browser would: sign in, keep the session cookie, read a
page's form token and post its forms from this site's origin."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.ui import COOKIE, form_token
from tests.support.webapp import PASSWORD, AppClient

__all__ = ["ORIGIN", "Browser", "form_token", "shown_once"]

ORIGIN = "https://testserver"
_ONCE = re.compile(r'<code class="secret" id="shown-once">([^<]*)</code>')


def shown_once(page: str) -> str:
    """The value a result page shows once (a one-time password, a token, a TOTP secret)."""
    found = _ONCE.search(page)
    assert found is not None, "the page shows no secret"
    return html.unescape(found.group(1))


@dataclass
class Browser:
    """One person's browser: their session cookie and user agent, sent with every request."""

    client: AppClient
    user_agent: str = "safepacs-tests-browser/1.0"
    cookie: str = ""
    token: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        out = {"User-Agent": self.user_agent}
        if self.cookie:
            out["Cookie"] = f"{COOKIE}={self.cookie}"
        return {**out, **(extra or {})}

    def sign_in(self, name: str, password: str = PASSWORD, totp: str = "") -> httpx.Response:
        """POST the sign-in form; keeps the session cookie when it is set."""
        r = self.client.post(
            "/login",
            data={"username": name, "password": password, "totp": totp, "next": "/studies"},
            headers=self._headers({"Origin": ORIGIN}),
        )
        for header in r.headers.get_list("set-cookie"):
            if header.startswith(COOKIE + "=") and "Max-Age=0" not in header:
                self.cookie = header.split(";", 1)[0].split("=", 1)[1]
        return r

    def get(self, path: str) -> httpx.Response:
        r = self.client.get(path, headers=self._headers())
        if r.status_code == 200 and "form_token" in r.text:
            self.token = form_token(r.text)
        return r

    def post(
        self, path: str, data: dict[str, str], *, origin: str | None = ORIGIN, with_token: bool = True
    ) -> httpx.Response:
        """POST a page's form (with the form token last read from a page, unless ``with_token`` is
        False; from ``origin``, or with no Origin header when None)."""
        if with_token and not self.token:
            self.get("/studies")
        fields: dict[str, Any] = {**data, **({"form_token": self.token} if with_token else {})}
        extra = {"Origin": origin} if origin is not None else {}
        return self.client.post(path, data=fields, headers=self._headers(extra))
