"""Shared fixtures: a real ``safepacs serve`` on 127.0.0.1, an ephemeral port, real DCMTK peers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from safepacs.app import Repositories, initialize, open_repositories
from tests.support.server import Server, start_server

DCMTK = ("echoscu", "storescu", "findscu", "getscu", "movescu", "storescp")
POSTGRES_ENV = "SAFEPACS_TEST_POSTGRES"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [tool for tool in DCMTK if shutil.which(tool) is None]
    if missing:
        skip = pytest.mark.skip(
            reason=f"DCMTK tools not on PATH: {', '.join(missing)} (apt-get install dcmtk)"
        )
        for item in items:
            if "dcmtk" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A freshly initialised data directory."""
    d = tmp_path / "data"
    initialize(d)
    return d


@pytest.fixture
def repos(data_dir: Path) -> Iterator[Repositories]:
    """The SQLite index of ``data_dir`` (the one a ``server``/``srv`` fixture serves), opened beside it."""
    repos = open_repositories(f"sqlite:///{data_dir / 'index.sqlite3'}")
    try:
        yield repos
    finally:
        repos.close()


def _running(data_dir: Path, workers: int) -> Iterator[Server]:
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": str(workers)})
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    """A running server with two DIMSE workers, on the fresh data directory."""
    yield from _running(data_dir, 2)


@pytest.fixture
def srv(data_dir: Path) -> Iterator[Server]:
    """A running server with one DIMSE worker (every association in one process), on the fresh data
    directory."""
    yield from _running(data_dir, 1)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    import uuid

    import sqlalchemy as sa

    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    schema = f"e2e_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
