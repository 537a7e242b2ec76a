"""SafePACS tests (a package so that ``from tests.support.corpus import ...`` works from the repo root)."""
