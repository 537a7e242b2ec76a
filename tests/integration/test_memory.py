"""The allocator tuning that keeps object-sized buffers out of fresh memory mappings, and the parent's
modules shared with the server processes it forks."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.server import Server

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


def _private_and_resident(pid: int) -> tuple[int, int]:
    """(kB of the process's own pages, kB resident) from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Rss"]


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's smaps_rollup")
def test_the_workers_share_the_parents_modules(server: Server) -> None:
    """The DIMSE workers are forked from a parent that imported pydicom, pynetdicom, SQLAlchemy...
    and froze them out of garbage collection: a worker at rest holds most of its memory in pages
    shared with the parent.  Without the freeze, the worker's first full collection wrote to every
    object header and so copied ~45% of its resident pages (~44 of 99 MB); with it ~14%."""
    deadline = time.monotonic() + 60
    while len(pids := re.findall(r"DIMSE worker accepting.*pid=(\d+)", server.stderr_text())) < 2:
        assert time.monotonic() < deadline, server.stderr_text()
        time.sleep(0.05)
    time.sleep(0.5)  # past the worker's start-up: it has logged, and waits for connections
    for pid in map(int, pids):
        private, resident = _private_and_resident(pid)
        assert private < resident / 3, (pid, private, resident)
