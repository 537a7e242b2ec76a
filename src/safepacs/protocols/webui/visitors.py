"""Who is on a page, and the checks every form post passes.

A page needs a login session (the ``__Host-safepacs_session`` cookie of :mod:`safepacs.auth.login`);
without one the browser is sent to the sign-in page, which brings it back afterwards (``next``, a
local path only).  Bearer tokens are for the API: pages ignore them.

Every POST from a page is checked twice against cross-site request forgery:

* its ``Origin`` header (which browsers send with every POST) must be this server's own origin; and
* once signed in, its ``form_token`` field must be the session's form token
  (:meth:`safepacs.auth.login.LoginService.form_token`).

The session cookie is ``SameSite=Strict`` besides, so a cross-site form never carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qs, quote

from fastapi import Request

from safepacs.auth.login import LoginService
from safepacs.auth.policy import user_principal
from safepacs.protocols.dicomweb.security import SESSION_COOKIE, client_address, user_agent
from safepacs.protocols.webui.render import PageError
from safepacs.records import SessionRecord, UserRecord
from safepacs.types import Principal, Service

__all__ = ["MAX_FORM_BYTES", "SignInRequired", "Visitor", "checked_form", "local_path", "visitor_of"]

MAX_FORM_BYTES = 16 * 1024


@dataclass(frozen=True)
class Visitor:
    """A signed-in person on a page: their principal (as the services see it), session and user."""

    principal: Principal
    session: SessionRecord
    user: UserRecord
    form_token: str

    @property
    def name(self) -> str:
        return self.user.name

    def has(self, role: str) -> bool:
        return role in self.user.roles

    @property
    def may_search(self) -> bool:
        """Whether the person's roles search studies (the Studies page and its navigation)."""
        return Service.FIND in self.principal.allow


class SignInRequired(Exception):
    """No live session: the answer sends the browser to the sign-in page, then back to ``next``."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path

    @property
    def location(self) -> str:
        return "/login?next=" + quote(self.next_path, safe="/")


def local_path(candidate: str | None, default: str = "/") -> str:
    """``candidate`` when it is a path on this server (``/x``, not ``//host`` or ``/\\host``), else
    ``default``: the sign-in page never sends a browser to another site."""
    if candidate and candidate.startswith("/") and not candidate.startswith(("//", "/\\")):
        if all(" " <= c <= "~" for c in candidate):
            return candidate
    return default


def visitor_of(request: Request, logins: LoginService) -> Visitor:
    """The signed-in person of a page request; :class:`SignInRequired` otherwise.  Blocking (the
    database): call it from a synchronous route."""
    found = logins.session(request.cookies.get(SESSION_COOKIE, ""))
    if found is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(local_path(target) if request.method == "GET" else "/")
    record, user = found
    principal = replace(user_principal(user, address=client_address(request)), user_agent=user_agent(request))
    return Visitor(principal, record, user, LoginService.form_token(record))


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    return bool(origin and host) and origin == f"{request.url.scheme}://{host}"


async def checked_form(request: Request, visitor: Visitor | None = None) -> dict[str, str]:
    """The fields of a page's POST (``application/x-www-form-urlencoded``, one value each), after the
    origin check and, for a signed-in visitor, the form token check (403 page otherwise)."""
    if not _same_origin(request):
        raise PageError(403, "Refused", "This form was not sent from this site's own pages. Reload the page.")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise PageError(415, "Refused", "This address takes form posts only.")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PageError(413, "Refused", "The form is too large.")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise PageError(400, "Refused", "The form was not sent as UTF-8.") from None
    fields = {key: values[0] for key, values in parsed.items() if len(values) == 1}
    if visitor is not None and not LoginService.form_token_ok(visitor.session, fields.get("form_token")):
        raise PageError(
            403, "Refused", "This form has expired or was not sent from this site. Reload the page."
        )
    return fields
