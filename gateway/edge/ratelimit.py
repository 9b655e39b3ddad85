"""Per-device token buckets on records/s and bytes/s: one device's flood cannot starve the others.

A request's size is only known once its body is read, so buckets run on debt: a request is let in
while a bucket is not in deficit (checked before the body is read, without charging), then charged
what it actually carried once the device is authenticated. A device in deficit gets 429 with a
``Retry-After`` of the time its buckets need to refill to zero. Charging only authenticated
requests means nobody can drain another device's bucket by sending under its name.

Once ``use_shared`` gives it the instance's buckets (ratelimit_store.py), the limit holds for the
whole instance and across restarts: the worker holds a small lease of each device's tokens and
charges requests against it in memory, writing to the shared bucket only when a lease is spent
(what it overspent, plus the next lease, in one transaction). A worker may so overshoot by at most
one lease, ``LEASE_SECS`` of the rate or ``1/LEASE_SHARE`` of the burst, whichever is smaller.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import RateLimited
from gateway.edge.ratelimit_store import Limits, SharedBuckets
from gateway.durable.ledger_clock import Instant
from gateway.durable.retry_ledger import LedgerError
from gateway.settings import RateLimitSettings

log = logging.getLogger(__name__)

LEASE_SECS = 0.05
LEASE_SHARE = 16


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

    def __init__(
        self,
        settings: Callable[[], RateLimitSettings],
        *,
        clock: Callable[[], float] = time.monotonic,
        shared_clock: Callable[[], Instant] = Instant.now,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._shared_clock = shared_clock  # shared buckets outlive this process and are read by others
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()
        self._shared: SharedBuckets | None = None
        self._leases: OrderedDict[str, list[float]] = OrderedDict()  # tokens this worker holds: [records, bytes]

    def __len__(self) -> int:
        return len(self._leases) if self._shared is not None else len(self._buckets)

    def use_shared(self, shared: SharedBuckets) -> None:
        """Keep the buckets in the instance's shared store from now on (see the module's docstring)."""
        self._shared = shared
        self._buckets.clear()

    def check(self, device: str) -> None:
        """Raise ``RateLimited`` while the device is in deficit; charges nothing."""
        s = self._settings()
        if not s.enabled:
            return
        if self._shared is not None:
            self._check_shared(device, s)
            return
        pair = self._buckets.get(device)
        if pair is None:
            return
        now = self._clock()
        records, sent = pair
        _refuse_if_in_deficit(
            device, s, records.refill(now, s.records_per_sec, s.burst_records), sent.refill(now, s.bytes_per_sec, s.burst_bytes)
        )

    def charge(self, device: str, records: int, body_bytes: int) -> None:
        s = self._settings()
        if not s.enabled:
            return
        if self._shared is not None:
            self._charge_shared(device, s, records, body_bytes)
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
        if self._shared is not None:
            return self._state_shared(device)
        pair = self._buckets.get(device)
        if pair is None:
            return None
        s, now = self._settings(), self._clock()
        return {
            "records": round(pair[0].refill(now, s.records_per_sec, s.burst_records), 3),
            "bytes": round(pair[1].refill(now, s.bytes_per_sec, s.burst_bytes), 3),
        }

    # -- shared buckets, taken in leases ----------------------------------------------------------

    def _check_shared(self, device: str, s: RateLimitSettings) -> None:
        lease = self._leases.get(device)
        if lease is not None and lease[0] > 0 and lease[1] > 0:
            return  # this worker still holds tokens of the device: nothing to ask
        try:
            levels = self._shared.levels(device, _limits(s), self._shared_clock())
        except LedgerError as exc:
            log.warning("shared rate-limit buckets unreadable; letting the request in", extra={"error": str(exc)})
            return
        if levels is not None:
            _refuse_if_in_deficit(device, s, *levels)

    def _charge_shared(self, device: str, s: RateLimitSettings, records: int, body_bytes: int) -> None:
        lease = self._leases.get(device)
        if lease is None:
            lease = self._leases[device] = [0.0, 0.0]
            while len(self._leases) > s.max_tracked_devices:
                self._leases.popitem(last=False)
        else:
            self._leases.move_to_end(device)
        lease[0] -= records
        lease[1] -= body_bytes
        if lease[0] >= 0 and lease[1] >= 0:
            return
        want = (min(s.burst_records / LEASE_SHARE, s.records_per_sec * LEASE_SECS), min(s.burst_bytes / LEASE_SHARE, s.bytes_per_sec * LEASE_SECS))
        debt = (max(0.0, -lease[0]), max(0.0, -lease[1]))
        try:
            granted = self._shared.settle(device, _limits(s), self._shared_clock(), debt, want)
        except LedgerError as exc:
            log.warning("shared rate-limit buckets unwritable; the charge stays with this worker", extra={"error": str(exc)})
            return
        lease[0] = max(0.0, lease[0]) + granted[0]
        lease[1] = max(0.0, lease[1]) + granted[1]

    def _state_shared(self, device: str) -> dict[str, float] | None:
        s = self._settings()
        try:
            levels = self._shared.levels(device, _limits(s), self._shared_clock())
        except LedgerError:
            levels = None
        lease = self._leases.get(device)
        if levels is None and lease is None:
            return None
        held = lease or [0.0, 0.0]
        shared = levels or (float(s.burst_records), float(s.burst_bytes))
        # What the instance has left: the shared bucket plus the lease this worker holds.
        return {"records": round(shared[0] + held[0], 3), "bytes": round(shared[1] + held[1], 3)}


def _limits(s: RateLimitSettings) -> Limits:
    return Limits(s.records_per_sec, float(s.burst_records), s.bytes_per_sec, float(s.burst_bytes), s.max_tracked_devices)


def _refuse_if_in_deficit(device: str, s: RateLimitSettings, records_level: float, bytes_level: float) -> None:
    wait = max(_wait_secs(records_level, s.records_per_sec), _wait_secs(bytes_level, s.bytes_per_sec))
    if wait > 0:
        retry_after = min(s.max_retry_after_secs, max(1, math.ceil(wait)))
        raise RateLimited(
            f"{device!r} is over its rate limit ({s.records_per_sec:g}/s, "
            f"{s.bytes_per_sec:g} bytes/s); retry in {retry_after} s",
            retry_after_secs=retry_after,
        )


def _wait_secs(level: float, rate: float) -> float:
    return -level / rate if level < 0 else 0.0
