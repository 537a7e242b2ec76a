"""DELETE of a study, series or instance (soft delete; the bytes are kept until the retention ends).

PS3.18 defines no delete transaction; the routes follow the resource paths of WADO-RS, as other
DICOMweb servers do.  Success is ``204 No Content``; a resource that is not there, that the
principal may not see, or that the principal may not delete answers the same ``404``.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response

from safepacs.errors import AccessDenied, NotFoundError, QueryError
from safepacs.protocols.dicomweb.problems import not_found
from safepacs.protocols.dicomweb.requests import checked_uid
from safepacs.services.delete import DeleteService
from safepacs.types import Principal

__all__ = ["delete_router"]


def delete_router(principal_of: Callable[[Request], Principal], deleter: DeleteService) -> APIRouter:
    router = APIRouter()

    def delete(
        request: Request, study: str, series: str | None = None, instance: str | None = None
    ) -> Response:
        principal = principal_of(request)
        uids = [checked_uid(u) if u is not None else None for u in (study, series, instance)]
        try:
            deleter.delete(principal, uids[0] or "", uids[1], uids[2])
        except (AccessDenied, NotFoundError, QueryError):
            raise not_found() from None
        return Response(status_code=204)

    @router.delete("/studies/{study}", status_code=204, summary="Delete a study (soft delete)")
    def delete_study(request: Request, study: str) -> Response:
        return delete(request, study)

    @router.delete(
        "/studies/{study}/series/{series}", status_code=204, summary="Delete a series (soft delete)"
    )
    def delete_series(request: Request, study: str, series: str) -> Response:
        return delete(request, study, series)

    @router.delete(
        "/studies/{study}/series/{series}/instances/{instance}",
        status_code=204,
        summary="Delete an instance (soft delete)",
    )
    def delete_instance(request: Request, study: str, series: str, instance: str) -> Response:
        return delete(request, study, series, instance)

    return router
