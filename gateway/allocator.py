"""Memory allocators set for a long-running service that hands large buffers between threads.

With their defaults, the allocators keep what the gateway frees rather than giving it back:

- glibc's ``malloc`` gives each thread that allocates its own arena and, once a large block
  (a WAL read, an object being built) was freed, serves blocks up to that size from those arenas
  instead of mapping them afresh; the arenas then stay as large as their largest moment.
- Arrow's default pool (mimalloc) keeps the pages it freed for reuse.

Measured at 1.5 times capacity with the curated zone on (docs/performance.md, "Memory"): the
gateway's summed PSS was 630-650 MiB with the defaults and 430-450 MiB with two arenas, blocks of
128 KiB and more mapped on their own (returned when freed) and Arrow on the system allocator, at
the same records per CPU-second.

An operator's own ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_`` or ``ARROW_DEFAULT_MEMORY_POOL``
wins: each is only set where the environment does not already say.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed rather than raised as blocks are freed
ARENAS = 2


def tune_allocators() -> None:
    """Call first thing in each process, before other threads start and before pyarrow is imported."""
    # Read by pyarrow when it is first imported, here and in every process started from here.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its own defaults stay
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, ARENAS)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
