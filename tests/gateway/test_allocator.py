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
    return run_script(f"TUNE = {tune}\n" + RETAINED_AFTER_FREEING, env)


def run_script(script: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh interpreter with none of the allocators' variables but ``env``."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ARROW_DEFAULT"))}
    child_env.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=60, check=True
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


# Small blocks freed around a few still in use: free pages inside an arena, which glibc trims only
# from the top of a heap by itself.
LEFT_BETWEEN_BLOCKS = """
import json, os, time, psutil
from gateway.allocator import tune_allocators, return_freed_pages
tune_allocators()
blocks = [bytes(4000) + bytes([i % 256]) for i in range(60_000)]  # ~240 MiB below the mapping threshold
kept = blocks[::256]  # one in 256 stays: each 4 KiB page but a few is free, none at the top
del blocks
before = psutil.Process().memory_info().rss
stop = return_freed_pages(0.05) if TRIM else (lambda: None)
time.sleep(0.5)
stop()
print(json.dumps({"returned_mib": (before - psutil.Process().memory_info().rss) >> 20, "kept": len(kept)}))
"""


def run_trim_case(trim: bool, env: dict[str, str] | None = None) -> dict:
    return run_script(f"TRIM = {trim}\n" + LEFT_BETWEEN_BLOCKS, env)


def test_the_lake_processs_trimming_returns_pages_freed_between_blocks_in_use():
    untrimmed, trimmed = run_trim_case(trim=False), run_trim_case(trim=True)
    assert untrimmed["returned_mib"] < 16, untrimmed  # glibc keeps the pages between the kept blocks
    assert trimmed["returned_mib"] >= 150, trimmed


def test_an_operators_trim_threshold_turns_the_periodic_trimming_off():
    mine = run_trim_case(trim=True, env={"MALLOC_TRIM_THRESHOLD_": str(128 << 10)})
    assert mine["returned_mib"] < 16, mine
