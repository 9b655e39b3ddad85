"""Workers sharing one listening socket take their share of the connections waiting on it.

Every worker is woken when connections wait on the instance's socket, and the first to get there
took all of them: of 32 connections opened at once to two workers, the busier took 17-32 (median
29), and long-lived connections (a load balancer's) stay where they were accepted, one worker at
its limit beside an idle one. So each worker publishes how many connections it holds in a small
file of the instance's private runtime directory, one slot per worker, and takes from the queue
only up to its fair share of all held and waiting (the Acceptor, acceptor.py); one that holds more
than its share (its sibling restarted) closes one after an answer now and then, so their clients
reconnect to where there is room (gateway/edge/connections.py). What its siblings
leave waiting (one busy, stalled or dead) it takes anyway some 20 ms later: 10 ms on it takes its
share of what waits (connections that kept arriving while every worker waited are everyone's; the
first to look again took them all, 2-30 in one round of 32), and what still waits 10 ms after
that, all of it.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_SLOT = struct.Struct("=q")
# Published by a worker that no longer accepts (draining): its siblings leave nothing to it.
NOT_ACCEPTING = -1
# Connections a worker may hold above its fair share before it leaves the rest to its siblings.
SLACK = 1
# Beyond its fair share by more than this fraction of it (1/8), a worker hands connections back.
REBALANCE_SLACK_DIVISOR = 8


def share_file(runtime: Path) -> Path:
    return runtime / "connections"


def leave_nothing_to(runtime: Path, index: int) -> None:
    """Worker ``index`` is gone (the supervisor saw it exit): its siblings stop leaving it a share.

    Its slot would otherwise keep the count it last published until its replacement starts, and a
    worker that keeps dying is restarted only after a backoff of up to 30 s.
    """
    try:
        with open(share_file(runtime), "r+b") as shared:
            if os.fstat(shared.fileno()).st_size >= (index + 1) * _SLOT.size:
                shared.seek(index * _SLOT.size)
                shared.write(_SLOT.pack(NOT_ACCEPTING))  # the workers' mappings see it: one page cache
    except FileNotFoundError:
        pass  # no worker has shared yet


class SiblingConnections:
    """This worker's slot among its siblings': how many connections each holds."""

    def __init__(self, path: Path, index: int, workers: int) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is not one of {workers} workers")
        self.index = index
        self.workers = workers
        size = workers * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Allocated, not sparse (a write into a hole of a mapped file on a full disk is a SIGBUS);
            # every worker sizes it the same, so racing here is harmless.
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._counts = struct.Struct(f"={workers}q")
        self.publish(0)

    def publish(self, held: int) -> None:
        if not self._map.closed:  # connections still closing after it stopped accepting change nothing
            _SLOT.pack_into(self._map, self.index * _SLOT.size, held)

    def stop_accepting(self) -> None:
        self.publish(NOT_ACCEPTING)

    def quota(self, held: int, waiting: int) -> int:
        """How many of ``waiting`` connections this worker, holding ``held``, should take now."""
        accepting = self._accepting(held)
        fair = -(-(sum(accepting) + waiting) // len(accepting))
        return max(0, fair + SLACK - held)

    def over_share(self, held: int) -> bool:
        """Whether this worker, holding ``held``, holds more than its fair share of what every
        accepting worker holds, by more than an eighth of it (at least ``SLACK``): a sibling
        restarted, or started later, holds none of the long-lived connections taken meanwhile,
        while many short-lived ones are never split evenly at any instant."""
        accepting = self._accepting(held)
        if len(accepting) < 2:
            return False
        fair = -(-sum(accepting) // len(accepting))
        return held > fair + max(SLACK, fair // REBALANCE_SLACK_DIVISOR)

    def _accepting(self, held: int) -> list[int]:
        """What each accepting worker holds, this one counted (as holding ``held``) whatever it published."""
        counts = list(self._counts.unpack_from(self._map))
        counts[self.index] = held
        return [count for count in counts if count != NOT_ACCEPTING]

    def close(self) -> None:
        if not self._map.closed:
            self.stop_accepting()
            self._map.close()
