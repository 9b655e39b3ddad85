"""Rate-limit buckets shared by the workers of an instance and kept across restarts.

They live in the retry ledger's LMDB environment (``<wal.dir>/ledger``, gateway/durable/retry_ledger.py) as
named databases, ``ratelimit`` for devices and ``auth_failures`` for the source addresses whose
requests failed authentication: ``key -> (records level, bytes level, updated)``, ``updated``
an ``Instant`` (gateway/durable/ledger_clock.py) so that a restarted worker refills a bucket for the
time it was down and no more, and a step of the wall clock neither fills a bucket nor holds it
empty. Workers do not write it per request: each takes tokens in small leases (ratelimit.py) and
comes back when a lease is spent, settling what it charged beyond it in the same transaction.

Bounded: beyond ``max_tracked_devices`` entries, buckets that have refilled to their burst (the
same as no entry) are dropped, then the least recently updated ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import lmdb

from gateway.durable.ledger_clock import INSTANT_BYTES, Instant
from gateway.durable.retry_ledger import LedgerError, RetryLedger

_LEVELS = struct.Struct(">dd")  # records level, bytes level; then when they were updated (an Instant)
_ENTRY_BYTES = _LEVELS.size + INSTANT_BYTES
DEVICES = b"ratelimit"
AUTH_FAILURES = b"auth_failures"


@dataclass(frozen=True, slots=True)
class Limits:
    """One device's bucket sizes and refill rates, records and bytes."""

    records_per_sec: float
    burst_records: float
    bytes_per_sec: float
    burst_bytes: float
    max_entries: int

    def refill(self, raw: bytes | None, now: Instant) -> tuple[float, float]:
        """Both levels of a stored entry (or a new bucket) refilled up to ``now``."""
        if raw is None or len(raw) != _ENTRY_BYTES:  # none, or an earlier version's: a full bucket
            return self.burst_records, self.burst_bytes
        records, sent = _LEVELS.unpack_from(raw)
        elapsed = now.real_ms_since(_updated(raw)) / 1000
        return (
            min(self.burst_records, records + elapsed * self.records_per_sec),
            min(self.burst_bytes, sent + elapsed * self.bytes_per_sec),
        )


class SharedBuckets:
    """One named database of buckets (``DEVICES`` or ``AUTH_FAILURES``) in an open retry ledger."""

    def __init__(self, ledger: RetryLedger, name: bytes = DEVICES) -> None:
        self._ledger = ledger
        self._name = name

    def _handle(self):
        return self._ledger.database(self._name)

    def levels(self, device: str, limits: Limits, now: Instant) -> tuple[float, float] | None:
        """The device's shared levels now, or None when it has no bucket (a full one)."""
        env, db = self._handle()
        try:
            with env.begin(db=db) as txn:
                raw = txn.get(_key(device))
        except lmdb.Error as exc:
            raise LedgerError(f"the rate-limit buckets cannot be read: {exc}") from None
        return None if raw is None else limits.refill(raw, now)

    def settle(
        self, device: str, limits: Limits, now: Instant, debt: tuple[float, float], want: tuple[float, float]
    ) -> tuple[float, float]:
        """Charge ``debt`` to the device's bucket and take up to ``want`` more as a lease; returns the lease."""
        env, db = self._handle()
        key = _key(device)
        with self._ledger.write() as txn:
            levels = limits.refill(txn.get(key, db=db), now)
            granted = []
            left = []
            for level, owed, wanted in zip(levels, debt, want, strict=True):
                level -= owed
                grant = min(wanted, max(0.0, level))  # never lend what the bucket does not hold
                granted.append(grant)
                left.append(level - grant)
            txn.put(key, _LEVELS.pack(left[0], left[1]) + now.pack(), db=db)
            if txn.stat(db)["entries"] > limits.max_entries:
                _forget(txn, db, limits, now)
        return granted[0], granted[1]


def _key(device: str) -> bytes:
    return device.encode("utf-8", "surrogateescape")


def _updated(raw: bytes) -> Instant:
    return Instant.unpack(raw[_LEVELS.size :])


def _forget(txn, db, limits: Limits, now: Instant) -> None:
    """Drop full buckets, then the least recently updated, down to three quarters of the bound."""
    full: list[bytes] = []
    kept: list[tuple[int, bytes]] = []
    for key, raw in txn.cursor(db=db):
        records, sent = limits.refill(raw, now)
        if records >= limits.burst_records and sent >= limits.burst_bytes:
            full.append(bytes(key))
        else:
            kept.append((now.real_ms_since(_updated(raw)), bytes(key)))
    excess = max(0, len(kept) - limits.max_entries * 3 // 4)
    for key in full + [key for _, key in sorted(kept, reverse=True)[:excess]]:  # deleted after the cursor is done
        txn.delete(key, db=db)
