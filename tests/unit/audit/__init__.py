"""Unit tests of safepacs.audit."""
