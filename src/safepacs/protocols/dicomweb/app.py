"""The FastAPI application: DICOMweb under ``/dicomweb``, problem details, security headers.

Every route needs a credential, the OpenAPI document (``/api/openapi.json``) included: it names the
product, its version and every route, which is nothing to hand an unauthenticated scanner.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp

from safepacs import __version__
from safepacs.protocols.dicomweb.audit import audit_search_router
from safepacs.protocols.dicomweb.capabilities import install_capabilities
from safepacs.protocols.dicomweb.delete import delete_router
from safepacs.protocols.dicomweb.problems import Problem, install_problem_handlers
from safepacs.protocols.dicomweb.qido import qido_router
from safepacs.protocols.dicomweb.security import (
    Backends,
    SecurityHeaders,
    authenticate,
    requestor,
    user_agent,
)
from safepacs.protocols.dicomweb.session import session_router
from safepacs.protocols.dicomweb.stow import stow_router
from safepacs.protocols.dicomweb.wado import wado_router
from safepacs.protocols.dicomweb.wadouri import wadouri_router

if TYPE_CHECKING:
    from safepacs.app import Archive
    from safepacs.types import Principal

__all__ = ["OPENAPI_URL", "create_app"]

#: Where the OpenAPI document of every route is served (to authenticated callers only).
OPENAPI_URL = "/api/openapi.json"


class _App(FastAPI):
    """FastAPI with the security headers as its outermost layer.  A middleware added the usual way sits
    inside Starlette's ServerErrorMiddleware, so the 500 answer to an unexpected exception would go
    out without them."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())


def create_app(archive: Archive) -> FastAPI:
    app = _App(
        title="SafePACS",
        version=__version__,
        docs_url=None,  # no interactive page: the Content-Security-Policy allows no scripts
        redoc_url=None,
        openapi_url=None,  # served below, behind authentication like every other route
    )
    install_problem_handlers(app)

    backends = Backends(logins=archive.logins, oidc=archive.oidc)
    auditor = archive.auditor

    def principal_of(request: Request) -> Principal:
        agent = user_agent(request)
        try:
            principal = authenticate(request, archive.gate, backends)
        except Problem as exc:
            if exc.status in (401, 403):  # refused before anyone is known: recorded as a failed login
                auditor.authenticated(requestor(request, "(unauthenticated)"), why=exc.detail)
            raise
        return replace(principal, user_agent=agent)

    app.include_router(qido_router(principal_of, archive.query.search), prefix="/dicomweb", tags=["QIDO-RS"])
    app.include_router(wado_router(principal_of, archive.retrieve), prefix="/dicomweb", tags=["WADO-RS"])
    wado_uri = wadouri_router(principal_of, archive.retrieve)
    app.include_router(wado_uri, prefix="/dicomweb", tags=["WADO-URI"])
    server = archive.settings.server
    stow = stow_router(principal_of, archive.ingest, server.max_request_bytes, server.max_stow_parts)
    app.include_router(stow, prefix="/dicomweb", tags=["STOW-RS"])
    app.include_router(delete_router(principal_of, archive.delete), prefix="/dicomweb", tags=["Delete"])
    idle = int(archive.settings.auth.session_idle_minutes * 60)
    sessions = session_router(principal_of, archive.logins, idle, auditor)
    app.include_router(sessions, prefix="/api", tags=["Session"])
    app.include_router(audit_search_router(principal_of, archive.audits), prefix="/api", tags=["Audit"])
    install_capabilities(app, principal_of)  # it describes the routes above

    @app.get(OPENAPI_URL, include_in_schema=False)
    def openapi_document(request: Request) -> JSONResponse:
        principal_of(request)  # any authenticated principal; 401 (recorded) otherwise
        return JSONResponse(app.openapi())

    return app
