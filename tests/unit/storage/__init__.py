"""Unit tests of safepacs.storage."""
