"""The FastAPI application: DICOMweb under ``/dicomweb``, problem details, security headers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

from safepacs import __version__
from safepacs.web.audit import make_router as make_audit_router
from safepacs.web.capabilities import install_capabilities
from safepacs.web.delete import make_router as make_delete_router
from safepacs.web.problems import install_problem_handlers
from safepacs.web.qido import make_router
from safepacs.web.security import Backends, SecurityHeaders, authenticate
from safepacs.web.session import make_router as make_session_router
from safepacs.web.stow import make_router as make_stow_router
from safepacs.web.wado import make_router as make_wado_router
from safepacs.web.wadouri import make_router as make_wadouri_router

if TYPE_CHECKING:
    from safepacs.app import Archive
    from safepacs.types import Principal

__all__ = ["create_app"]


def create_app(archive: Archive) -> FastAPI:
    app = FastAPI(
        title="SafePACS",
        version=__version__,
        docs_url=None,  # no interactive page: the Content-Security-Policy allows no scripts
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    install_problem_handlers(app)
    app.add_middleware(SecurityHeaders)

    backends = Backends(logins=archive.logins, oidc=archive.oidc)

    def principal_of(request: Request) -> Principal:
        return authenticate(request, archive.index, backends)

    app.include_router(make_router(principal_of, archive.query.search), prefix="/dicomweb", tags=["QIDO-RS"])
    app.include_router(make_wado_router(principal_of, archive.retrieve), prefix="/dicomweb", tags=["WADO-RS"])
    wado_uri = make_wadouri_router(principal_of, archive.retrieve)
    app.include_router(wado_uri, prefix="/dicomweb", tags=["WADO-URI"])
    stow = make_stow_router(principal_of, archive.ingest, archive.settings.server.max_request_bytes)
    app.include_router(stow, prefix="/dicomweb", tags=["STOW-RS"])
    app.include_router(make_delete_router(principal_of, archive.delete), prefix="/dicomweb", tags=["Delete"])
    idle = int(archive.settings.auth.session_idle_minutes * 60)
    sessions = make_session_router(principal_of, archive.logins, idle)
    app.include_router(sessions, prefix="/api", tags=["Session"])
    app.include_router(
        make_audit_router(principal_of, archive.index, archive.audit), prefix="/api", tags=["Audit"]
    )
    install_capabilities(app, principal_of)  # last: it describes the routes above
    return app
