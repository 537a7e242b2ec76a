"""Errors as RFC 9457 problem details (protocols/dicomweb/problems.py), on a bare FastAPI app: the
status, title and sentence a client sees, and never a traceback or an internal message."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import ClientDisconnect

from safepacs.errors import AuditError, IntegrityError, QueryError, RetrieveError
from safepacs.protocols.dicomweb.problems import (
    NOT_FOUND,
    Problem,
    install_problem_handlers,
    not_found,
    problem_response,
)

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def client() -> Client:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/problem")
    def _problem() -> None:
        raise Problem(
            406, "Not Acceptable", "none of the Accept media types can be produced", {"Vary": "Accept"}
        )

    @app.get("/missing")
    def _missing() -> None:
        raise not_found()

    @app.get("/limited")
    def _limited(limit: int) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/audit-down")
    def _audit_down() -> None:
        raise AuditError("the audit trail cannot be written; the request is refused")

    @app.get("/damaged")
    def _damaged() -> None:
        raise IntegrityError("a stored object does not match its recorded SHA-256 (blob 0123abcd)")

    @app.get("/unreadable")
    def _unreadable() -> None:
        raise RetrieveError("the stored object cannot be parsed (ValueError)")

    @app.post("/upload")
    def _upload() -> None:
        raise ClientDisconnect()

    @app.get("/bug")
    def _bug() -> None:
        raise KeyError("Doe^John secret detail")

    @app.get("/safepacs-error")
    def _other() -> None:
        raise QueryError("not a RetrieveError: no handler of its own")

    return Client(app)


class Client:
    """Requests to the app in-process (httpx's ASGI transport: the errors as a client receives them)."""

    def __init__(self, app: FastAPI) -> None:
        self._transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=self._transport, base_url="http://archive") as web:
                return await web.request(method, path, **kwargs)

        return asyncio.run(go())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)


def problem(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == "about:blank"
    assert body["status"] == response.status_code
    assert isinstance(body, dict)
    return body


def test_a_problem_is_answered_with_its_status_title_detail_and_headers(client: Client) -> None:
    r = client.get("/problem")
    assert r.status_code == 406
    assert r.headers["vary"] == "Accept"
    assert problem(r) == {
        "type": "about:blank",
        "title": "Not Acceptable",
        "status": 406,
        "detail": "none of the Accept media types can be produced",
    }


def test_not_found_and_an_unknown_route_say_the_same_thing(client: Client) -> None:
    ours, unknown = client.get("/missing"), client.get("/no/such/route")
    assert ours.status_code == unknown.status_code == 404
    assert (
        problem(ours)
        == problem(unknown)
        == {
            "type": "about:blank",
            "title": "Not Found",
            "status": 404,
            "detail": NOT_FOUND,
        }
    )


def test_a_wrong_method_is_405(client: Client) -> None:
    r = client.delete("/missing")
    assert r.status_code == 405
    assert problem(r)["title"] == "Method Not Allowed"


def test_an_invalid_query_parameter_is_a_400_naming_it(client: Client) -> None:
    r = client.get("/limited", params={"limit": "ten"})
    assert r.status_code == 400
    body = problem(r)
    assert body["title"] == "Bad Request"
    assert isinstance(body["detail"], str) and body["detail"].startswith("invalid parameter limit: ")
    missing = problem(client.get("/limited"))
    assert missing["status"] == 400 and str(missing["detail"]).startswith("invalid parameter limit: ")


def test_an_audit_trail_that_cannot_be_written_is_a_503_to_retry(client: Client) -> None:
    r = client.get("/audit-down")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "30"
    assert problem(r)["detail"] == "the audit trail cannot be written; the request is refused"


def test_a_damaged_object_is_a_500_that_names_no_blob(client: Client) -> None:
    r = client.get("/damaged")
    assert r.status_code == 500
    detail = str(problem(r)["detail"])
    assert "0123abcd" not in detail
    assert detail == (
        "stored data failed its integrity check and was not sent; an administrator must restore it "
        "from a backup"
    )


def test_an_unreadable_stored_object_is_a_500_with_its_sentence(client: Client) -> None:
    r = client.get("/unreadable")
    assert (r.status_code, problem(r)["detail"]) == (500, "the stored object cannot be parsed (ValueError)")


def test_a_client_that_left_gets_a_400_and_no_error_is_logged(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="safepacs.protocols.dicomweb.problems"):
        r = client.post("/upload")
    assert (r.status_code, problem(r)["detail"]) == (400, "the request body did not arrive")
    assert [rec.levelno for rec in caplog.records] == [logging.INFO]


@pytest.mark.parametrize("path", ["/bug", "/safepacs-error"])
def test_anything_unexpected_is_a_500_that_leaks_nothing(client: Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 500
    body = problem(r)
    assert body["title"] == "Internal Server Error"
    assert body["detail"] == "the archive could not answer; try again later"
    assert "Doe" not in r.text and "Traceback" not in r.text and "RetrieveError" not in r.text


def test_problem_response_without_headers() -> None:
    r = problem_response(409, "Conflict", "the study is being deleted")
    assert r.status_code == 409
    assert r.media_type == PROBLEM_JSON
    assert r.body == (
        b'{"type":"about:blank","title":"Conflict","status":409,"detail":"the study is being deleted"}'
    )


def test_a_problem_is_an_exception_whose_message_is_its_detail() -> None:
    p = Problem(400, "Bad Request", "frame numbers start at 1")
    assert str(p) == "frame numbers start at 1" and p.headers == {}
