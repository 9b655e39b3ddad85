"""The reading side of a WAL that another process owns: what a zone lander needs of a log.

The worker that owns a WAL appends, fsyncs and deletes segments; the lake process follows it with
a ``WalFollower`` per WAL directory. It learns the durable end from the owner's board and lists the
segment files itself (the owner renames nothing, only creates and deletes), reads no further than
that end, and publishes each zone's released position for the owner, which deletes what no zone
needs (gateway/durable/wal_board.py). ``ZoneLander`` and ``WalReader`` use it as they use the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from gateway.durable.wal import WalReader, _Segment, _segment_at, durable_limit
from gateway.durable.wal_board import Board, ReleasedPositions

log = logging.getLogger(__name__)

# How often a waiting zone looks at the owner's durable end (a zone gathers 0.1 s of frames anyway).
POLL_SECS = 0.05


class WalFollower:
    def __init__(self, directory: str | Path, durable: Board, released: ReleasedPositions, *, poll_secs: float = POLL_SECS) -> None:
        self.directory = Path(directory)
        self._board = durable
        self._released = released
        self._poll_secs = poll_secs
        self._durable: tuple[int, int, int] = (0, 0, 0)
        self._segments: list[_Segment] = []  # replaced, never mutated: reader threads iterate their own
        self._wake: asyncio.Event | None = None
        self._unreadable = False  # the board could not be read last time (said once)

    def refresh(self) -> bool:
        """Read the owner's durable end (False: it never published one); list the segments again
        when it moved into one not seen yet."""
        try:
            durable = self._board.read()
        except OSError as exc:  # damaged: the owner rewrites it whole at its next fsync
            if not self._unreadable:  # once, not at every poll
                log.warning("the WAL's durable end cannot be read; keeping the last one", extra={"board": str(self._board.path), "error": str(exc)})
            self._unreadable = True
            return False
        self._unreadable = False
        if durable is None:
            return False
        durable = tuple(durable)
        if not self._segments or durable[1] > self._segments[-1].first_lsn or durable[0] < self._durable[0]:
            # A new segment, or an owner that started over on a log cut back after a failed fsync.
            self._segments = _list_segments(self.directory)
        self._durable = durable
        return True

    # -- what a consumer of a WriteAheadLog uses ----------------------------------------------

    @property
    def durable_lsn(self) -> int:
        """Now, as the owner last published it (a zone that drains stops only at the true end)."""
        self.refresh()
        return self._durable[0]

    @property
    def first_lsn(self) -> int:
        segments = self._segments
        return segments[0].first_lsn if segments else self._durable[0]

    def _durable_limit(self, segment: _Segment) -> int | None:
        return durable_limit(self._durable, segment)

    def reader(self, lsn: int) -> WalReader:
        return WalReader(self, lsn)  # type: ignore[arg-type]  # reads _segments, _durable_limit, durable_lsn

    def segment_start(self, lsn: int) -> int:
        segments = self._segments
        return _segment_at(segments, lsn).first_lsn if segments else 0

    def backlog_bytes(self, lsn: int) -> int:
        """Approximate bytes of log at or after ``lsn`` (whole segments; the last one to its durable end)."""
        durable_lsn, segment_lsn, offset = self._durable
        if durable_lsn <= lsn:
            return 0
        segments = self._segments
        total = 0
        for i, seg in enumerate(segments):
            nxt = segments[i + 1].first_lsn if i + 1 < len(segments) else durable_lsn + 1
            if nxt > lsn:
                total += offset if seg.first_lsn == segment_lsn else seg.size
        return total

    def expect_consumers(self, names) -> None:
        """A new set of zones starts: what was published before (an earlier life, another layout) is
        forgotten, and the owner waits for every zone's position again (it knows which it has)."""
        self._released.clear()

    def register_consumer(self, name: str, lsn: int) -> None:
        self._released.publish(name, lsn)

    def release(self, name: str, lsn: int) -> None:
        """Called once the zone's state at ``lsn`` is written: the owner may delete what lies below."""
        self._released.publish(name, lsn)

    async def wait_for_data(self, lsn: int, timeout: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Wait until records at or beyond ``lsn`` are durable (or ``stop()``); False on timeout."""
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        while True:
            self.refresh()
            if self._durable[0] > lsn:
                return True
            if stop is not None and stop():
                return False
            wait = self._poll_secs if until is None else min(self._poll_secs, until - loop.time())
            if wait <= 0:
                return False
            if self._wake is None:
                self._wake = asyncio.Event()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    async def wake_consumers(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = asyncio.Event()

    def close(self) -> None:
        self._board.close()
        self._released.close()


def _list_segments(directory: Path) -> list[_Segment]:
    found = []
    for path in sorted(directory.glob("*.wal")):
        try:
            first_lsn = int(path.stem)
            size = path.stat().st_size
        except (ValueError, FileNotFoundError):  # not a segment, or deleted as we looked
            continue
        found.append(_Segment(first_lsn, path, size))
    return found
