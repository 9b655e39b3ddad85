"""Retried requests land nothing twice: idempotency keys and (device_id, seq) within a window.

Both indexes are in memory, per gateway process, bounded in entries and in time. They catch the
common case (a device retrying after a lost response reaches the same gateway); the lake keeps
``(device_id, seq)`` on every record so downstream jobs can finish the job across the fleet.
A sequence number is only a duplicate when it comes back with the same event time, so a device
that restarts its counter after a reset is never mistaken for a retry.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class SeqIndex:
    def __init__(self, window_secs: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_secs
        self._max = max_keys
        self._clock = clock
        # (device_id, seq) -> (event_ms, seen_at), oldest first.
        self._seen: OrderedDict[tuple[str, int], tuple[int, float]] = OrderedDict()

    def is_duplicate(self, device_id: str, seq: int, event_ms: int) -> bool:
        entry = self._seen.get((device_id, seq))
        return entry is not None and entry[0] == event_ms and self._clock() - entry[1] <= self._window

    def remember(self, keys: list[tuple[str, int, int]]) -> None:
        now = self._clock()
        seen = self._seen
        for device_id, seq, event_ms in keys:
            key = (device_id, seq)
            seen.pop(key, None)
            seen[key] = (event_ms, now)
        self._expire(now)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen and (len(seen) > self._max or now - next(iter(seen.values()))[1] > self._window):
            seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class IdempotencyCache:
    """Remembers the answer to each ``Idempotency-Key`` (per device) for the dedup window."""

    def __init__(self, window_secs: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_secs
        self._max = max_keys
        self._clock = clock
        self._done: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()
        self._running: dict[tuple[str, str], asyncio.Future[Any]] = {}

    def lookup(self, key: tuple[str, str]) -> tuple[Any, asyncio.Future[Any] | None]:
        """The stored answer, or the future of a request with that key still running."""
        entry = self._done.get(key)
        if entry is not None and self._clock() - entry[1] <= self._window:
            return entry[0], None
        return None, self._running.get(key)

    def begin(self, key: tuple[str, str]) -> None:
        self._running[key] = asyncio.get_running_loop().create_future()

    def end(self, key: tuple[str, str], answer: Any | None) -> None:
        """Store ``answer`` (None: the request failed, a retry must run again) and wake waiters."""
        future = self._running.pop(key, None)
        if answer is not None:
            now = self._clock()
            self._done[key] = (answer, now)
            while self._done and (len(self._done) > self._max or now - next(iter(self._done.values()))[1] > self._window):
                self._done.popitem(last=False)
        if future is not None and not future.done():
            future.set_result(answer)
