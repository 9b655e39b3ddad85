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

The lake process also gives back, every second, the free pages left inside the arenas between
blocks still in use (``return_freed_pages``): its threads free bursts of WAL reads, decoded records
and row groups, and what they leave is not at the top of an arena, where glibc trims by itself.

An operator's own ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``ARROW_DEFAULT_MEMORY_POOL`` wins: each is only set, or trimming done, where the environment does
not already say.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed rather than raised as blocks are freed
ARENAS = 2
# How often the lake process hands free arena pages back. One malloc_trim there took 6-8 ms (20 ms
# at the 90th percentile) under overload, holding each arena's lock meanwhile: well behind the
# acks in the lake process, never in an ingest worker, whose event loop would wait for it.
TRIM_INTERVAL_SECS = 1.0


def tune_allocators() -> None:
    """Call first thing in each process, before other threads start and before pyarrow is imported."""
    # Read by pyarrow when it is first imported, here and in every process started from here.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    mallopt = _glibc("mallopt")
    if mallopt is None:  # not glibc: its own defaults stay
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, ARENAS)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def return_freed_pages(interval_secs: float = TRIM_INTERVAL_SECS) -> Callable[[], None]:
    """Every ``interval_secs``, in a thread of its own, hand the free pages inside glibc's arenas back
    to the kernel (``malloc_trim``). Returns what stops it; does nothing where glibc is not the
    allocator or ``MALLOC_TRIM_THRESHOLD_`` says the operator tunes trimming."""
    stop = threading.Event()
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return stop.set
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return stop.set
    malloc_trim.argtypes = [ctypes.c_size_t]

    def trim() -> None:
        while not stop.wait(interval_secs):
            started = time.perf_counter()
            malloc_trim(0)
            log.debug("arena pages returned", extra={"ms": round((time.perf_counter() - started) * 1000, 2)})

    threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
    return stop.set


def _glibc(name: str):
    """glibc's function ``name``, or None where the C library is another."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
