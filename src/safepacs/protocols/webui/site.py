"""The whole HTTPS site: DICOMweb and the API (:func:`safepacs.protocols.dicomweb.app.create_app`)
with the web UI's pages beside them.

``/`` and the pages are HTML for people; ``/dicomweb`` and ``/api`` stay as they were, with the
same authentication, policy and audit.  A page's error is an HTML page; an API error stays a
problem document.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from safepacs.protocols.dicomweb.app import create_app
from safepacs.protocols.webui.posture import Review, posture_router
from safepacs.protocols.webui.render import STATIC_DIR, PageError, page
from safepacs.protocols.webui.signin import signin_router
from safepacs.protocols.webui.studies import studies_router
from safepacs.protocols.webui.study_actions import study_actions_router
from safepacs.protocols.webui.visitors import SignInRequired

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
    app.include_router(signin_router(logins, archive.auditor, archive.settings))
    app.include_router(
        study_actions_router(logins, archive.retrieve, archive.delete, archive.restore, archive.gate)
    )  # before the study pages: /studies/trash is not a study
    app.include_router(studies_router(logins, archive.query, viewer_installed=False))
    app.include_router(posture_router(logins, archive.settings, _bound(review, archive)))
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
