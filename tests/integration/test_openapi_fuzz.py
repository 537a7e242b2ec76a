"""schemathesis against the OpenAPI document of a running server (real TLS, real index).

The document is fetched, and every operation is called with generated parameters and bodies, with an
administrator's token; no answer may be a server error, and every error must be a problem document
without a traceback.  Without a credential the document itself is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.support.server import Server, run_cli, start_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    from safepacs.app import initialize, open_repositories
    from safepacs.auth.tokens import issue_token

    data = tmp_path_factory.mktemp("fuzz") / "data"
    initialize(data)
    assert run_cli("user", "add", "fuzz", "--role", "admin", "--data", str(data)) == 0
    repos = open_repositories(f"sqlite:///{data / 'index.sqlite3'}")
    try:
        import datetime as dt

        issued = issue_token("fuzz", dt.timedelta(hours=1))
        repos.directory.add_token(issued.record)
    finally:
        repos.close()
    srv = start_server(data, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        yield srv, issued.token
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: tuple[Server, str]) -> Any:
    srv, token = fuzz_server
    return schemathesis.openapi.from_url(
        f"{srv.base_url}/api/openapi.json",
        verify=str(srv.ca_file),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _problem_without_traceback(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code >= 400:
        ctype = " ".join(response.headers.get("content-type", []))  # schemathesis: header -> values
        assert ctype.startswith("application/problem+json"), f"{response.status_code} answered as {ctype}"
        assert b"Traceback" not in response.content
    return None


def test_no_operation_fails_on_generated_input(fuzz_server: tuple[Server, str], api_schema: Any) -> None:
    srv, token = fuzz_server
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case: Any) -> None:
            case.call_and_validate(
                base_url=srv.base_url,
                headers={"Authorization": f"Bearer {token}"},
                verify=str(srv.ca_file),
                timeout=30,
                checks=[not_a_server_error, _problem_without_traceback],
            )

        call()


def test_the_openapi_document_is_served(fuzz_server: tuple[Server, str], api_schema: Any) -> None:
    srv, _ = fuzz_server
    paths = set(api_schema.raw_schema["paths"])
    assert {"/dicomweb/studies", "/api/session"} <= paths
    assert Path(srv.ca_file).is_file()


def test_the_openapi_document_needs_a_credential(fuzz_server: tuple[Server, str]) -> None:
    """It names the product, its version and every route: an anonymous caller gets the 401 every other
    route answers, and nothing of the document."""
    import ssl

    import httpx

    srv, token = fuzz_server
    verify = ssl.create_default_context(cafile=str(srv.ca_file))
    with httpx.Client(base_url=srv.base_url, verify=verify, timeout=20) as client:
        for headers in ({}, {"Authorization": "Bearer spat_0123456789abcdef_" + "A" * 43}):
            r = client.get("/api/openapi.json", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith('Bearer realm="SafePACS"')
            assert "SafePACS" not in r.text.replace('realm="SafePACS"', "") and "/dicomweb" not in r.text
        for path in ("/docs", "/redoc", "/openapi.json", "/api/docs"):
            assert client.get(path).status_code in (401, 404), path
        r = client.get("/api/openapi.json", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "/dicomweb/studies" in r.json()["paths"]
        # The WADL capabilities built from the same document still answer authenticated callers.
        assert client.options("/dicomweb", headers={"Authorization": f"Bearer {token}"}).status_code == 200
