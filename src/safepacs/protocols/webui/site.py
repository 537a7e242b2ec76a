"""The whole HTTPS site: DICOMweb and the API (:func:`safepacs.protocols.dicomweb.app.create_app`)
with the web UI's pages beside them.

``/`` and the pages are HTML for people; ``/dicomweb`` and ``/api`` stay as they were, with the
same authentication, policy and audit.  A page's error is an HTML page; an API error stays a
problem document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from safepacs.protocols.dicomweb.app import create_app
from safepacs.protocols.webui.oidc import oidc_login_router
from safepacs.protocols.webui.render import STATIC_DIR, PageError, page
from safepacs.protocols.webui.signin import signin_router
from safepacs.protocols.webui.studies import studies_router
from safepacs.protocols.webui.visitors import SignInRequired

if TYPE_CHECKING:
    from safepacs.app import Archive

__all__ = ["create_site"]


def create_site(archive: Archive) -> FastAPI:
    """The FastAPI application the HTTPS process serves."""
    app = create_app(archive)
    logins = archive.logins
    app.include_router(signin_router(logins, archive.auditor, archive.settings))
    app.include_router(oidc_login_router(archive.oidc_sign_in, logins, archive.auditor))
    app.include_router(studies_router(logins, archive.query, viewer_installed=False))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def home() -> Response:
        return RedirectResponse("/studies", status_code=303)

    @app.exception_handler(PageError)
    def page_error(request: Request, exc: PageError) -> HTMLResponse:
        return page(request, "error.html", exc.status, title=exc.title, detail=exc.detail)

    @app.exception_handler(SignInRequired)
    def sign_in(request: Request, exc: SignInRequired) -> Response:
        return RedirectResponse(exc.location, status_code=303)

    return app
