"""What the disk under the WAL can do by itself: the latency of one small append plus fdatasync.

The ack latency target is stated against it (ack p99 at half load <= this p99 + 10 ms), so the
harness measures it on the same filesystem as the gateway's WAL, in the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.stats import percentile


def fsync_latency(directory: Path, *, appends: int = 300, append_bytes: int = 64 * 1024) -> dict:
    """p50/p99 in ms of ``append_bytes`` appended and fdatasynced, ``appends`` times."""
    fd, path = tempfile.mkstemp(prefix="fsync-probe-", dir=directory)
    block = os.urandom(append_bytes)
    latencies = []
    try:
        for _ in range(appends):
            started = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    latencies.sort()
    return {"p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000, "append_bytes": append_bytes}
