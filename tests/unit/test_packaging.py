"""What the wheel ships: every package-data pattern names files that exist (a moved folder whose
pattern was not updated would ship a SafePACS without its migrations)."""

from __future__ import annotations

import tomllib

from tests.support.paths import REPO

ROOT = REPO
PACKAGE = ROOT / "src" / "safepacs"


def test_every_package_data_pattern_matches_files() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["safepacs"]
    empty = [p for p in patterns if not any(PACKAGE.glob(p))]
    assert not empty, f"package-data patterns that match nothing under src/safepacs: {empty}"


def test_the_migrations_are_shipped() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["safepacs"]
    shipped = {path for p in patterns for path in PACKAGE.glob(p)}
    versions = set((PACKAGE / "db" / "migrations" / "versions").glob("*.py"))
    assert versions and versions <= shipped
    assert PACKAGE / "db" / "migrations" / "env.py" in shipped
