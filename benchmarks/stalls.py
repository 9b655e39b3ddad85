"""Where the event loop stops: the longest runs of busy samples on a gateway's main thread.

    python -m benchmarks.stalls PID [--seconds 10] [--rate 250] [--top 8] [--keep FILE]

A p99 is decided by the few requests that waited, and they wait when the event loop does not turn:
a long callback, a system call made from the loop, or another thread holding the GIL. A flame graph
sums those away. This records the process with py-spy (``--idle --threads``, so every thread has
one sample per tick, in order), finds the longest stretches in which the main thread was never back
in the loop's idle wait, and prints what it ran meanwhile and what the other threads were doing.
Two stalls found this way: full garbage collections (40-50 ms) and deleting a released WAL segment
from the loop (36 ms); docs/performance.md has the account.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.profile import available, py_spy_command

# A main-thread sample whose innermost frame is one of these is the loop waiting for events.
IDLE_FRAMES = ("Runner.run", "run_until_complete", "run_forever", "run")
# Functions (the last part of a frame's name) in which another thread is waiting, not working.
WAITING = frozenset({"_worker", "wait", "get", "select", "_feed", "_recv", "_recv_bytes"})


@dataclass
class Stall:
    first_tick: int
    ticks: int
    main: collections.Counter = field(default_factory=collections.Counter)  # what the main thread ran
    others: dict[str, collections.Counter] = field(default_factory=dict)  # thread -> what it ran

    def millis(self, rate_hz: int) -> float:
        return self.ticks * 1000 / rate_hz


def _describe(frames: list[dict], stack: list[int], depth: int = 3) -> str:
    return " <- ".join(f"{frames[i]['name']}:{frames[i].get('line', '?')}" for i in reversed(stack[-depth:]))


def find_stalls(speedscope: dict, top: int = 8) -> list[Stall]:
    """The ``top`` longest stretches of consecutive busy main-thread samples, longest first."""
    frames = speedscope["shared"]["frames"]
    profiles = speedscope["profiles"]
    main = next(p for p in profiles if "MainThread" in p["name"])
    stalls: list[Stall] = []
    current: Stall | None = None
    for tick, stack in enumerate(main["samples"]):
        if not stack or frames[stack[-1]]["name"] in IDLE_FRAMES:
            current = None
            continue
        if current is None:
            current = Stall(tick, 0)
            stalls.append(current)
        current.ticks += 1
        current.main[_describe(frames, stack)] += 1
    stalls.sort(key=lambda s: s.ticks, reverse=True)
    for stall in stalls[:top]:
        for profile in profiles:
            if profile is main:
                continue
            busy = collections.Counter(
                _describe(frames, stack, 2)
                for stack in profile["samples"][stall.first_tick: stall.first_tick + stall.ticks]
                if stack and frames[stack[-1]]["name"].rsplit(".", 1)[-1] not in WAITING
            )
            if busy:
                stall.others[profile["name"]] = busy
    return stalls[:top]


def record(pid: int, seconds: float, rate_hz: int, out: Path) -> dict:
    argv = [py_spy_command(), "record", "--pid", str(pid), "--rate", str(rate_hz), "--duration", str(int(seconds)), "--idle",
            "--threads", "--nonblocking", "--format", "speedscope", "--output", str(out)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pid", type=int, help="the gateway (worker) process")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=250, help="samples per second (a tick is 1000/rate ms)")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--keep", type=Path, help="keep the speedscope recording here (open it at speedscope.app)")
    args = p.parse_args(argv)
    if not available():
        p.error("needs py-spy (pip install py-spy)")
    out = args.keep or Path(tempfile.mkdtemp()) / "stalls.speedscope.json"
    stalls = find_stalls(record(args.pid, args.seconds, args.rate, out), args.top)
    for stall in stalls:
        print(f"{stall.millis(args.rate):6.0f} ms from {stall.first_tick * 1000 / args.rate / 1000:.2f} s: "
              f"{'; '.join(f'{what} x{n}' for what, n in stall.main.most_common(2))}")
        for thread, busy in stall.others.items():
            print(f"         meanwhile {thread}: {'; '.join(f'{what} x{n}' for what, n in busy.most_common(2))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
