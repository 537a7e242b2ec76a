"""Browser login sessions under ``/api/session`` (local users; see :mod:`safepacs.auth.login`).

* ``POST /api/session`` ``{"username", "password", "totp"?}`` -> 200 ``{"user", "roles",
  "csrf_token", "expires_at", "idle_timeout_seconds"}`` and the session cookie
  ``__Host-safepacs_session`` (``Path=/; Secure; HttpOnly; SameSite=Strict``, no ``Domain``, no
  ``Max-Age``: it ends with the browser, and the server ends it earlier when idle or old).
  Every wrong credential, locked or disabled account answers the same 401.
* ``POST /api/session/password`` ``{"username", "password", "totp"?, "new_password"}``: the one way
  for a user who must change their password (a new account, after ``safepacs user
  reset-password``); answers like a login, and ends the user's other sessions.
* ``GET /api/session``: who is asking (any backend: session, access token, OIDC token).
* ``DELETE /api/session`` (with ``X-CSRF-Token``): logout; the session is revoked on the server.

Both POSTs take JSON only (``Content-Type: application/json``): a cross-site HTML form cannot send
that without a CORS preflight SafePACS never grants, so a foreign page cannot log a browser in
(login CSRF).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from safepacs.auth.login import MAX_PASSWORD_LENGTH, LoginService, NewSession
from safepacs.errors import AuditError, AuthenticationError
from safepacs.protocols.dicomweb.problems import Problem
from safepacs.protocols.dicomweb.security import (
    REALM,
    SESSION_COOKIE,
    login_session_of,
    requestor,
)
from safepacs.services.audit import Auditor, Types
from safepacs.types import Principal

log = logging.getLogger(__name__)

__all__ = ["ended_session_cookie", "session_cookie", "session_router"]

_COOKIE_ATTRIBUTES = "Path=/; Secure; HttpOnly; SameSite=Strict"
_MAX_BODY = 8 * 1024
_M = TypeVar("_M", bound=BaseModel)
_STATUS = {
    "invalid_credentials": (401, "Unauthorized"),
    "totp_enrolment_required": (403, "Forbidden"),
    "password_change_required": (403, "Forbidden"),
    "weak_password": (400, "Bad Request"),
    "busy": (503, "Service Unavailable"),
}


class _Login(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)
    totp: str | None = Field(None, max_length=16)


class _ChangePassword(_Login):
    new_password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


def _parse(request_body: bytes, content_type: str, model: type[_M]) -> _M:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise Problem(415, "Unsupported Media Type", "send the credentials as application/json")
    if len(request_body) > _MAX_BODY:
        raise Problem(413, "Content Too Large", "the login request is too large")
    try:
        return model.model_validate_json(request_body)
    except ValidationError:
        fields = ", ".join(model.model_fields)
        raise Problem(400, "Bad Request", f"send a JSON object with {fields}") from None


def session_cookie(value: str) -> str:
    """The ``Set-Cookie`` value that gives the browser a session (see the module docstring)."""
    return f"{SESSION_COOKIE}={value}; {_COOKIE_ATTRIBUTES}"


def ended_session_cookie() -> str:
    """The ``Set-Cookie`` value that makes the browser forget its session cookie."""
    return f"{SESSION_COOKIE}=; {_COOKIE_ATTRIBUTES}; Max-Age=0"


def _refused(exc: AuthenticationError) -> Problem:
    status, title = _STATUS.get(exc.code, (401, "Unauthorized"))
    headers = {"WWW-Authenticate": REALM} if status == 401 else {}
    if status == 503:
        headers["Retry-After"] = "5"
    return Problem(status, title, str(exc), headers)


def _opened(session: NewSession, idle_seconds: int) -> JSONResponse:
    body = {
        "user": session.user.name,
        "roles": sorted(session.user.roles),
        "csrf_token": session.csrf_token,
        "expires_at": session.record.expires_at.isoformat(),
        "idle_timeout_seconds": idle_seconds,
    }
    response = JSONResponse(body)
    response.headers.append("Set-Cookie", session_cookie(session.cookie))
    return response


def session_router(
    principal_of: Callable[[Request], Principal], logins: LoginService, idle_seconds: int, audit: Auditor
) -> APIRouter:
    """The ``/api/session`` routes (mount under ``/api``).  Every login, failed login and logout is
    recorded (110114) before it is answered."""
    router = APIRouter()

    # The POSTs are async only to read the body; the blocking work (Argon2id, the database) runs in
    # the thread pool, as the synchronous routes do.
    @router.post("/session", summary="Log in with a local user name, password and TOTP code")
    async def login(request: Request) -> JSONResponse:
        form = _parse(await request.body(), request.headers.get("content-type", ""), _Login)
        who = requestor(request, form.username)
        try:
            session = await run_in_threadpool(logins.login, form.username, form.password, form.totp)
        except AuthenticationError as exc:
            await run_in_threadpool(audit.authenticated, who, why=str(exc))
            raise _refused(exc) from None
        await run_in_threadpool(audit.authenticated, who)
        return _opened(session, idle_seconds)

    @router.post("/session/password", summary="Change the password (required at first login)")
    async def change_password(request: Request) -> JSONResponse:
        form = _parse(await request.body(), request.headers.get("content-type", ""), _ChangePassword)
        who = requestor(request, form.username)

        def record_change() -> None:  # before the change: no new password without its record
            audit.changed(who, Types.USER_ATTRIBUTES_CHANGED, form.username[:256], "password changed")
            audit.authenticated(who)

        try:
            session = await run_in_threadpool(
                logins.change_password,
                form.username,
                form.password,
                form.totp,
                form.new_password,
                record_change,
            )
        except AuthenticationError as exc:
            await run_in_threadpool(audit.authenticated, who, why=str(exc))
            raise _refused(exc) from None
        return _opened(session, idle_seconds)

    @router.get("/session", summary="Who is asking")
    def whoami(request: Request) -> dict[str, Any]:
        principal = principal_of(request)
        return {
            "user": principal.name,
            "roles": sorted(principal.roles),
            "allow": sorted(s.value for s in principal.allow),
        }

    @router.delete("/session", status_code=204, summary="Log out (the session ends on the server)")
    def logout(request: Request) -> Response:
        record, user = login_session_of(request, logins)
        logins.logout(record)  # first: a session must end even when its end cannot be recorded
        try:
            audit.authenticated(requestor(request, user.name), logout=True)
        except AuditError:
            log.error("the audit trail cannot be written; a logout was not recorded")
        response = Response(status_code=204)
        response.headers.append("Set-Cookie", ended_session_cookie())
        return response

    return router
