"""Where the test suite's files are, wherever a test module sits under ``tests/``."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent  #: the ``tests`` folder
DATA = TESTS / "data"  #: files the tests read (schemas), none of them patient data
REPO = TESTS.parent  #: the repository's root (pyproject.toml, src/)
