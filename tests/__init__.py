"""SafePACS tests (a package so that ``from tests.corpus import ...`` works from the repo root)."""
