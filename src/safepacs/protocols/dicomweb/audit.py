"""``GET /api/audit``: the audit trail over HTTPS, for auditors (and administrators).

The same filters and rows as ``safepacs audit query``; the read is itself recorded (110101 Audit
Log Used) before the answer is sent (:class:`~safepacs.services.audittrail.AuditSearchService`).
Anyone else gets 404, like every refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from safepacs.audit.events import AuditFilter, from_canonical
from safepacs.audit.report import summary_row
from safepacs.errors import AccessDenied
from safepacs.protocols.dicomweb.problems import Problem, not_found
from safepacs.services.audittrail import AuditSearchService
from safepacs.types import Principal

__all__ = ["audit_search_router"]

MAX_ROWS = 10_000


def _when(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise Problem(400, "Bad Request", f"{name} must be an ISO date or date-time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def audit_search_router(
    principal_of: Callable[[Request], Principal], audits: AuditSearchService
) -> APIRouter:
    router = APIRouter()

    @router.get("/audit", summary="Search the audit trail (auditors)")
    def search(
        request: Request,
        patient: str | None = Query(None, max_length=64),
        study: str | None = Query(None, max_length=64),
        user: str | None = Query(None, max_length=256),
        since: str | None = Query(None, max_length=40),
        until: str | None = Query(None, max_length=40),
        limit: int = Query(1000, ge=1, le=MAX_ROWS),
    ) -> JSONResponse:
        principal = principal_of(request)
        try:
            audits.admit(principal)  # before the filter is read: a refusal says nothing about it
            where = AuditFilter(patient, study, user, _when(since, "since"), _when(until, "until"))
            asked = " ".join(f"{k}={v}" for k, v in request.query_params.items())
            records = audits.search(principal, where, limit, asked=asked)
        except AccessDenied:
            raise not_found() from None
        return JSONResponse([summary_row(r.seq, from_canonical(r.body)) for r in records])

    return router
