"""Errors as RFC 9457 problem details: a title and a plain sentence, never PHI or a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from safepacs.errors import AuditError, IntegrityError, RetrieveError

__all__ = ["NOT_FOUND", "Problem", "install_problem_handlers", "not_found", "problem_response"]

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: The one answer for "not there" and "not for you" alike: nothing confirms that a resource exists.
NOT_FOUND = "no such resource"


class Problem(Exception):
    """An error answered as ``application/problem+json``."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def not_found() -> Problem:
    return Problem(404, "Not Found", NOT_FOUND)


def problem_response(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable"}
        detail = NOT_FOUND if exc.status_code == 404 else str(exc.detail)
        return problem_response(exc.status_code, titles.get(exc.status_code, "Error"), detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
        return problem_response(400, "Bad Request", f"invalid parameter {where}: {first.get('msg', '')}")

    @app.exception_handler(AuditError)
    async def _audit_down(_: Request, exc: AuditError) -> JSONResponse:
        log.error("the audit trail cannot be written; the request was refused")
        return problem_response(503, "Service Unavailable", str(exc), {"Retry-After": "30"})

    @app.exception_handler(IntegrityError)
    async def _damaged(_: Request, exc: IntegrityError) -> JSONResponse:
        # Recorded already (a Security Alert naming the instance) by the retrieve service.
        log.warning("a stored object failed its integrity check; the answer is an error: %s", exc)
        return problem_response(
            500,
            "Internal Server Error",
            "stored data failed its integrity check and was not sent; an administrator must restore it "
            "from a backup",
        )

    @app.exception_handler(RetrieveError)
    async def _unreadable(_: Request, exc: RetrieveError) -> JSONResponse:
        # A stored object a route could not read (routes answer what the request got wrong themselves).
        log.warning("a stored object could not be read: %s", exc)
        return problem_response(500, "Internal Server Error", str(exc))

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left (or was cut off for sending its body too slowly) while its body was read:
        # nobody reads this answer, and it is no failure of the archive's to log as one.
        log.info("a client disconnected before its request body was read")
        return problem_response(400, "Bad Request", "the request body did not arrive")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed unexpectedly", extra={"error": type(exc).__name__})
        return problem_response(500, "Internal Server Error", "the archive could not answer; try again later")
