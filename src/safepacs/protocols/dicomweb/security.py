"""Who is asking (bearer token, OIDC JWT, session cookie -> Principal); headers every answer carries.

:func:`authenticate` turns a request into one principal, through
:func:`safepacs.auth.policy.user_principal` whatever the backend:

* ``Authorization: Bearer spat_...``: a personal access token (:mod:`safepacs.auth.tokens`);
* ``Authorization: Bearer <JWT>``: an OpenID Connect token of a configured issuer
  (:mod:`safepacs.auth.oidc`);
* the ``__Host-safepacs_session`` cookie of a login (:mod:`safepacs.auth.login`).  A request it
  authenticates that changes something (any method but GET, HEAD, OPTIONS) must also carry the
  session's CSRF token in ``X-CSRF-Token`` (compared in constant time); bearer requests need none,
  since a browser never adds an ``Authorization`` header on its own.

An ``Authorization`` header, when present, decides alone: a cookie beside it is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safepacs.audit.events import Participant
from safepacs.auth.login import LoginService
from safepacs.auth.oidc import OidcVerifier, oidc_principal
from safepacs.auth.policy import user_principal
from safepacs.auth.tokens import PREFIX, check_token_holder
from safepacs.errors import AccessDenied, AuthenticationError, IdentityProviderError
from safepacs.protocols.dicomweb.problems import Problem
from safepacs.records import SessionRecord, UserRecord
from safepacs.services.gate import Gate
from safepacs.types import Principal

__all__ = [
    "CSRF_HEADER",
    "SAFE_METHODS",
    "SESSION_COOKIE",
    "Backends",
    "SecurityHeaders",
    "authenticate",
    "client_address",
    "login_session_of",
    "requestor",
    "user_agent",
]

SESSION_COOKIE = "__Host-safepacs_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

REALM = 'Bearer realm="SafePACS"'

_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Content-Security-Policy": (
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # answers hold PHI: never in a shared or browser cache
    "Cross-Origin-Resource-Policy": "same-origin",
}


class SecurityHeaders:
    """ASGI middleware: the headers of ``_HEADERS`` on every HTTP answer, unless it set them itself.

    Pure ASGI (it only wraps ``send``) rather than ``BaseHTTPMiddleware``, which relays every
    chunk of a streamed body through a memory stream and a task of its own.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass(frozen=True)
class Backends:
    """The authentication backends beside personal access tokens (None: not offered)."""

    logins: LoginService | None = None
    oidc: OidcVerifier | None = None


def _description(detail: str) -> str:
    """``detail`` as an RFC 6750 3 error_description: printable ASCII without quote or backslash."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "'" for c in detail)


def _unauthorized(detail: str, error: str | None = None) -> Problem:
    challenge = REALM if error is None else f'{REALM}, error="{error}"'
    if error is not None:
        challenge += f', error_description="{_description(detail)}"'
    return Problem(401, "Unauthorized", detail, {"WWW-Authenticate": challenge})


def _bearer(token: str, gate: Gate, oidc: OidcVerifier | None, client: str | None) -> Principal:
    if token.startswith(PREFIX + "_") or not oidc:
        found = check_token_holder(token, gate.token_holder)
        if found is None:
            raise _unauthorized(
                "the token is not valid (unknown, expired, revoked, or its user is disabled)", "invalid_token"
            )
        record, user = found
        return user_principal(user, address=client, scopes=record.scopes)
    try:
        person = oidc.verify(token)
        return oidc_principal(person, gate.user(person.name), address=client)
    except IdentityProviderError as exc:
        raise Problem(503, "Service Unavailable", str(exc), {"Retry-After": "30"}) from None
    except AuthenticationError as exc:
        raise _unauthorized(str(exc), "invalid_token") from None
    except AccessDenied as exc:
        challenge = f'{REALM}, error="insufficient_scope", error_description="{_description(str(exc))}"'
        raise Problem(403, "Forbidden", str(exc), {"WWW-Authenticate": challenge}) from None


def login_session_of(request: Request, logins: LoginService) -> tuple[SessionRecord, UserRecord]:
    """The live login session of a request's cookie, CSRF-checked unless the method is safe."""
    found = logins.session(request.cookies.get(SESSION_COOKIE, ""))
    if found is None:
        raise _unauthorized("the session has ended or is not valid; log in again", "invalid_token")
    record, user = found
    if request.method not in SAFE_METHODS and not logins.csrf_ok(record, request.headers.get(CSRF_HEADER)):
        raise Problem(
            403,
            "Forbidden",
            f"this request needs the {CSRF_HEADER} header with the token the login answered",
        )
    return record, user


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def user_agent(request: Request) -> str | None:
    """The request's User-Agent for the audit trail (at most 200 characters)."""
    return request.headers.get("user-agent", "")[:200] or None


def requestor(request: Request, name: str) -> Participant:
    """The audit trail's requesting participant of an HTTP request made as ``name`` (at most 256
    characters): its client address and user agent."""
    return Participant(name[:256], True, address=client_address(request), user_agent=user_agent(request))


def authenticate(request: Request, gate: Gate, backends: Backends | None = None) -> Principal:
    """The principal of a request (see the module docstring); 401 with ``WWW-Authenticate`` otherwise.

    Blocking (database, and a JWKS fetch bounded by its timeout): call it from a synchronous route,
    which FastAPI runs in its thread pool, or through ``run_in_threadpool``.
    """
    backends = backends or Backends()
    client = client_address(request)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Problem(
                401,
                "Unauthorized",
                "use 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": f'{REALM}, error="invalid_request"'},
            )
        return _bearer(credentials.strip(), gate, backends.oidc, client)
    if backends.logins is not None and SESSION_COOKIE in request.cookies:
        _, user = login_session_of(request, backends.logins)
        return user_principal(user, address=client)
    raise _unauthorized("this request needs a bearer token or a login session")
