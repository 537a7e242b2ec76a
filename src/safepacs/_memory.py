"""Memory habits of the server processes: object-sized buffers kept in the C heap instead of fresh
memory mappings (glibc only), start-up objects left out of garbage collections, and the parent's
modules shared with the processes it forks.

Storing a 0.5 MB CT slice makes about six buffers of its size (the received data set, the Part 10
bytes, pydicom's pixel data, the ciphertext, the sealed object...).  glibc serves allocations that
large with a fresh ``mmap`` each time and gives the memory back on ``free`` (or trims it off the top
of the heap), so every buffer is paid for again in page faults and zeroed pages, a large share of the
CPU of ingesting CT slices (measured in bench/README.md, "Ingest benchmark").  Raising the mmap
threshold to 4 MiB and the trim threshold to 64 MiB keeps those pages in the process for the next
object; objects over 4 MiB are mapped as before, so what a worker holds on to stays bounded by the
objects it handles at once.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "freeze_start_up", "keep_large_buffers", "share_with_children"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3


def keep_large_buffers() -> bool:
    """Tune this process's glibc allocator (inherited by the processes it forks); whether it was done.

    Nothing is changed on other C libraries, or when the environment sets the thresholds itself
    (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, glibc's own way).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:  # pragma: no cover - glibc accepts both values
        log.warning("could not tune the memory allocator; large objects cost more CPU to store")
    return done


def freeze_start_up() -> None:
    """Leave what a server process made while starting (modules, pydicom's dictionaries, SQLAlchemy's
    compiled statements, the web app: hundreds of thousands of objects that live as long as the
    process) out of every later garbage collection.  Each full collection traversed them all and
    held the GIL long enough to make the slowest 2% of QIDO-RS searches at 100,000 studies about twice
    as slow (measured in bench/README.md, "DICOMweb benchmark").  Call it once the process is ready to
    serve."""
    gc.collect()
    gc.freeze()


def share_with_children() -> None:
    """In ``serve``'s parent, just before it forks the DIMSE workers and the HTTPS process: leave what
    it holds (the modules of pydicom, pynetdicom, SQLAlchemy, cryptography... ~85 MB of Python
    objects) out of every garbage collection, its own and its children's.

    A forked child shares the parent's pages until it writes to them, but a full collection writes
    to every object it traverses (the collector's bookkeeping lives in each object's header), so the
    first ``gc.collect()`` in a child copied nearly all of them: each process ended up with ~44 MB of
    its own, 240 MB in all for a parent, two workers and the HTTPS process at rest, of which ~150 MB
    once the parent froze them (bench/README.md, "Memory benchmark").  No collection first, as
    Python's documentation of ``gc.freeze`` advises: the memory it would free becomes holes that the
    children's first allocations fill, writing to (and so copying) the pages around them.
    """
    gc.freeze()
