"""Who is asking (bearer tokens -> Principal) and the response headers every answer carries."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response

from safepacs.auth.policy import user_principal
from safepacs.auth.tokens import check_token
from safepacs.index import SqlIndex
from safepacs.types import Principal
from safepacs.web.problems import Problem

__all__ = ["SecurityHeaders", "authenticate"]

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


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def authenticate(request: Request, index: SqlIndex) -> Principal:
    """The principal of a request with a valid bearer token; 401 with ``WWW-Authenticate`` otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if not header:
        raise Problem(401, "Unauthorized", "this request needs a bearer token", {"WWW-Authenticate": REALM})
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Problem(
            401,
            "Unauthorized",
            "use 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": f'{REALM}, error="invalid_request"'},
        )
    found = check_token(credentials.strip(), index.get_token, index.get_user)
    if found is None:
        raise Problem(
            401,
            "Unauthorized",
            "the token is not valid (unknown, expired, revoked, or its user is disabled)",
            {"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
        )
    record, user = found
    client = request.client.host if request.client else None
    return user_principal(user, address=client, scopes=record.scopes)
