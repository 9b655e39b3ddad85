"""The queue of items waiting for a batch: earliest deadline first, with the oldest item's age at hand.

An item carries ``size`` records (a chunk of records is one item); the queue keeps the total, since
every batching decision counts records, not items.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class PendingItem:
    """One submitted item, how many records it carries, and the future its outcome goes to."""

    item: Any
    deadline: float
    enqueued_at: float
    future: asyncio.Future[Any]
    size: int = 1
    attempts: int = 0
    token: int = field(default=-1)  # which push is live; older heap entries for this item are stale


class PendingQueue:
    """Items ordered by deadline, so a batch taken from the head never holds an earlier deadline.

    A second heap keyed by enqueue time answers "how long has the oldest item waited" for the age
    bound; entries leave it lazily.
    """

    def __init__(self) -> None:
        self._by_deadline: list[tuple[float, int, PendingItem]] = []
        self._by_age: list[tuple[float, int, PendingItem]] = []
        self._tokens = itertools.count()
        self._length = 0
        self._records = 0

    def __len__(self) -> int:
        """How many items are queued."""
        return self._length

    @property
    def records(self) -> int:
        """How many records the queued items carry together."""
        return self._records

    def push(self, pending: PendingItem) -> None:
        token = next(self._tokens)
        pending.token = token
        heapq.heappush(self._by_deadline, (pending.deadline, token, pending))
        heapq.heappush(self._by_age, (pending.enqueued_at, token, pending))
        self._length += 1
        self._records += pending.size

    def head(self) -> PendingItem:
        """The item with the earliest deadline."""
        return self._by_deadline[0][2]

    def pop(self) -> PendingItem:
        """Remove and return the item with the earliest deadline."""
        _, _, pending = heapq.heappop(self._by_deadline)
        pending.token = -1
        self._length -= 1
        self._records -= pending.size
        return pending

    def pop_batch(self, max_records: int) -> list[PendingItem]:
        """Remove whole items from the head while their records add up to at most ``max_records``.

        Always at least one item: one larger than ``max_records`` goes alone, since it cannot be
        split here and would otherwise never leave. Packing stops at the first item that does not
        fit rather than skipping ahead, so the queue stays earliest-deadline first.
        """
        batch = [self.pop()]
        total = batch[0].size
        while self._length and total + self.head().size <= max_records:
            pending = self.pop()
            total += pending.size
            batch.append(pending)
        return batch

    def oldest_enqueued_at(self) -> float:
        """When the longest-waiting item still queued was queued."""
        while self._by_age[0][2].token != self._by_age[0][1]:
            heapq.heappop(self._by_age)
        return self._by_age[0][0]

    def drain(self) -> list[PendingItem]:
        """Remove and return everything, earliest deadline first."""
        items = [self.pop() for _ in range(self._length)]
        self._by_age.clear()
        return items
