"""The allocators a serve process sets up give freed memory back (gateway/allocator.py).

Each case runs in a fresh interpreter: glibc's settings and Arrow's pool are per process and
fixed at start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# A lake process's pattern: a thread reads and frees large blocks, one stays in use.
RETAINED_AFTER_FREEING = """
import json, threading, psutil
from gateway.allocator import tune_allocators
if TUNE:
    tune_allocators()
def churn(out):
    first = bytearray(8 << 20)
    del first  # with glibc's defaults, freeing it raises the size mapped on its own to 8 MiB
    blocks = [bytearray(1 << 20) for _ in range(96)]
    before = psutil.Process().memory_info().rss
    keep = blocks[-1]
    del blocks
    out.append((before - psutil.Process().memory_info().rss) >> 20)
    out.append(keep)
out = []
t = threading.Thread(target=churn, args=(out,)); t.start(); t.join()
import pyarrow
print(json.dumps({"returned_mib": out[0], "arrow_pool": pyarrow.default_memory_pool().backend_name}))
"""


def run_case(tune: bool, env: dict[str, str] | None = None) -> dict:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ARROW_DEFAULT"))}
    child_env.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", f"TUNE = {tune}\n" + RETAINED_AFTER_FREEING],
        cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def test_freed_blocks_go_back_to_the_system_and_arrow_uses_the_system_allocator():
    default, tuned = run_case(tune=False), run_case(tune=True)
    assert default["returned_mib"] < 16, default  # glibc kept the freed megabytes in the thread's arena
    assert tuned["returned_mib"] >= 90, tuned  # each was mapped on its own and unmapped when freed
    assert (default["arrow_pool"], tuned["arrow_pool"]) == ("mimalloc", "system")


def test_an_operators_own_settings_win():
    mine = run_case(tune=True, env={"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"})
    assert mine["returned_mib"] < 16, mine
    assert mine["arrow_pool"] == "jemalloc"
