"""The allocator tuning that keeps object-sized buffers out of fresh memory mappings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator"
)

# Make and drop 0.5 MB buffers the way storing CT slices does; count the page faults that costs.
_CHURN = """
import resource, sys
from safepacs._memory import keep_large_buffers
tuned = keep_large_buffers() if sys.argv[1] == "tuned" else False
data = bytes(512 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    copies = [data + b"x", data + b"y", data + b"z"]
    del copies
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True, env={**clean, **env}
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_object_sized_buffers_are_reused_instead_of_faulted_in_again() -> None:
    untuned_done, untuned = _faults("plain")
    tuned_done, tuned = _faults("tuned")
    assert not untuned_done and tuned_done
    # 600 buffers of 128 pages: glibc maps each afresh unless tuned (then a handful of first touches).
    assert untuned > 20_000
    assert tuned < untuned / 20


def test_an_administrators_own_malloc_settings_win() -> None:
    done, _ = _faults("tuned", MALLOC_TRIM_THRESHOLD_="1048576")
    assert not done
