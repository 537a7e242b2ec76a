"""Giving freed heap back to the system when the HTTPS process goes idle."""

from __future__ import annotations

import ctypes
import platform

import pytest

from safepacs._memory import give_back_free_memory


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_free_heap_kept_by_the_trim_threshold_is_given_back() -> None:
    libc = ctypes.CDLL(None)
    libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD: keep what is freed, as serve does
    libc.mallopt(-3, 4 * 1024 * 1024)  # M_MMAP_THRESHOLD: 1 MiB blocks come from the heap
    try:
        blocks = [bytearray(b"x" * (1024 * 1024)) for _ in range(64)]  # 64 MiB, written
        before_free = _rss_kb()
        del blocks
        kept = _rss_kb()
        assert before_free - kept < 16 * 1024, "freed blocks stay resident under the trim threshold"
        assert give_back_free_memory()
        assert kept - _rss_kb() > 32 * 1024, "malloc_trim gave the free heap back"
    finally:  # glibc's defaults again for the rest of the test run
        libc.mallopt(-1, 128 * 1024)
        libc.mallopt(-3, 128 * 1024)
