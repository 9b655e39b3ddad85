"""The retry ledger's ``seq`` entries: runs of consecutive sequence numbers, one entry per run.

A device numbers its records 1, 2, 3, ... and sends them a request at a time, so what the ledger must
remember for a request is nearly always one run of consecutive ``seq`` values. An entry per record
cost an LMDB write per record on the commit, a read per record on every request, and about 70 bytes
of ledger per record, which at tens of thousands of records a second left a window of seconds. An
entry per run costs one of each per request, and the same ``dedup_max_keys`` entries now remember
hundreds of times as many records.

An entry's key is ``device_id \\0 first seq`` (8 bytes, big-endian, so a device's runs sort by seq);
its value says where the run ends and when each of its records happened:

- 8 bytes: one record, its event time (what every entry held before runs: such entries still read);
- 24 bytes: last seq, first event time, and the step between consecutive event times (a device
  sampling at a fixed interval, or a batch stamped at once: step 0);
- longer: last seq, first event time, then the differences between consecutive event times as
  little-endian int64, deflated (a device whose clock jitters: a few bytes per record).

Runs of one device do not overlap unless it restarted its counter within the window (the same seqs
with other event times). A lookup reads the run that starts closest below a seq; when a newer run
starts inside an older one, the seqs of the older one past its start are then looked up in the newer
one only, and found new. So the ledger may forget some of a restarted device's older seqs (their
retries land again, as past the window), but never takes a record it has not seen for a duplicate.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from itertools import accumulate, islice

_U64 = struct.Struct(">Q")  # a seq in a key; the event time of a run of one
_STEPPED = struct.Struct(">QQq")  # last seq, first event time, step
_LISTED = struct.Struct(">QQ")  # last seq, first event time; then the deflated differences
_MAX_SEQ = 2**64 - 1


class SeqRun:
    """Consecutive seqs of one device, ``first`` through ``last``, and their records' event times."""

    __slots__ = ("first", "last", "first_ms", "step_ms", "times")

    def __init__(self, first: int, last: int, first_ms: int, step_ms: int = 0, times: list[int] | None = None) -> None:
        self.first = first
        self.last = last
        self.first_ms = first_ms
        self.step_ms = step_ms
        self.times = times  # every event time, when they are not evenly spaced

    def event_ms(self, seq: int) -> int:
        if self.times is not None:
            return self.times[seq - self.first]
        return self.first_ms + (seq - self.first) * self.step_ms


def runs_of(seqs: list[tuple[str, int, int]]) -> list[tuple[str, int, list[int]]]:
    """``(device_id, seq, event_ms)`` in the order recorded, as runs: ``(device_id, first seq, event times)``."""
    if not seqs:
        return []
    device_id, first, _ = seqs[0]
    last = seqs[-1]
    # The common case, one request of one device numbered without gaps: checked in bulk.
    if last[0] == device_id and last[1] == first + len(seqs) - 1 and [s for _, s, _ in seqs] == list(range(first, last[1] + 1)):
        if all(d == device_id for d, _, _ in seqs):
            return [(device_id, first, [ms for _, _, ms in seqs])]
    runs = []
    start = 0
    for i, (after, before) in enumerate(zip(islice(seqs, 1, None), seqs), 1):
        if after[1] != before[1] + 1 or after[0] != before[0]:
            runs.append((seqs[start][0], seqs[start][1], [ms for _, _, ms in seqs[start:i]]))
            start = i
    runs.append((seqs[start][0], seqs[start][1], [ms for _, _, ms in seqs[start:]]))
    return runs


def encode_run(first: int, times: list[int]) -> list[tuple[int, bytes]]:
    """The ledger entries ``(first seq, value)`` for a run starting at ``first``: one, unless its
    event times cannot be told as differences (beyond int64), then one per record."""
    if len(times) == 1:
        return [(first, _U64.pack(times[0]))]
    last = first + len(times) - 1
    start, step = times[0], times[1] - times[0]
    try:
        if _evenly_spaced(times, step):
            return [(first, _STEPPED.pack(last, start, step))]
        differences = array("q", [b - a for a, b in zip(times, islice(times, 1, None))])
    except (OverflowError, struct.error):
        return [(first + i, _U64.pack(ms)) for i, ms in enumerate(times)]
    if sys.byteorder != "little":
        differences.byteswap()
    return [(first, _LISTED.pack(last, start) + zlib.compress(differences.tobytes(), 1))]


def _evenly_spaced(times: list[int], step: int) -> bool:
    if step == 0:
        return times.count(times[0]) == len(times)
    return times == list(range(times[0], times[0] + step * len(times), step))


def decode_run(first: int, value: bytes) -> SeqRun:
    if len(value) == _U64.size:
        return SeqRun(first, first, _U64.unpack(value)[0])
    if len(value) == _STEPPED.size:
        return SeqRun(first, *_STEPPED.unpack(value))
    last, start = _LISTED.unpack_from(value)
    differences = array("q")
    differences.frombytes(zlib.decompress(value[_LISTED.size:]))
    if sys.byteorder != "little":
        differences.byteswap()
    return SeqRun(first, last, start, times=list(accumulate(differences, initial=start)))


class RunFinder:
    """Looks seqs of one device up in one generation's runs, through one cursor; remembers the stretch
    of seqs its last answer holds for (a run, or the gap between two), so the records of a request,
    consecutive as they nearly always are, cost a cursor move per run, not one per record."""

    __slots__ = ("_cursor", "_prefix", "_low", "_high", "_run")

    def __init__(self, cursor, prefix: bytes) -> None:
        self._cursor = cursor
        self._prefix = prefix  # ``device_id \\0``
        self._low, self._high, self._run = 1, 0, None  # nothing known yet

    def event_ms(self, seq: int) -> int | None:
        """The event time recorded for ``seq``, or None when this generation holds none."""
        if not self._low <= seq <= self._high:
            self._find(seq)
        run = self._run
        return None if run is None else run.event_ms(seq)

    def holds_none(self, lowest: int, highest: int) -> bool:
        """Whether this generation holds none of the seqs ``lowest`` through ``highest`` (False: it may)."""
        if not self._low <= lowest <= self._high:
            self._find(lowest)
        return self._run is None and highest <= self._high

    def _find(self, seq: int) -> None:
        cursor, prefix = self._cursor, self._prefix
        width = len(prefix) + _U64.size
        following = _MAX_SEQ
        if cursor.set_range(prefix + _U64.pack(seq + 1)):
            key = cursor.key()
            if len(key) == width and key.startswith(prefix):
                following = _U64.unpack_from(key, len(prefix))[0]
            found = cursor.prev()
        else:
            found = cursor.last()
        key = cursor.key() if found else b""
        if len(key) == width and key.startswith(prefix):
            run = decode_run(_U64.unpack_from(key, len(prefix))[0], cursor.value())
            if seq <= run.last:
                self._low, self._high, self._run = run.first, min(run.last, following - 1), run
                return
            self._low = run.last + 1
        else:
            self._low = 0
        self._high, self._run = following - 1, None
