"""The write-ahead log: every accepted record is here, fsynced, before its request is acknowledged.

Layout: a directory of segment files named after the log sequence number (LSN) of their first
record, ``00000000000000000042.wal``. A segment is a magic header followed by frames::

    u32 payload_len | u32 crc32(meta + payload) | meta | payload
    meta = u32 count | u32 partition_hour | u64 received_ms | u64 min_event_ms | u64 max_event_ms
           | u8 kind | 3 bytes pad

A frame holds ``count`` records of one kind for one partition hour; its payload is the NDJSON the
lake zone stores, so landing raw data is concatenation. LSNs count records, so a frame's LSNs are
implicit: the segment's first LSN plus the records of the frames before it.

Group commit: appends write to the page cache at once and wait; one committer task fsyncs whatever
has accumulated and wakes every append it covered. Only the last segment can hold a torn tail (a
segment is fsynced before the next one is created); it is found and truncated on open.

Consumers (the lake zones) read frames up to the durable end and report the LSN below which they
need nothing; a segment is deleted once every consumer is past it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"EGWAL\x00\x01\n"
PREFIX = struct.Struct("<II")
META = struct.Struct("<IIQQQB3x")
HEADER_SIZE = PREFIX.size + META.size
MAX_FRAME_PAYLOAD = 256 * 1024 * 1024

KIND_RECORDS = 1
KIND_QUARANTINE = 2


class WalError(Exception):
    """The log cannot take or give records."""


class WalFull(WalError):
    """The log has reached its configured capacity; callers should shed load, not drop data."""


class WalClosed(WalError):
    """The log is closed (the gateway is draining)."""


@dataclass(frozen=True, slots=True)
class Frame:
    lsn: int  # LSN of the first record in the frame
    count: int
    hour: int  # partition hour, hours since the epoch
    received_ms: int
    min_event_ms: int
    max_event_ms: int
    kind: int
    payload: bytes

    @property
    def end_lsn(self) -> int:
        """The LSN just past this frame."""
        return self.lsn + self.count


def encode_frame(
    kind: int, hour: int, received_ms: int, min_event_ms: int, max_event_ms: int, count: int, payload: bytes
) -> bytes:
    meta = META.pack(count, hour, received_ms, min_event_ms, max_event_ms, kind)
    crc = zlib.crc32(payload, zlib.crc32(meta))
    return PREFIX.pack(len(payload), crc) + meta + payload


def frame_record_count(frame: bytes) -> int:
    return META.unpack_from(frame, PREFIX.size)[0]


@dataclass(slots=True)
class _Segment:
    first_lsn: int
    path: Path
    size: int


def _segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}.wal"


class _Scan:
    """Result of reading frames from a file: the frames, where reading stopped, and why."""

    __slots__ = ("frames", "offset", "next_lsn", "corrupt")

    def __init__(self, frames: list[Frame], offset: int, next_lsn: int, corrupt: bool) -> None:
        self.frames = frames
        self.offset = offset
        self.next_lsn = next_lsn
        self.corrupt = corrupt


def _read_frames(
    f, offset: int, lsn: int, end_offset: int | None, max_bytes: int, headers_only: bool = False, kinds: frozenset[int] | None = None
) -> _Scan:
    """Read whole, checksummed frames from ``offset`` up to ``end_offset`` (or EOF).

    Frames of a kind not in ``kinds`` keep their place (and LSNs) but are not read or checked:
    each zone reads only its own payloads, and the zone that owns a frame verifies it.
    """
    frames: list[Frame] = []
    read = 0
    readable = end_offset if end_offset is not None else os.fstat(f.fileno()).st_size
    f.seek(offset)
    while read < max_bytes and (end_offset is None or offset < end_offset):
        header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            return _Scan(frames, offset, lsn, corrupt=bool(header))
        length, crc = PREFIX.unpack_from(header)
        if length > MAX_FRAME_PAYLOAD:
            return _Scan(frames, offset, lsn, corrupt=True)
        meta = header[PREFIX.size :]
        count, hour, received_ms, min_ev, max_ev, kind = META.unpack(meta)
        if headers_only or (kinds is not None and kind not in kinds):
            if offset + HEADER_SIZE + length > readable:
                return _Scan(frames, offset, lsn, corrupt=True)
            f.seek(length, os.SEEK_CUR)
            payload = b""
        else:
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload, zlib.crc32(meta)) != crc:
                return _Scan(frames, offset, lsn, corrupt=True)
        frames.append(Frame(lsn, count, hour, received_ms, min_ev, max_ev, kind, payload))
        lsn += count
        offset += HEADER_SIZE + length
        read += HEADER_SIZE + length
    return _Scan(frames, offset, lsn, corrupt=False)


class WriteAheadLog:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int,
        max_total_bytes: int,
        fsync: bool = True,
        on_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_total_bytes = max_total_bytes
        self._fsync = fsync
        self._on_fsync = on_fsync or (lambda seconds: None)
        self._segments: list[_Segment] = []
        self._fd = -1
        self._retired_fds: list[int] = []
        self._next_lsn = 0
        self._durable_lsn = 0
        self._durable_offset = 0  # in the last segment
        self._durable_segment_lsn = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._dirty: asyncio.Event | None = None
        self._data: asyncio.Condition | None = None
        self._committer: asyncio.Task[None] | None = None
        self._sync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-fsync")
        self._consumers: dict[str, int] = {}
        self._closed = True
        self.torn_tail_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Recover the log from disk: find segments, truncate a torn tail, find the next LSN."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("*.wal")):
            try:
                first_lsn = int(path.stem)
            except ValueError:
                log.warning("ignoring a file that is not a WAL segment", extra={"path": str(path)})
                continue
            self._segments.append(_Segment(first_lsn, path, path.stat().st_size))
        if self._segments:
            self._recover_last_segment()
        else:
            self._create_segment(0)
        self._durable_lsn = self._next_lsn
        self._durable_segment_lsn = self._segments[-1].first_lsn
        self._durable_offset = self._segments[-1].size
        self._closed = False

    def _recover_last_segment(self) -> None:
        last = self._segments[-1]
        with open(last.path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                # A crash between creating the file and writing its header leaves it short.
                scan = _Scan([], 0, last.first_lsn, corrupt=True)
            else:
                scan = _read_frames(f, len(MAGIC), last.first_lsn, None, 1 << 62, headers_only=False)
        good_size = max(scan.offset, len(MAGIC))
        if scan.corrupt or last.size > good_size:
            self.torn_tail_bytes = last.size - scan.offset if magic == MAGIC else last.size
            log.warning(
                "WAL: truncating a torn tail left by a crash",
                extra={"segment": last.path.name, "kept_bytes": good_size, "dropped_bytes": self.torn_tail_bytes},
            )
        fd = os.open(last.path, os.O_RDWR)
        if magic != MAGIC:
            os.ftruncate(fd, 0)
            os.write(fd, MAGIC)
        else:
            os.ftruncate(fd, good_size)
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_END)
        last.size = good_size
        self._fd = fd
        self._next_lsn = scan.next_lsn

    def _create_segment(self, first_lsn: int) -> None:
        path = self.directory / _segment_name(first_lsn)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
        os.write(fd, MAGIC)
        if self._fsync:
            os.fsync(fd)
            _fsync_directory(self.directory)
        self._segments.append(_Segment(first_lsn, path, len(MAGIC)))
        self._fd = fd

    async def start(self) -> None:
        if self._closed:
            self.open()
        self._dirty = asyncio.Event()
        self._data = asyncio.Condition()
        self._committer = asyncio.create_task(self._commit_loop(), name="wal-committer")

    async def close(self) -> None:
        """Stop taking appends, make everything written durable, release files."""
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            while self._waiters:
                self._dirty.set()
                await asyncio.sleep(0)
                await asyncio.wait([self._waiters[-1][1]], timeout=5)
            self._committer.cancel()
            try:
                await self._committer
            except asyncio.CancelledError:
                pass
        if self._fsync and self._fd >= 0:
            os.fdatasync(self._fd)
        for fd in [*self._retired_fds, self._fd]:
            if fd >= 0:
                os.close(fd)
        self._retired_fds.clear()
        self._fd = -1
        self._sync_pool.shutdown(wait=True)

    # -- appending ---------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def durable_lsn(self) -> int:
        return self._durable_lsn

    def has_room(self) -> bool:
        return self.total_bytes < self.max_total_bytes

    def write(self, frames: Sequence[bytes]) -> int:
        """Write frames to the page cache; return the LSN to wait for with ``wait_durable``."""
        if self._closed:
            raise WalClosed("the write-ahead log is closed")
        if not self.has_room():
            raise WalFull(f"the write-ahead log holds {self.total_bytes} bytes, its limit")
        if self._segments[-1].size >= self.segment_bytes:
            self._rotate()
        written = os.writev(self._fd, frames) if len(frames) > 1 else os.write(self._fd, frames[0])
        expected = sum(len(f) for f in frames)
        while written < expected:  # a short write only happens on a full disk or a signal
            rest = b"".join(frames)[written:]
            n = os.write(self._fd, rest)
            if n == 0:
                raise WalError("the disk refused a WAL write")
            written += n
        self._segments[-1].size += written
        self._next_lsn += sum(frame_record_count(f) for f in frames)
        self._dirty.set()
        return self._next_lsn

    async def wait_durable(self, lsn: int) -> None:
        if lsn <= self._durable_lsn:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, future))
        await future

    async def append(self, frames: Sequence[bytes]) -> int:
        """Write frames and return once they are fsynced; the result is the LSN just past them."""
        end = self.write(frames)
        await self.wait_durable(end)
        return end

    def _rotate(self) -> None:
        # The old segment is made durable now, so only the newest segment can ever be torn.
        if self._fsync:
            os.fdatasync(self._fd)
        self._retired_fds.append(self._fd)
        self._create_segment(self._next_lsn)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            target_lsn = self._next_lsn
            segment = self._segments[-1]
            target_offset = segment.size
            fd, retired = self._fd, self._retired_fds
            self._retired_fds = []
            started = time.perf_counter()
            try:
                if self._fsync:
                    await loop.run_in_executor(self._sync_pool, os.fdatasync, fd)
            except OSError as exc:
                # A failed fsync means the page cache may have dropped our data: nothing is durable.
                log.critical("WAL fsync failed; refusing further appends", extra={"error": str(exc)})
                self._closed = True
                while self._waiters:
                    self._waiters.popleft()[1].set_exception(WalError(f"fsync failed: {exc}"))
                return
            self._on_fsync(time.perf_counter() - started)
            for old in retired:
                os.close(old)
            self._durable_lsn = target_lsn
            self._durable_segment_lsn = segment.first_lsn
            self._durable_offset = target_offset
            while self._waiters and self._waiters[0][0] <= target_lsn:
                _, future = self._waiters.popleft()
                if not future.done():
                    future.set_result(None)
            async with self._data:
                self._data.notify_all()

    # -- consuming ---------------------------------------------------------------------------

    async def wait_for_data(self, lsn: int, timeout: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Wait until records at or beyond ``lsn`` are durable (or ``stop()``); False on timeout."""
        ready = (lambda: self._durable_lsn > lsn or stop()) if stop else (lambda: self._durable_lsn > lsn)
        if ready():
            return self._durable_lsn > lsn
        async with self._data:
            try:
                await asyncio.wait_for(self._data.wait_for(ready), timeout)
            except TimeoutError:
                return False
        return self._durable_lsn > lsn

    async def wake_consumers(self) -> None:
        async with self._data:
            self._data.notify_all()

    def reader(self, lsn: int) -> WalReader:
        return WalReader(self, lsn)

    def register_consumer(self, name: str, lsn: int) -> None:
        self._consumers[name] = lsn

    def release(self, name: str, lsn: int) -> None:
        """A consumer needs nothing below ``lsn`` any more; delete segments nobody needs."""
        self._consumers[name] = lsn
        floor = min(self._consumers.values())
        # Keep the last segment (it is being written) and any segment holding LSNs >= floor.
        while len(self._segments) > 1 and self._segments[1].first_lsn <= floor:
            gone = self._segments.pop(0)
            try:
                gone.path.unlink()
            except FileNotFoundError:
                pass

    def backlog_bytes(self, lsn: int) -> int:
        """Approximate bytes of log at or after ``lsn`` (whole segments)."""
        total = 0
        for i, seg in enumerate(self._segments):
            nxt = self._segments[i + 1].first_lsn if i + 1 < len(self._segments) else self._next_lsn + 1
            if nxt > lsn:
                total += seg.size
        return total if self._next_lsn > lsn else 0

    def _segment_for(self, lsn: int) -> int:
        index = 0
        for i, seg in enumerate(self._segments):
            if seg.first_lsn <= lsn:
                index = i
        return index

    def _durable_limit(self, segment: _Segment) -> int | None:
        """How far a reader may read in ``segment``: all of an old one, the synced part of the last."""
        if segment.first_lsn == self._durable_segment_lsn:
            return self._durable_offset
        if segment.first_lsn > self._durable_segment_lsn:
            return len(MAGIC)
        return None


