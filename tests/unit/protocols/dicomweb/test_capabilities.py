"""Retrieve Capabilities (protocols/dicomweb/capabilities.py, PS3.18 8.9) on a bare FastAPI app: OPTIONS
answers a WADL of the routes the server really has and an Allow header for the path asked, and only to
a caller with credentials."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import httpx
import pytest
from fastapi import FastAPI, Request

from safepacs.protocols.dicomweb.capabilities import WADL, install_capabilities
from safepacs.protocols.dicomweb.problems import Problem, install_problem_handlers
from safepacs.types import Principal, PrincipalKind

NS = {"w": "http://wadl.dev.java.net/2009/02"}


def principal_of(request: Request) -> Principal:
    if request.headers.get("authorization") != "Bearer ok":
        raise Problem(401, "Unauthorized", "credentials are needed", {"WWW-Authenticate": "Bearer"})
    return Principal(PrincipalKind.USER, "alice")


@pytest.fixture(scope="module")
def app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/dicomweb/studies", summary="Search for studies")
    def search(limit: int | None = None, offset: int = 0) -> list[object]:
        return []

    @app.post("/dicomweb/studies", summary="Store instances")
    def store() -> None:
        return None

    @app.delete("/dicomweb/studies/{study}")
    def delete(study: str) -> None:
        return None

    @app.get("/api/status")
    def status() -> dict[str, str]:
        return {}

    install_capabilities(app, principal_of)
    return app


def options(app: FastAPI, path: str, token: str | None = "ok") -> httpx.Response:  # noqa: S107 - a test bearer
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="https://archive.example") as web:
            return await web.options(path, headers=headers)

    return asyncio.run(go())


def test_the_root_lists_every_dicomweb_route_and_no_other(app: FastAPI) -> None:
    r = options(app, "/dicomweb")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(WADL)
    assert r.headers["allow"] == "DELETE, GET, OPTIONS, POST"
    root = ET.fromstring(r.content)  # noqa: S314 - our own answer
    (resources,) = root.findall("w:resources", NS)
    assert resources.get("base") == "https://archive.example/dicomweb/"
    paths = [res.get("path") for res in resources.findall("w:resource", NS)]
    assert paths == ["studies", "studies/{study}"]  # /api is not DICOMweb


def test_a_resource_names_its_methods_summaries_and_query_parameters(app: FastAPI) -> None:
    root = ET.fromstring(options(app, "/dicomweb/studies").content)  # noqa: S314 - our own answer
    (resource,) = root.findall("w:resources/w:resource", NS)
    methods = {m.get("name"): m for m in resource.findall("w:method", NS)}
    assert set(methods) == {"GET", "POST"}
    get = methods["GET"]
    assert get.findtext("w:doc", namespaces=NS) == "Search for studies"
    assert [p.get("name") for p in get.findall("w:request/w:param", NS)] == ["limit", "offset"]
    assert all(p.get("style") == "query" for p in get.findall("w:request/w:param", NS))


def test_allow_names_the_methods_of_the_path_asked(app: FastAPI) -> None:
    assert options(app, "/dicomweb/studies").headers["allow"] == "GET, OPTIONS, POST"
    assert options(app, "/dicomweb/studies/1.2.3").headers["allow"] == "DELETE, OPTIONS"


@pytest.mark.parametrize("token", [None, "wrong"])
def test_without_credentials_nothing_is_said(app: FastAPI, token: str | None) -> None:
    r = options(app, "/dicomweb", token)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert b"studies" not in r.content
