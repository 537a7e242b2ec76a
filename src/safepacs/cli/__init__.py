"""The ``safepacs`` command line."""

from safepacs.cli._main import main

__all__ = ["main"]
