"""``GET /login/oidc/{position}`` and ``GET /login/oidc/callback``: "Sign in with <provider>"
(see :mod:`safepacs.auth.oidc_login` for the protocol and what is checked).

* ``/login/oidc/{position}?next=/path`` (``position``: the issuer's index in ``auth.oidc``): 303 to
  the provider's authorization endpoint, with the sign-in cookie ``__Host-safepacs_oidc`` (sealed;
  ``Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=600``: *Lax*, since it must come back with the
  provider's top-level redirect, which a *Strict* cookie would not).  The redirect URI is
  ``https://<Host>/login/oidc/callback``, the provider must list it for the client.  404 (problem)
  for a position without a client; ``next`` other than a local path becomes ``/``.
* ``/login/oidc/callback?code&state`` (or ``?error``): on success the login session cookie
  ``__Host-safepacs_session`` (as ``POST /api/session`` and ``/login`` set it; the pages derive their
  form token from the session as for a password sign-in), the sign-in cookie cleared, and 303 to
  ``next``.  A refusal is the UI's error page (400 for a bad or stale answer, 403 for a person
  SafePACS refuses, 503 when the provider cannot be reached) and clears the sign-in cookie.

Every sign-in, refused or not, is recorded (110114) with the address and user agent.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from safepacs.auth.login import LoginService
from safepacs.auth.oidc_login import SIGN_IN_SECONDS, OidcSignIn
from safepacs.errors import AccessDenied, AuthenticationError, IdentityProviderError, NotFoundError
from safepacs.protocols.dicomweb.problems import Problem, not_found
from safepacs.protocols.dicomweb.security import requestor
from safepacs.protocols.dicomweb.session import session_cookie
from safepacs.protocols.webui.render import page
from safepacs.protocols.webui.visitors import local_path
from safepacs.services.audit import Auditor

__all__ = ["CALLBACK_PATH", "OIDC_COOKIE", "oidc_login_router"]

OIDC_COOKIE = "__Host-safepacs_oidc"
CALLBACK_PATH = "/login/oidc/callback"
_OIDC_ATTRIBUTES = "Path=/; Secure; HttpOnly; SameSite=Lax"
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
_UNKNOWN = "(unauthenticated)"  # the participant of a refusal before the provider named anyone


def _page(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    """The UI's error page, and the sign-in cookie cleared: this sign-in is over."""
    response = page(request, "error.html", status, title=title, detail=detail)
    response.headers.append("Set-Cookie", f"{OIDC_COOKIE}=; {_OIDC_ATTRIBUTES}; Max-Age=0")
    return response


def _redirect_uri(request: Request) -> str:
    """``https://<Host>/login/oidc/callback`` of the request; the Host header is checked, since it
    becomes part of a URL the provider is asked to redirect to."""
    host = request.headers.get("host", "")
    if not _HOST_RE.match(host):
        raise Problem(400, "Bad Request", "the request's Host header is not a host name")
    return f"https://{host}{CALLBACK_PATH}"


def oidc_login_router(sign_in: OidcSignIn, logins: LoginService, audit: Auditor) -> APIRouter:
    """The two sign-in routes (mount at the site's root).  The routes are synchronous: FastAPI runs
    them in its thread pool, where the discovery and token requests may block."""
    router = APIRouter()

    def refused(request: Request, name: str, status: int, title: str, detail: str) -> HTMLResponse:
        audit.authenticated(requestor(request, name), why=detail)
        return _page(request, status, title, detail)

    # Declared before /login/oidc/{position}, which would otherwise match "callback".
    @router.get(CALLBACK_PATH, include_in_schema=False)
    def callback(request: Request) -> Response:
        query = request.query_params
        error = query.get("error")
        if error is not None:  # RFC 6749 4.1.2.1: the provider refused, or the person cancelled
            kind = "".join(c for c in error[:64] if c.isalnum() or c in "_-")
            return refused(
                request,
                _UNKNOWN,
                403,
                "Sign-in refused",
                f"the identity provider refused the sign-in ({kind})",
            )
        code, state = query.get("code"), query.get("state")
        if not code or not state or len(code) > 4096 or len(state) > 512:
            detail = "the identity provider's answer lacks the code or the state; start the sign-in again"
            return refused(request, _UNKNOWN, 400, "Sign-in failed", detail)
        try:
            signed_in = sign_in.finish(request.cookies.get(OIDC_COOKIE, ""), state, code)
        except IdentityProviderError as exc:
            response = refused(request, _UNKNOWN, 503, "Sign-in unavailable", str(exc))
            response.headers["Retry-After"] = "30"
            return response
        except AuthenticationError as exc:
            return refused(request, _UNKNOWN, 400, "Sign-in failed", str(exc))
        who = signed_in.person.name
        try:
            session = logins.open_external(signed_in.person)
        except (AuthenticationError, AccessDenied) as exc:
            return refused(request, who, 403, "Sign-in refused", str(exc))
        audit.authenticated(requestor(request, who))
        opened = RedirectResponse(local_path(signed_in.next_path), status_code=303)
        opened.headers.append("Set-Cookie", session_cookie(session.cookie))
        opened.headers.append("Set-Cookie", f"{OIDC_COOKIE}=; {_OIDC_ATTRIBUTES}; Max-Age=0")
        return opened

    @router.get("/login/oidc/{position}", include_in_schema=False)
    def begin(request: Request, position: str) -> Response:
        if not position.isascii() or not position.isdigit() or len(position) > 4:
            raise not_found()
        try:
            next_path = local_path(request.query_params.get("next"))
            start = sign_in.begin(int(position), _redirect_uri(request), next_path)
        except NotFoundError:
            raise not_found() from None
        except IdentityProviderError as exc:
            raise Problem(503, "Service Unavailable", str(exc), {"Retry-After": "30"}) from None
        response = RedirectResponse(start.location, status_code=303)
        cookie = f"{OIDC_COOKIE}={start.cookie}; {_OIDC_ATTRIBUTES}; Max-Age={SIGN_IN_SECONDS}"
        response.headers.append("Set-Cookie", cookie)
        return response

    return router
