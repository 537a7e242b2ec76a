"""The FastAPI application: DICOMweb under ``/dicomweb``, problem details, security headers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

from safepacs import __version__
from safepacs.web.problems import install_problem_handlers
from safepacs.web.qido import make_router
from safepacs.web.security import SecurityHeaders, authenticate
from safepacs.web.stow import make_router as make_stow_router
from safepacs.web.wado import make_router as make_wado_router

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

    def principal_of(request: Request) -> Principal:
        return authenticate(request, archive.index)

    app.include_router(make_router(principal_of, archive.query.search), prefix="/dicomweb", tags=["QIDO-RS"])
    app.include_router(make_wado_router(principal_of, archive.retrieve), prefix="/dicomweb", tags=["WADO-RS"])
    stow = make_stow_router(principal_of, archive.ingest, archive.settings.server.max_request_bytes)
    app.include_router(stow, prefix="/dicomweb", tags=["STOW-RS"])
    return app
