"""Per-device token buckets on records/s and bytes/s: one device's flood cannot starve the others.

A request's size is only known once its body is read, so buckets run on debt: a request is let in
while a bucket is not in deficit (checked before the body is read, without charging), then charged
what it actually carried once the device is authenticated. A device in deficit gets 429 with a
``Retry-After`` of the time its buckets need to refill to zero. Charging only authenticated
requests means nobody can drain another device's bucket by sending under its name.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import RateLimited
from gateway.settings import RateLimitSettings


@dataclass(slots=True)
class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``burst``; charges may push the level below zero."""

    level: float
    updated: float

    def refill(self, now: float, rate: float, burst: float) -> float:
        self.level = min(burst, self.level + (now - self.updated) * rate)
        self.updated = now
        return self.level


class DeviceRateLimiter:
    """Buckets per device, bounded: the least recently seen device is forgotten first (its bucket resets)."""

    def __init__(self, settings: Callable[[], RateLimitSettings], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, device: str) -> None:
        """Raise ``RateLimited`` while the device is in deficit; charges nothing."""
        s = self._settings()
        if not s.enabled:
            return
        pair = self._buckets.get(device)
        if pair is None:
            return
        now = self._clock()
        records, sent = pair
        wait = max(
            _wait_secs(records.refill(now, s.records_per_sec, s.burst_records), s.records_per_sec),
            _wait_secs(sent.refill(now, s.bytes_per_sec, s.burst_bytes), s.bytes_per_sec),
        )
        if wait > 0:
            retry_after = min(s.max_retry_after_secs, max(1, math.ceil(wait)))
            raise RateLimited(
                f"{device!r} is over its rate limit ({s.records_per_sec:g}/s, "
                f"{s.bytes_per_sec:g} bytes/s); retry in {retry_after} s",
                retry_after_secs=retry_after,
            )

    def charge(self, device: str, records: int, body_bytes: int) -> None:
        s = self._settings()
        if not s.enabled:
            return
        now = self._clock()
        pair = self._buckets.get(device)
        if pair is None:
            pair = (TokenBucket(float(s.burst_records), now), TokenBucket(float(s.burst_bytes), now))
            self._buckets[device] = pair
            while len(self._buckets) > s.max_tracked_devices:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device)
        records_bucket, bytes_bucket = pair
        records_bucket.refill(now, s.records_per_sec, s.burst_records)
        bytes_bucket.refill(now, s.bytes_per_sec, s.burst_bytes)
        records_bucket.level -= records
        bytes_bucket.level -= body_bytes

    def state(self, device: str) -> dict[str, float] | None:
        """The device's bucket levels (for the admin API), or None if it has not sent lately."""
        pair = self._buckets.get(device)
        if pair is None:
            return None
        s, now = self._settings(), self._clock()
        return {
            "records": round(pair[0].refill(now, s.records_per_sec, s.burst_records), 3),
            "bytes": round(pair[1].refill(now, s.bytes_per_sec, s.burst_bytes), 3),
        }


def _wait_secs(level: float, rate: float) -> float:
    return -level / rate if level < 0 else 0.0
