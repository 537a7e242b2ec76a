"""Signing in and out: ``/login`` (password and TOTP, as ``POST /api/session``), ``/login/password``
(the first-login password change) and ``/logout``.

A failed sign-in answers the same for every wrong credential, locked or disabled account (the login
service decides, with its lockout); each attempt, success and sign-out is recorded (110114) like
the API's.  Identity providers configured with a client (``[[auth.oidc]]`` ``client_id``) are
offered as "Sign in with ..." links.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from safepacs.auth.login import MAX_PASSWORD_LENGTH, LoginService, NewSession
from safepacs.auth.oidc_login import SignInClient
from safepacs.config import Settings
from safepacs.errors import AuditError, AuthenticationError
from safepacs.protocols.dicomweb.security import SESSION_COOKIE, requestor
from safepacs.protocols.dicomweb.session import ended_session_cookie, session_cookie
from safepacs.protocols.webui.render import page
from safepacs.protocols.webui.visitors import Visitor, checked_form, local_path, visitor_of
from safepacs.services.audit import Auditor, Types

__all__ = ["signin_router"]

log = logging.getLogger(__name__)


def signin_router(
    logins: LoginService, auditor: Auditor, settings: Settings, providers: list[SignInClient]
) -> APIRouter:
    """The sign-in pages; ``providers`` are the identity providers a browser can sign in with
    (``[[auth.oidc]]`` issuers with a client, :meth:`safepacs.auth.oidc_login.OidcSignIn.clients`)."""
    router = APIRouter(include_in_schema=False)
    idle_minutes = settings.auth.session_idle_minutes

    def form(request: Request, status: int = 200, **context: object) -> HTMLResponse:
        next_path = local_path(request.query_params.get("next"))
        return page(
            request,
            "signin.html",
            status,
            next_path=next_path,
            providers=providers,
            idle_minutes=idle_minutes,
            **context,
        )

    def signed_in(session: NewSession, next_path: str) -> Response:
        response = RedirectResponse(local_path(next_path), status_code=303)
        response.headers.append("Set-Cookie", session_cookie(session.cookie))
        return response

    async def attempt(
        request: Request, name: str, open_session: Callable[[], NewSession], record_first: bool = False
    ) -> NewSession | AuthenticationError:
        who = requestor(request, name)
        try:
            session = await run_in_threadpool(open_session)
        except AuthenticationError as exc:
            await run_in_threadpool(auditor.authenticated, who, why=str(exc))
            return exc
        if not record_first:
            await run_in_threadpool(auditor.authenticated, who)
        return session

    @router.get("/login")
    def login_page(request: Request) -> Response:
        found = logins.session(request.cookies.get(SESSION_COOKIE, ""))
        if found is not None:  # already signed in
            return RedirectResponse(local_path(request.query_params.get("next")), status_code=303)
        return form(request)

    @router.post("/login")
    async def login(request: Request) -> Response:
        fields = await checked_form(request)
        name = fields.get("username", "").strip()[:256]
        password = fields.get("password", "")[:MAX_PASSWORD_LENGTH]
        code = fields.get("totp", "").strip()[:16] or None
        next_path = local_path(fields.get("next"))
        if not name or not password:
            return form(request, 400, error="Enter your user name and password.", username=name)
        outcome = await attempt(request, name, lambda: logins.login(name, password, code))
        if isinstance(outcome, NewSession):
            return signed_in(outcome, next_path)
        if outcome.code == "password_change_required":
            return page(
                request, "password.html", 200, username=name, next_path=next_path, reason=str(outcome)
            )
        status = 503 if outcome.code == "busy" else 403 if outcome.code == "totp_enrolment_required" else 401
        return form(request, status, error=str(outcome), username=name)

    @router.post("/login/password")
    async def change_password(request: Request) -> Response:
        fields = await checked_form(request)
        name = fields.get("username", "").strip()[:256]
        password = fields.get("password", "")[:MAX_PASSWORD_LENGTH]
        new = fields.get("new_password", "")[:MAX_PASSWORD_LENGTH]
        code = fields.get("totp", "").strip()[:16] or None
        next_path = local_path(fields.get("next"))
        if new != fields.get("new_password_again", ""):
            return page(request, "password.html", 400, username=name, next_path=next_path,
                        error="The two new passwords differ.")  # fmt: skip
        who = requestor(request, name)

        def record_change() -> None:  # before the change: no new password without its record
            auditor.changed(who, Types.USER_ATTRIBUTES_CHANGED, name, "password changed")
            auditor.authenticated(who)

        outcome = await attempt(
            request, name, lambda: logins.change_password(name, password, code, new, record_change), True
        )
        if isinstance(outcome, NewSession):
            return signed_in(outcome, next_path)
        status = 400 if outcome.code == "weak_password" else 401
        return page(request, "password.html", status, username=name, next_path=next_path, error=str(outcome))

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        visitor: Visitor = await run_in_threadpool(visitor_of, request, logins)
        await checked_form(request, visitor)
        await run_in_threadpool(logins.logout, visitor.session)  # first: it ends even if unrecorded
        try:
            await run_in_threadpool(auditor.authenticated, requestor(request, visitor.name), logout=True)
        except AuditError:
            log.error("the audit trail cannot be written; a sign-out was not recorded")
        response = RedirectResponse("/login?signed_out=1", status_code=303)
        response.headers.append("Set-Cookie", ended_session_cookie())
        return response

    return router
