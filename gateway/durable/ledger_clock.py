"""How long ago something happened, for the retry ledger, told apart from steps of the wall clock.

The wall clock can be stepped: an NTP correction, an operator's ``date -s``, a gateway without a
real-time clock that booted on a stale time and syncs later. A step forward of an hour would age
every retry key and claim by an hour at once: the ledger would forget requests its devices may
still retry (they would land twice) and take running requests for abandoned ones (a retry would
run beside them). ``CLOCK_BOOTTIME`` counts real seconds since the machine booted, suspend
included; every process of the boot reads the same one and no step moves it. It starts again at 0
each boot, so an instant carries its boot, and between two boots only the wall clock can say.
"""

from __future__ import annotations

import functools
import struct
import time
from pathlib import Path
from typing import NamedTuple

_INSTANT = struct.Struct(">QQ16s")
INSTANT_BYTES = _INSTANT.size  # wall clock (epoch ms), time since boot (ms), boot id
_WALL_ONLY = struct.Struct(">Q")  # what ledgers of earlier versions kept: the wall clock alone


def current_boot_id() -> str | None:
    """This boot of the machine (Linux), or None where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@functools.cache
def _boot() -> bytes:
    boot_id = current_boot_id()
    try:
        return bytes.fromhex(boot_id.replace("-", "")) if boot_id else b""
    except ValueError:
        return b""


def seconds_since_boot() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME))


class Instant(NamedTuple):
    wall_ms: int
    boot_ms: int
    boot: bytes  # empty where unknown: then only the wall clock can tell the time between two instants

    @classmethod
    def now(cls) -> Instant:
        return cls(time.time_ns() // 1_000_000, time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000, _boot())

    def least_ms_since(self, earlier: Instant) -> int:
        """Time from ``earlier`` to this instant, never more than either clock says: a step of the
        wall clock forward does not age it, and a step back (the wall clock says less) does not
        either, so nothing kept for a while is forgotten early, whichever way the clock moved."""
        wall = self.wall_ms - earlier.wall_ms
        if self.boot and self.boot == earlier.boot:
            return min(wall, self.boot_ms - earlier.boot_ms)
        return wall

    def real_ms_since(self, earlier: Instant) -> int:
        """Time that really passed from ``earlier`` to this instant: the boot's clock within a boot,
        the wall clock (never below 0) across boots. For what refills with time (rate limits): a
        step back must not hold it empty, a step forward must not fill it."""
        if self.boot and self.boot == earlier.boot:
            return self.boot_ms - earlier.boot_ms
        return max(0, self.wall_ms - earlier.wall_ms)

    def pack(self) -> bytes:
        return _INSTANT.pack(self.wall_ms, self.boot_ms, self.boot.ljust(16, b"\0"))

    @classmethod
    def unpack(cls, raw: bytes) -> Instant:
        if len(raw) == _WALL_ONLY.size:
            return cls(_WALL_ONLY.unpack(raw)[0], 0, b"")
        wall_ms, boot_ms, boot = _INSTANT.unpack(raw)
        return cls(wall_ms, boot_ms, b"" if boot == bytes(16) else boot)


def claim_is_fresh(claimed_at: int, stale_after_secs: float) -> bool:
    """Whether a claim stamped ``claimed_at`` (``seconds_since_boot``) is younger than ``stale_after_secs``.
    A stamp ahead of now was made in an earlier boot (or by a version stamping wall seconds): stale."""
    age = seconds_since_boot() - claimed_at
    return 0 <= age < stale_after_secs
