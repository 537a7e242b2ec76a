"""The whole HTTPS site: DICOMweb and the API (:func:`safepacs.protocols.dicomweb.app.create_app`)
with the web UI's pages beside them.

``/`` and the pages are HTML for people; ``/dicomweb`` and ``/api`` stay as they were, with the
same authentication, policy and audit.  A page's error is an HTML page; an API error stays a
problem document.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from safepacs.auth.login import LoginService
from safepacs.protocols.dicomweb.app import create_app
from safepacs.protocols.dicomweb.security import SESSION_COOKIE
from safepacs.protocols.webui.admin import admin_router
from safepacs.protocols.webui.audit import audit_router
from safepacs.protocols.webui.ohif import MOUNT, viewer_app, viewer_installed
from safepacs.protocols.webui.oidc import oidc_login_router
from safepacs.protocols.webui.posture import Review, posture_router
from safepacs.protocols.webui.render import STATIC_DIR, PageError, page
from safepacs.protocols.webui.signin import signin_router
from safepacs.protocols.webui.studies import studies_router
from safepacs.protocols.webui.study_actions import study_actions_router
from safepacs.protocols.webui.visitors import SignInRequired, local_path, visitor_of

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["create_site"]


def _bound(review: Callable[[Archive], Mapping[str, Any]] | None, archive: Archive) -> Review | None:
    return None if review is None else functools.partial(review, archive)


def create_site(archive: Archive, *, review: Callable[[Archive], Mapping[str, Any]] | None = None) -> FastAPI:
    """The FastAPI application the HTTPS process serves.  ``review``: the doctor's configuration review
    of an archive for the posture page (``safepacs.runtime.posture.configuration_review``, which the UI
    may not import itself; None: the page says to run ``safepacs doctor``)."""
    app = create_app(archive)
    logins = archive.logins
    oidc = archive.oidc_sign_in
    app.include_router(signin_router(logins, archive.auditor, archive.settings, oidc.clients()))
    app.include_router(oidc_login_router(oidc, logins, archive.auditor))
    viewer_dir = archive.settings.viewer_dir
    app.include_router(
        study_actions_router(logins, archive.retrieve, archive.delete, archive.restore, archive.gate)
    )  # before the study pages: /studies/trash is not a study
    app.include_router(
        studies_router(
            logins, archive.query, viewer_installed=functools.partial(viewer_installed, viewer_dir)
        )
    )
    app.include_router(posture_router(logins, archive.settings, _bound(review, archive)))
    app.include_router(admin_router(logins, archive.admin, archive.settings.keys_dir))
    app.include_router(audit_router(logins, archive.audits))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(MOUNT, _SignedIn(viewer_app(viewer_dir), logins), name="viewer")

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        """Where a person starts (and lands after signing in): the studies, or for a role that does
        not search them (an auditor) the audit trail, else their own activity."""
        visitor = visitor_of(request, logins)
        if visitor.may_search:
            return RedirectResponse("/studies", status_code=303)
        landing = "/audit" if visitor.has("auditor") or visitor.has("admin") else "/activity"
        return RedirectResponse(landing, status_code=303)

    @app.exception_handler(PageError)
    def page_error(request: Request, exc: PageError) -> HTMLResponse:
        visitor = None  # the navigation, for a signed-in person: an error page is never a dead end
        with contextlib.suppress(SignInRequired):
            visitor = visitor_of(request, logins)
        return page(request, "error.html", exc.status, title=exc.title, detail=exc.detail, visitor=visitor)

    @app.exception_handler(SignInRequired)
    def sign_in(request: Request, exc: SignInRequired) -> Response:
        return RedirectResponse(exc.location, status_code=303)

    return app


class _SignedIn:
    """The OHIF viewer's pages (paths whose last part has no dot: ``/viewer/``, ``/viewer/viewer``)
    only for a signed-in person, who is otherwise sent to sign in and back; its scripts, styles and
    wasm (no patient data) are served to anyone, as any static file.  Its DICOMweb requests carry
    the session cookie (same origin) and are authenticated like any other."""

    def __init__(self, app: ASGIApp, logins: LoginService) -> None:
        self.app = app
        self.logins = logins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "." not in scope["path"].rsplit("/", 1)[-1]:
            request = Request(scope)
            found = await run_in_threadpool(self.logins.session, request.cookies.get(SESSION_COOKIE, ""))
            if found is None:
                query = scope.get("query_string", b"").decode("latin-1")
                target = local_path(scope["path"] + (f"?{query}" if query else ""), MOUNT + "/")
                await RedirectResponse("/login?next=" + quote(target, safe="/"), status_code=303)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)
