"""The benchmark's accounting of a server: what every process under it uses, not only the first."""

from __future__ import annotations

import subprocess
import sys

import psutil

from benchmarks.processes import usage

# A parent that starts a child holding 64 MiB of its own, then waits to be stopped.
_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()
print("ready", flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


def test_a_servers_memory_counts_its_child_processes():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert parent.stdout.readline().strip() == b"ready"
        root = psutil.Process(parent.pid)
        own = root.memory_full_info().pss
        total = usage(root).memory_bytes
        assert total - own >= 64 << 20  # the child's touched pages are counted
        child = root.children()[0]
        assert usage(root).fds == root.num_fds() + child.num_fds()
    finally:
        parent.stdin.close()
        parent.wait(10)
        parent.stdout.close()