class WalReader:
    """Reads durable frames in order from an LSN, across segments; one per consumer."""

    def __init__(self, wal: WriteAheadLog, lsn: int) -> None:
        self._wal = wal
        self.lsn = lsn
        self._file = None
        self._segment: _Segment | None = None
        self._offset = 0
        self.corrupt_segments = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_segment_at(self, lsn: int) -> bool:
        wal = self._wal
        if not wal._segments:
            return False
        seg = wal._segments[wal._segment_for(lsn)]
        if self._segment is not seg:
            self.close()
            self._segment = seg
            self._file = open(seg.path, "rb")
            self._offset = len(MAGIC)
            # Skip whole frames until the one starting at our LSN (positions are frame boundaries).
            at = seg.first_lsn
            while at < lsn:
                scan = _read_frames(self._file, self._offset, at, wal._durable_limit(seg), HEADER_SIZE, True)
                if not scan.frames:
                    break
                frame = scan.frames[0]
                if frame.end_lsn > lsn:
                    break
                at, self._offset = frame.end_lsn, scan.offset
            self.lsn = at
        return True

    def read(self, max_bytes: int, kinds: frozenset[int] | None = None) -> list[Frame]:
        """Frames from the current position up to the durable end, about ``max_bytes`` of them;
        frames of other ``kinds`` come back without their payload."""
        wal = self._wal
        if self.lsn >= wal._durable_lsn or not self._open_segment_at(self.lsn):
            return []
        frames: list[Frame] = []
        budget = max_bytes
        while budget > 0 and self.lsn < wal._durable_lsn:
            seg = self._segment
            limit = wal._durable_limit(seg)
            scan = _read_frames(self._file, self._offset, self.lsn, limit, budget, kinds=kinds)
            frames.extend(scan.frames)
            budget -= scan.offset - self._offset
            self._offset, self.lsn = scan.offset, scan.next_lsn
            at_end = limit is not None and self._offset >= limit
            if scan.corrupt or (limit is None and not scan.frames and budget > 0):
                nxt = _next_segment(wal, seg)
                if nxt is None:
                    break
                if scan.corrupt:
                    self.corrupt_segments += 1
                    log.error(
                        "WAL: corrupt frame in a sealed segment; skipping to the next segment",
                        extra={"segment": seg.path.name, "offset": self._offset, "lost_from_lsn": self.lsn},
                    )
                self.lsn = max(self.lsn, nxt.first_lsn)
                self._open_segment_at(self.lsn)
            elif at_end or not scan.frames:
                break
        return frames


def _next_segment(wal: WriteAheadLog, seg: _Segment) -> _Segment | None:
    for i, s in enumerate(wal._segments):
        if s is seg and i + 1 < len(wal._segments):
            return wal._segments[i + 1]
    return None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
