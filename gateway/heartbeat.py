"""Signs of life from the supervised processes, and the supervisor's watch over them.

A worker or the lake process that is alive but stuck (a deadlock, a loop that never yields, a call
that never returns, a process stopped by a signal) keeps its connections and answers nothing; only
its death would make the supervisor act. So each of them touches a file of its own in the instance's
runtime directory from its event loop, once a second, and the supervisor kills a process whose file
has not changed for ``listen.stall_timeout_secs`` and restarts it as if it had died (its WAL is
caught up by its successor, as after a SIGKILL). Silence is measured on the supervisor's monotonic
clock, so a step of the wall clock is not mistaken for one, and a pause of the whole instance (its
process group stopped, a virtual machine paused) is not either: the supervisor, paused too, finds a
gap between its own looks (``Watchdog.look``) and counts every silence afresh. A process is watched from its first beat
on; before it, start-up and recovery (a long WAL to scan) may take long, so it gets
``listen.start_timeout_secs`` for them, generous, and is killed and restarted only past that: one
stuck while starting (on a disk that stopped answering, or stopped by a signal) would otherwise
hold its WAL and its share of the connections for good, and nothing would say so.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

BEAT_SECS = 1.0
# The supervisor looks at least every 50 ms: a gap this long between two looks means it was paused
# (or starved), and the processes it watches most likely with it.
PAUSED_SECS = 2.0


def heartbeat_file(runtime: Path, index: int | str) -> Path:
    return runtime / f"alive-{index}"


async def keep_beating(path: Path) -> None:
    """Touch ``path`` once a second for as long as the event loop turns."""
    while True:
        try:
            path.touch()
        except OSError:  # the runtime directory is gone: the supervisor is stopping
            pass
        await asyncio.sleep(BEAT_SECS)


def start_beating(runtime: Path | None, index: int | str) -> asyncio.Task[None] | None:
    """A supervised process's beat (``runtime``: the instance's runtime directory, None when alone)."""
    if runtime is None:
        return None
    return asyncio.create_task(keep_beating(heartbeat_file(runtime, index)), name="heartbeat")


class Watchdog:
    """Which supervised processes have been silent for longer than ``stall_secs`` (0: never)."""

    def __init__(self, runtime: Path, stall_secs: float, clock: Callable[[], float] = time.monotonic,
                 start_secs: float = 0.0) -> None:
        self._runtime = runtime
        self._stall_secs = stall_secs
        self._start_secs = start_secs  # for a process not beating yet (0: wait for it however long)
        self._clock = clock
        self._seen: dict[int | str, tuple[int, float]] = {}  # index -> (the file's mtime, when it was first seen)
        self._starting: dict[int | str, float] = {}  # index -> when it was started, until its first beat
        self._looked_at: float | None = None  # when the supervisor last said it was running

    def forget(self, index: int | str) -> None:
        """A new process starts under ``index``: what its predecessor left says nothing about it,
        and its start-up is timed from now."""
        self._seen.pop(index, None)
        self._starting[index] = self._clock()
        try:
            heartbeat_file(self._runtime, index).unlink()
        except FileNotFoundError:
            pass

    def grant_time(self) -> None:
        """Count every process's silence afresh: after one was killed, the others may have been
        waiting on it (the retry ledger's write lock is one for the whole instance)."""
        now = self._clock()
        self._seen = {index: (beat, now) for index, (beat, _) in self._seen.items()}
        self._starting = dict.fromkeys(self._starting, now)
        self._looked_at = now  # what granted the time (a kill and its wait) was no pause

    def look(self) -> float | None:
        """The supervisor is running now. After a gap since it last said so longer than
        ``PAUSED_SECS`` it was paused, and the processes it watches most likely with it (a SIGSTOP of
        the whole instance, a virtual machine paused or migrated): their silence meanwhile is no sign
        that they are stuck, so it is counted afresh. Returns that gap, or None."""
        now = self._clock()
        gap = 0.0 if self._looked_at is None else now - self._looked_at
        self._looked_at = now
        if gap <= PAUSED_SECS:
            return None
        self.grant_time()
        return gap

    def silent_for(self, index: int | str) -> float | None:
        """Seconds since the process last beat, once that exceeds the limit; None otherwise."""
        if not self._stall_secs:
            return None
        try:
            beat = os.stat(heartbeat_file(self._runtime, index)).st_mtime_ns
        except FileNotFoundError:  # not started beating yet
            return None
        self._starting.pop(index, None)
        now = self._clock()
        seen = self._seen.get(index)
        if seen is None or seen[0] != beat:
            self._seen[index] = (beat, now)
            return None
        silent = now - seen[1]
        return silent if silent > self._stall_secs else None

    def starting_for(self, index: int | str) -> float | None:
        """Seconds since the process was started without a first beat, once that exceeds
        ``start_secs``; None otherwise."""
        started = self._starting.get(index)
        if not self._start_secs or started is None:
            return None
        if heartbeat_file(self._runtime, index).exists():  # it has begun to beat: ``silent_for`` watches it
            self._starting.pop(index, None)
            return None
        starting = self._clock() - started
        return starting if starting > self._start_secs else None
