"""The write-ahead log: every accepted record is here, fsynced, before its request is acknowledged.

Layout: a directory of segment files named after the log sequence number (LSN) of their first
record, ``00000000000000000042.wal``. A segment is a magic header followed by frames::

    u32 payload_len | u32 crc32(meta + payload) | meta | payload
    meta = u32 count | u32 partition_hour | u64 received_ms | u64 min_event_ms | u64 max_event_ms
           | u8 kind | 3 bytes pad

A frame holds ``count`` records of one kind for one partition hour; its payload is the NDJSON the
lake zone stores, so landing raw data is concatenation. LSNs count records, so a frame's LSNs are
implicit: the segment's first LSN plus the records of the frames before it.

Raw-zone lines of one request begin alike (the gateway's envelope: request id, arrival time,
gateway, zone, device metadata). A ``KIND_RECORDS_SHARED`` frame stores that beginning once, then
each line's own rest (``shared_payload``); readers hand consumers the lines whole, as a
``KIND_RECORDS`` frame (``expand_shared``), so each record costs the log less than half the bytes.

Group commit, off the event loop: a request queues its frames and waits; one writer thread takes
everything queued, writes it and fsyncs once, then every request it covered is answered. The event
loop never blocks on the disk (a write to a file being fsynced can wait as long as the fsync). Only
the last segment can hold a torn tail (a segment is fsynced before the next one is created); it is
found and truncated on open.

A request is all or nothing. Its frames are written together between two fsyncs, so the
durable end never falls inside a request; a request of several frames is preceded by a
``KIND_TXN`` marker frame (no records) giving the bytes that follow and the request's first LSN,
so recovery also removes a request that was only partly on disk when the process died, and can
number the requests found after a damaged header (wal_salvage.py). A failed write (a full disk) is
rolled back on disk and in memory before the request is answered.

A failed fsync is not retried: the page cache may have dropped the data while clearing the error
(PostgreSQL's lesson of 2018). Every append since the last good fsync is answered with an error, the
log is cut back to that point on disk, and appends resume only once that cut is itself durable.

Consumers (the lake zones) read frames up to the durable end and report the LSN below which they
need nothing; a segment is deleted once every consumer is past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from connectors.durable_files import ensure_directory, fsync_directory

if TYPE_CHECKING:
    from gateway.durable.wal_board import Board

log = logging.getLogger(__name__)

MAGIC = b"EGWAL\x00\x01\n"
PREFIX = struct.Struct("<II")
META = struct.Struct("<IIQQQB3x")
HEADER_SIZE = PREFIX.size + META.size
MAX_FRAME_PAYLOAD = 256 * 1024 * 1024
# Readiness turns off a little before the hard limit, so a ready gateway can take a typical request.
FULL_MARGIN_BYTES = 64 * 1024
# A recovery that failed (the disk still failing) is tried again after 1 s, then 2, 4, up to 8 s.
RECOVERY_RETRY_SECS = (1.0, 2.0, 4.0, 8.0)

KIND_RECORDS = 1
KIND_QUARANTINE = 2
KIND_TXN = 3  # marks the start of a request of several frames; payload: u64 bytes that follow
KIND_REQUEST = 4  # no records: a request's retry key and answer, for the retry ledger (retry_ledger.py)
KIND_RECORDS_SHARED = 5  # KIND_RECORDS whose lines' common beginning is stored once: read as KIND_RECORDS
KIND_GAP = 6  # no records: the LSNs of damaged bytes, passed over (wal_salvage.py); payload: u64 count, zeros
TXN = struct.Struct("<Q")  # a marker's payload before this version: the bytes that follow
MARKER = struct.Struct("<QQ")  # a marker's payload: the bytes that follow, the request's first LSN
# Every kind this version reads. A consumer stops at a frame of any other kind (written by a later
# version) instead of passing it: passing it would let the zone release records it never landed.
KNOWN_KINDS = frozenset({KIND_RECORDS, KIND_QUARANTINE, KIND_TXN, KIND_REQUEST, KIND_RECORDS_SHARED, KIND_GAP})


class WalError(Exception):
    """The log cannot take or give records."""


class WalFull(WalError):
    """The log has reached its configured capacity; callers should shed load, not drop data."""


class WalClosed(WalError):
    """The log is closed (the gateway is draining)."""


class WalNoSpace(WalError):
    """The disk is full: the write was rolled back and nothing of it will land."""


class WalFailed(WalError):
    """An fsync or a rollback failed: the log takes no appends until it has recovered."""


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


def shared_payload(shared: bytes, rests: list[bytes]) -> bytes:
    """A ``KIND_RECORDS_SHARED`` payload: lines ``shared + rest``, each rest starting with ``,``.

    Neither part holds a line break (the raw zone is NDJSON), so a line break followed by a comma
    only ever starts a rest.
    """
    return b"\n".join([shared, *rests, b""])


def expand_shared(payload: bytes) -> bytes:
    """The NDJSON lines of a ``KIND_RECORDS_SHARED`` payload, byte for byte as if stored whole."""
    split = payload.index(b"\n")
    if split + 1 == len(payload):
        return b""
    shared = payload[:split]
    # Every line break but the last begins a rest: one replace in C puts the shared part after each
    # (six times faster than joining a list of lines; the search is for a single byte, memchr's case).
    return b"".join((shared, payload[split + 1 : -1].replace(b"\n", b"\n" + shared), b"\n"))


def expand_shared_in_slices(payload: bytes, max_bytes: int) -> Iterator[bytes]:
    """``expand_shared(payload)`` in consecutive pieces of whole lines, about half ``max_bytes`` each.
    Pieces under glibc's mapping threshold (allocator.py) reuse heap memory, where a frame expanded
    whole (136 KiB at 300 records) was mapped, faulted in and unmapped every time (with a slower
    expansion, a fifth of the lake process's CPU per raw record)."""
    split = payload.index(b"\n")
    end = len(payload) - 1  # the last line break
    if split == end:
        return
    shared = payload[:split]
    with_shared = b"\n" + shared
    first_rest = payload.find(b"\n", split + 1) - split  # lines differ little in length: the first tells
    step = max(1, max_bytes * first_rest // (2 * (first_rest + split)))  # stored bytes per piece
    start = split  # at the line break that begins the next rest
    while start < end:
        stop = payload.find(b"\n", min(start + step, end), end)
        stop = end if stop < 0 else stop
        yield b"".join((shared, payload[start + 1 : stop].replace(b"\n", with_shared), b"\n"))
        start = stop


def expanded_bytes(frame: Frame) -> int:
    """The size of a frame's payload as the raw zone stores it: a shared frame's once expanded."""
    if frame.kind != KIND_RECORDS_SHARED:
        return len(frame.payload)
    shared = frame.payload.index(b"\n")
    return len(frame.payload) - shared - 1 + frame.count * shared


def frame_record_count(frame: bytes) -> int:
    return META.unpack_from(frame, PREFIX.size)[0]


@dataclass(slots=True, eq=False)
class _Queued:
    """One request waiting for the writer thread: its frames, and what became of them."""

    chunks: Iterable[Sequence[bytes]]
    total_bytes: int
    frame_count: int
    note: object  # handed to ``on_durable`` once the frames are durable
    future: asyncio.Future[int]
    end_lsn: int = -1
    error: Exception | None = None


@dataclass(slots=True)
class _Segment:
    first_lsn: int
    path: Path
    size: int


def fresh_log_origin() -> int:
    """The first LSN of a new, empty log: the microsecond it is created.

    Lake object keys are ``<gateway_id>-<first_lsn>-<last_lsn>``: a log started afresh under a gateway
    id that landed before (a new ``wal.dir``, a rebuilt disk, a replacement keeping the host name)
    would otherwise number its records from 0 again and overwrite that earlier life's objects. Two
    lives overlap only if the earlier one took more than a record per microsecond on average over its
    whole life (a worker takes a few hundred thousand a second), or the clock ran back further than
    that life lasted.
    """
    return time.time_ns() // 1000


def _segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}.wal"


class _Scan:
    """Result of reading frames from a file: the frames, where reading stopped, and why."""

    __slots__ = ("frames", "offset", "next_lsn", "corrupt", "unknown_kind")

    def __init__(self, frames: list[Frame], offset: int, next_lsn: int, corrupt: bool, unknown_kind: int | None = None) -> None:
        self.frames = frames
        self.offset = offset
        self.next_lsn = next_lsn
        self.corrupt = corrupt
        self.unknown_kind = unknown_kind  # the frame at ``offset`` is of a kind this version does not know


def _read_frames(
    f,
    offset: int,
    lsn: int,
    end_offset: int | None,
    max_bytes: int,
    headers_only: bool = False,
    kinds: frozenset[int] | None = None,
    markers: bool = False,
    known: frozenset[int] | None = None,
) -> _Scan:
    """Read whole, checksummed frames from ``offset`` up to ``end_offset`` (or EOF).

    Frames of a kind not in ``kinds`` keep their place (and LSNs) and come back without their payload,
    their record count checked against their lines: the zone that owns a frame verifies its checksum. Request
    markers (``KIND_TXN``) matter only to recovery, which asks for them with ``markers``. With
    ``known``, reading stops before a frame of any other kind (``unknown_kind``) when it passes its
    checksum: one that fails it is damage (``corrupt``).
    """
    frames: list[Frame] = []
    read = 0
    readable = end_offset if end_offset is not None else os.fstat(f.fileno()).st_size
    # Drop what the file's buffer read ahead last time (a seek from the end does; one within the
    # buffer would keep it): bytes past the durable end may since have been cut away and written
    # again (a failed fsync, a write rolled back), and the buffer would hand back the old ones.
    f.seek(0, os.SEEK_END)
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
        if known is not None and kind not in known:
            # A later version's frame passes its checksum; a header damaged, or reached by a damaged
            # length, rarely does, and is damage to pass over, not a reason to stop the zone for good.
            payload = f.read(length) if offset + HEADER_SIZE + length <= readable else b""
            intact = len(payload) == length and zlib.crc32(payload, zlib.crc32(meta)) == crc
            return _Scan(frames, offset, lsn, corrupt=not intact, unknown_kind=kind if intact else None)
        if kind == KIND_TXN and not markers:
            if offset + HEADER_SIZE + length > readable:
                return _Scan(frames, offset, lsn, corrupt=True)
            f.seek(length, os.SEEK_CUR)
            offset += HEADER_SIZE + length  # not counted against max_bytes: a marker is not content
            continue
        if headers_only:
            if offset + HEADER_SIZE + length > readable:
                return _Scan(frames, offset, lsn, corrupt=True)
            f.seek(length, os.SEEK_CUR)
            payload = b""
        elif kinds is not None and kind not in kinds:
            # Another zone's frame: only its record count is used here, so the count is checked against
            # its lines (a damaged count would shift every LSN after it); a CRC over every zone's bytes
            # would cost each zone the whole log's.
            body = f.read(length)
            if len(body) < length or _records_in(kind, body) != count:
                return _Scan(frames, offset, lsn, corrupt=True)
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


def _records_in(kind: int, payload: bytes) -> int:
    """How many records a frame of ``kind`` holds, counted from its payload's line breaks alone."""
    if kind in (KIND_TXN, KIND_REQUEST):
        return 0
    if kind == KIND_GAP:
        return TXN.unpack_from(payload)[0] if len(payload) >= TXN.size else -1
    lines = payload.count(b"\n")
    return lines - 1 if kind == KIND_RECORDS_SHARED else lines


def _damaged_frame(f, offset: int, end: int, *, may_end_at_end: bool) -> tuple[int, int] | None:
    """(bytes, records) of the frame at ``offset``, which failed its checksum, when its header still
    places it: its kind is known, its record count is its payload's line count, and it ends where a
    frame that passes its checksum starts (or, with ``may_end_at_end``, exactly at ``end``).

    Then only this frame's records are lost and the frames after it keep their LSNs. None when the
    damage may reach the header, or the frame is a torn write: nothing after it can be placed.
    """
    f.seek(offset)
    header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        return None
    length = PREFIX.unpack_from(header)[0]
    count, *_, kind = META.unpack_from(header, PREFIX.size)
    after = offset + HEADER_SIZE + length
    if kind not in KNOWN_KINDS or after > end or (after == end and not may_end_at_end):
        return None
    payload = f.read(length)
    if len(payload) < length or _records_in(kind, payload) != count:
        return None
    if after < end and not _read_frames(f, after, 0, end, 1, markers=True).frames:
        return None
    return HEADER_SIZE + length, count


# The three zero bytes that end every frame header (META's padding): where a header may start.
_HEADER_END = re.compile(b"(?=\x00\x00\x00)")


def _frames_after_damage(f, offset: int, end: int) -> tuple[int, int] | None:
    """(offset, records) of the first place after the damaged frame at ``offset`` from which whole
    frames, each passing its checksum, run exactly to ``end``, and the records they hold.

    For a frame whose header is damaged too (its length or count cannot be trusted), where
    ``_damaged_frame`` cannot place what follows: the next header is found by its shape instead, and
    a chain of checksums to the segment's very end leaves a false start no chance. The frames found
    take their LSNs back from the next segment's first; only the bytes in between are lost.
    """
    f.seek(offset + 1)
    data = f.read(end - offset - 1)
    broken: set[int] = set()  # frame starts on a chain found broken: any chain through them breaks there too
    for hit in _HEADER_END.finditer(data):
        start = hit.start() - (HEADER_SIZE - 3)
        if start >= 0 and start not in broken:
            records = _records_of_chain(data, start, broken)
            if records is not None:
                return offset + 1 + start, records
    return None


def _records_of_chain(data: bytes, at: int, broken: set[int]) -> int | None:
    """The records in the frames from ``at`` to the end of ``data`` when each is whole, of a known
    kind and passes its checksum; None otherwise, with the chain's frame starts added to ``broken``."""
    records, visited = 0, []
    while at < len(data):
        if at in broken:
            break
        visited.append(at)
        if at + HEADER_SIZE > len(data):
            break
        length, crc = PREFIX.unpack_from(data, at)
        count, *_, kind = META.unpack_from(data, at + PREFIX.size)
        body = at + HEADER_SIZE
        if kind not in KNOWN_KINDS or (count > length and kind != KIND_GAP) or body + length > len(data):
            break
        if zlib.crc32(data[body : body + length], zlib.crc32(data[at + PREFIX.size : body])) != crc:
            break
        records += count
        at = body + length
    else:
        return records
    broken.update(visited)
    return None


# Pauses before each fresh read of a frame that failed its check: a wrong read that a cache keeps
# handing back (seen on FUSE: a page read while an append filled it) may take a moment to clear.
READ_AGAIN_PAUSES_SECS = (0.0, 0.01, 0.05, 0.15)


def _intact_when_read_afresh(path: str | os.PathLike[str], offset: int, end: int | None) -> bool:
    """Whether the frame at ``offset`` passes its check when read again from the disk: a read that
    came back short or wrong (a flaky device, a network or FUSE file system) is not damage on disk.

    Each try opens the file anew and drops its cached pages from ``offset`` first: a page cached
    wrong would otherwise be handed back to every read, and the frame's acknowledged records passed
    over as damaged. A frame still failing after the last try is damage."""
    for tries, pause in enumerate(READ_AGAIN_PAUSES_SECS, 1):
        time.sleep(pause)
        try:
            with open(path, "rb") as f:
                if hasattr(os, "posix_fadvise"):  # not on macOS, where a development checkout may run
                    os.posix_fadvise(f.fileno(), offset, 0, os.POSIX_FADV_DONTNEED)
                intact = bool(_read_frames(f, offset, 0, end, 1, markers=True).frames)
        except FileNotFoundError:
            return False  # released meanwhile: the reader finds out on its next read
        if intact:
            # Not damage, but the storage handed back wrong bytes: worth knowing about it.
            log.warning(
                "WAL: a frame that read back wrong is intact when read again from the disk",
                extra={"segment": Path(path).name, "offset": offset, "tries": tries},
            )
            return True
    return False


def _keep_aside(segment: Path, offset: int, size: int | None = None) -> str:
    """A copy of a segment's damaged bytes from ``offset`` (``size`` of them, or to its end) beside it,
    for forensics: the segment itself is deleted once landed, or cut back. Its name, or why there is
    none: a copy that cannot be made (a full disk) must not stop the records around it from landing."""
    keep = segment.with_name(segment.name + f".damaged-at-{offset}")
    try:
        with open(segment, "rb") as src, open(keep, "wb") as dst:
            src.seek(offset)
            dst.write(src.read() if size is None else src.read(size))
    except OSError as exc:
        with contextlib.suppress(OSError):
            keep.unlink(missing_ok=True)
        return f"(not kept: {exc})"
    return keep.name


class WriteAheadLog:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int,
        max_total_bytes: int,
        fsync: bool = True,
        on_fsync: Callable[[float], None] | None = None,
        on_rollback: Callable[[int], None] | None = None,
        on_durable: Callable[[int, list], None] | None = None,
        board: Board | None = None,
        first_lsn: int = 0,
        floor: Callable[[], int] | None = None,
        before_delete: Callable[[], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._first_lsn = first_lsn  # where a new, empty log starts numbering (see fresh_log_origin)
        # Read at open: the LSN past every record a consumer recorded as read. A log missing its newest
        # records numbers new ones from there, or that consumer would take them for ones it landed.
        self._floor = floor
        self.segment_bytes = segment_bytes
        self.max_total_bytes = max_total_bytes
        self._fsync = fsync
        self._on_fsync = on_fsync or (lambda seconds: None)
        # Told the LSN the log was cut back to: anything remembered about LSNs at or past it is void.
        self._on_rollback = on_rollback or (lambda lsn: None)
        # Called in the writer thread once everything below an LSN is durable, with the notes of the
        # requests that became durable, before any of them is answered.
        self._on_durable = on_durable or (lambda lsn, notes: None)
        self._segments: list[_Segment] = []
        # Segments are replaced, never mutated, so readers iterate their own copy; this lock keeps
        # the writer thread's rotation and the event loop's release from replacing them at once.
        self._segments_lock = threading.Lock()
        self._fd = -1
        self._next_lsn = 0
        # (durable LSN, first LSN of the segment it ends in, offset in that segment): one tuple, so a
        # reader thread never pairs one commit's segment with another's offset.
        self._durable: tuple[int, int, int] = (0, 0, 0)
        # Where another process that lands this log reads its durable end (wal_board.py), if one does.
        self._board = board
        self._queue: list[_Queued] = []
        self._writing: list[_Queued] = []  # the batch the writer thread has now
        self._cut_backs = 0  # how often the log was cut back to its last good fsync
        self._recovery_attempts = 0  # failed recoveries since the last failure; while > 0 the committer retries
        self._dirty: asyncio.Event | None = None
        self._data: asyncio.Condition | None = None
        self._committer: asyncio.Task[None] | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-writer")
        # Deleting a released segment can take tens of ms (the file system frees 64 MiB of blocks):
        # its own thread, so neither the event loop that released it nor the writer waits for that.
        self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-remover")
        # Run there before each deletion: what others learned from those segments must be durable first.
        self._before_delete = before_delete or (lambda: None)
        self._consumers: dict[str, int] = {}
        self._expected: set[str] = set()
        self._closed = True
        self.failure: str | None = None  # why appends are refused until recovery, if they are
        self.failure_seen: str | None = None  # the last failure, kept after recovery for the answers
        self.no_space = False  # the last append found the disk full; cleared by the next that fits
        self.torn_tail_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Recover the log from disk: find segments, truncate a torn tail, find the next LSN."""
        ensure_directory(self.directory)
        self._segments = []
        for path in sorted(self.directory.glob("*.wal")):
            try:
                first_lsn = int(path.stem)
            except ValueError:
                log.warning("ignoring a file that is not a WAL segment", extra={"path": str(path)})
                continue
            self._segments.append(_Segment(first_lsn, path, path.stat().st_size))
        floor = self._floor() if self._floor is not None else 0
        if self._segments:
            self._recover_last_segment()
            if self._next_lsn < floor:
                self._number_from(floor)
        else:
            self._fd, segment = self._create_segment(max(self._first_lsn, floor))
            self._segments.append(segment)
            self._next_lsn = segment.first_lsn
        self._set_durable((self._next_lsn, self._segments[-1].first_lsn, self._segments[-1].size))
        self._closed = False

    def _recover_last_segment(self) -> None:
        from gateway.durable.wal_salvage import mend_newest_segment, mend_segment_header  # it builds on this module

        last = self._segments[-1]
        with open(last.path, "rb") as f:
            magic = f.read(len(MAGIC))
        # A crash between creating the file and making its header durable leaves it no longer than
        # the header (frames are appended only after that): a segment with nothing in it. A longer
        # one whose header differs was damaged at rest: its frames are read all the same.
        header_torn = magic != MAGIC and last.size <= len(MAGIC)
        header_damaged = magic != MAGIC and not header_torn
        mended_at = -1
        while True:
            if header_torn:
                found = _Recovered(len(MAGIC), last.first_lsn, False, [])
            else:
                with open(last.path, "rb") as f:
                    found = _recoverable_end(f, last.first_lsn, last.size)
            # A frame that fails its check and places nothing after it: damage, or a torn write (one
            # whose length runs past the end looks alike). Mended where whole requests follow it; each
            # mend lets the next read get past it, so the failure found next lies further on.
            if found.damaged_at <= mended_at:
                break
            if not mend_newest_segment(last.path, found.end, found.next_lsn, found.damaged_at):
                break
            mended_at = found.damaged_at
        good_size = found.end
        for offset, size, lsn, records in found.passed_over:
            log.critical(
                "WAL: a frame damaged on disk in the newest segment; its records cannot land, those after it will",
                extra={"segment": last.path.name, "offset": offset, "lsn": lsn, "records_lost": records,
                       "kept_in": _keep_aside(last.path, offset, size)},
            )
        if header_damaged:
            log.critical(
                "WAL: the newest segment's header was damaged on disk; it is written again and the frames after it are read",
                extra={"segment": last.path.name, "kept_in": _keep_aside(last.path, 0, len(MAGIC))},
            )
        if last.size > good_size or header_torn:
            self.torn_tail_bytes = last.size - good_size if not header_torn else last.size
            if found.damaged_after:
                # Not a torn write: a damaged frame with data after it that cannot be placed. Keep those bytes for forensics.
                log.critical(
                    "WAL: a damaged frame inside the newest segment; the bytes after it are kept aside",
                    extra={"segment": last.path.name, "offset": good_size, "kept_in": _keep_aside(last.path, good_size)},
                )
            else:
                log.warning(
                    "WAL: truncating a torn tail left by a crash",
                    extra={"segment": last.path.name, "kept_bytes": good_size, "dropped_bytes": self.torn_tail_bytes},
                )
        if header_damaged:
            mend_segment_header(last.path)
        fd = os.open(last.path, os.O_RDWR | os.O_APPEND)
        if header_torn:
            os.ftruncate(fd, 0)
            os.write(fd, MAGIC)
        else:
            os.ftruncate(fd, good_size)
        os.fsync(fd)
        last.size = good_size
        self._fd = fd
        self._next_lsn = found.next_lsn

    def _number_from(self, floor: int) -> None:
        """Go on in a new segment at ``floor``: records a consumer recorded as read are gone from the
        log (its newest segment removed or cut short), and their LSNs must not be given again."""
        log.error(
            "WAL: records a zone already read are missing from the log (a segment removed or cut short); "
            "new records are numbered past them",
            extra={"newest_segment": self._segments[-1].path.name, "log_ends_at_lsn": self._next_lsn, "numbered_from": floor},
        )
        fd, segment = self._create_segment(floor)
        os.close(self._fd)  # recovered and fsynced
        self._fd = fd
        self._segments.append(segment)
        self._next_lsn = floor

    def _create_segment(self, first_lsn: int) -> tuple[int, _Segment]:
        """A new segment file with its header, durable; on any error nothing of it is left behind."""
        path = self.directory / _segment_name(first_lsn)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
        try:
            if os.write(fd, MAGIC) != len(MAGIC):
                raise OSError(errno.ENOSPC, "short write of a segment header")
            if self._fsync:
                os.fsync(fd)
                fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd, _Segment(first_lsn, path, len(MAGIC))

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
            self._dirty.set()  # the committer writes what is queued, then stops
            await asyncio.shield(self._committer)
        if self._fsync and self._fd >= 0 and self.failure is None:
            os.fdatasync(self._fd)
        self._close_fds()
        self._writer.shutdown(wait=True)
        self._remover.shutdown(wait=True)

    def release_files(self) -> None:
        """Close a log that was only opened (recovered and read), never started."""
        self._closed = True
        self._close_fds()
        self._writer.shutdown(wait=True)
        self._remover.shutdown(wait=True)

    def _close_fds(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        if self._board is not None:
            self._board.close()

    # -- appending ---------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def durable_lsn(self) -> int:
        return self._durable[0]

    @property
    def first_lsn(self) -> int:
        """The oldest LSN the log still holds."""
        return self._segments[0].first_lsn

    def has_room(self, nbytes: int = 0) -> bool:
        return self.total_bytes + self._unwritten_bytes() + nbytes < self.max_total_bytes

    def _unwritten_bytes(self) -> int:
        """Bytes accepted for writing but not yet in a segment's size (each counted once)."""
        return sum(q.total_bytes for q in (*self._queue, *self._writing) if q.end_lsn < 0 and q.error is None)

    def refusal(self) -> str | None:
        """Why appends are refused right now (``closed``, ``failed``, ``no_space``, ``full``), or None."""
        if self._closed:
            return "closed"
        if self.failure is not None:
            return "failed"
        if self.no_space and not self._space_returned():
            return "no_space"
        if not self.has_room(min(self.segment_bytes, FULL_MARGIN_BYTES)):
            return "full"
        return None

    def _space_returned(self) -> bool:
        """Room for a request again: bytes, and a free inode for the next segment where the file
        system counts them (a disk can run out of inodes with bytes to spare)."""
        try:
            stats = os.statvfs(self.directory)
        except OSError:
            return False
        inodes = stats.f_files == 0 or stats.f_favail > 0  # 0 files: the file system has no inode limit
        return inodes and stats.f_bavail * stats.f_frsize >= min(self.segment_bytes, 4 * 1024 * 1024)

    async def append(self, frames: Sequence[bytes]) -> int:
        """Write frames and return once they are fsynced; the result is the LSN just past them."""
        return await self.commit([frames], sum(len(f) for f in frames), len(frames))

    async def commit(self, chunks: Iterable[Sequence[bytes]], total_bytes: int, frame_count: int, note: object = None) -> int:
        """Write one request's frames, all of them or (on any error) none, and return once they are
        fsynced: the LSN just past them. ``chunks`` is read in the writer thread."""
        if self._closed:
            raise WalClosed("the write-ahead log is closed")
        if self.failure is not None:
            raise WalFailed(f"the write-ahead log is recovering from a failure: {self.failure}")
        if self.no_space and not self._space_returned():
            raise WalNoSpace("the disk holding the write-ahead log is full")
        if not self.has_room(total_bytes):
            raise WalFull(f"the write-ahead log holds {self.total_bytes} bytes of its {self.max_total_bytes}")
        queued = _Queued(chunks, total_bytes, frame_count, note, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        self._dirty.set()
        # Shielded: a request given up on is still written (or not) whole; its answer is just unread.
        return await asyncio.shield(queued.future)

    def once_settled(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` on the loop once every request queued or being written now is written
        (durable) or refused; at once when there is none."""
        pending = [q.future for q in (*self._writing, *self._queue) if not q.future.done()]
        if not pending:
            callback()
            return
        asyncio.gather(*pending, return_exceptions=True).add_done_callback(lambda _: callback())

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_work()
            if self._recovery_attempts and not self._closed:
                await loop.run_in_executor(self._writer, self._recover)
            self._dirty.clear()
            batch, self._queue = self._queue, []
            if batch:
                self._writing = batch
                try:
                    await loop.run_in_executor(self._writer, self._write_and_sync, batch)
                finally:
                    self._writing = []
                    for q in batch:
                        if q.future.done():
                            continue
                        if q.error is not None:
                            q.future.set_exception(q.error)
                        elif q.end_lsn < 0:
                            q.future.set_exception(WalError("the write-ahead log stopped before this request was written"))
                        else:
                            q.future.set_result(q.end_lsn)
                async with self._data:
                    self._data.notify_all()
            if self._closed and not self._queue:
                return

    async def _wait_for_work(self) -> None:
        """Until something is queued (or the log closes); no longer than the next recovery retry."""
        if not self._recovery_attempts:
            await self._dirty.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._dirty.wait(), self._next_recovery_in())

    def _next_recovery_in(self) -> float:
        return RECOVERY_RETRY_SECS[min(self._recovery_attempts, len(RECOVERY_RETRY_SECS)) - 1]

    # -- the writer thread -------------------------------------------------------------------

    def _write_and_sync(self, batch: list[_Queued]) -> None:
        """Write each queued request (a failed one is rolled back alone), then fsync them together."""
        written: list[_Queued] = []
        for q in batch:
            cut_backs = self._cut_backs
            try:
                q.end_lsn = self._write_request(q)
                written.append(q)
            except WalError as exc:
                q.error = exc
            if self._cut_backs != cut_backs:  # a rotation's fsync failed: what came before is gone too
                for earlier in written:
                    earlier.error, earlier.end_lsn = WalFailed(f"fsync failed: {self.failure_seen}"), -1
                written = []
        if not written:
            return
        started = time.perf_counter()
        try:
            if self._fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            self._fsync_failed(exc)
            for q in written:
                q.error, q.end_lsn = WalFailed(f"fsync failed: {exc}"), -1
            return
        self._on_fsync(time.perf_counter() - started)
        segment = self._segments[-1]
        self._on_durable(self._next_lsn, [q.note for q in written])
        self._set_durable((self._next_lsn, segment.first_lsn, segment.size))

    def _set_durable(self, durable: tuple[int, int, int]) -> None:
        self._durable = durable
        if self._board is not None:
            try:
                self._board.write(durable)
            except OSError as exc:  # only creating it can fail (a full disk): the commit stands, landing waits
                log.error("WAL: cannot publish the durable end for the lake process", extra={"error": str(exc)})

    def _write_request(self, q: _Queued) -> int:
        if self.failure is not None:
            raise WalFailed(f"the write-ahead log is recovering from a failure: {self.failure}")
        if self._segments[-1].size >= self.segment_bytes:
            self._rotate()
        segment = self._segments[-1]
        records = 0
        written = 0
        try:
            if q.frame_count > 1:
                written += self._write_all([encode_frame(KIND_TXN, 0, 0, 0, 0, 0, MARKER.pack(q.total_bytes, self._next_lsn))])
            body = 0
            for frames in q.chunks:
                body += self._write_all(frames)
                records += sum(frame_record_count(f) for f in frames)
            written += body
            if body != q.total_bytes:
                # Its frames ended early: whoever queued it gave up and closed them (a handler cancelled
                # when a drain's deadline passed). Committed so, the request would be reported durable
                # with its records missing; it is refused instead, and a retry runs it whole.
                raise ValueError(f"the request's frames ended after {body} of their {q.total_bytes} bytes")
        except OSError as exc:
            self._roll_back_write(segment, exc)
        except Exception as exc:  # e.g. the request's spool closed under it: nothing of it may stay
            self._roll_back_write(segment, OSError(errno.EIO, f"reading the request's frames failed: {exc!r}"))
        segment.size += written
        self._next_lsn += records
        self.no_space = False
        return self._next_lsn

    def _write_all(self, frames: Sequence[bytes]) -> int:
        expected = sum(len(f) for f in frames)
        written = os.writev(self._fd, frames) if len(frames) > 1 else os.write(self._fd, frames[0])
        while written < expected:  # a short write only happens on a full disk or a signal
            n = os.write(self._fd, b"".join(frames)[written:])
            if n == 0:
                raise OSError(errno.ENOSPC, "the disk took no more bytes")
            written += n
        return written

    def _roll_back_write(self, segment: _Segment, exc: OSError) -> None:
        """Cut the segment back to where this request began, so no partial frame stays on disk."""
        try:
            os.ftruncate(self._fd, segment.size)
        except OSError as cut:
            self._fail(f"a failed write could not be rolled back: {cut}")
            self._recovery_attempts = 1  # the committer cuts the log back to its last good fsync
            raise WalFailed(f"writing failed ({exc}) and could not be rolled back ({cut})") from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.no_space = True
            log.error("WAL: the disk is full; the request was rolled back and refused", extra={"error": str(exc)})
            raise WalNoSpace(f"the disk holding the write-ahead log is full: {exc}") from None
        log.error("WAL: a write failed; the request was rolled back and refused", extra={"error": str(exc)})
        raise WalError(f"writing to the write-ahead log failed: {exc}") from None

    def _rotate(self) -> None:
        # The old segment is made durable now, so only the newest segment can ever be torn.
        if self._fsync:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._fsync_failed(exc)
                raise WalFailed(f"fsync failed: {exc}") from None
        try:
            fd, segment = self._create_segment(self._next_lsn)
        except OSError as exc:
            # The live segment stays live; only the request that needed a new one is refused.
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.no_space = True
                log.error("WAL: no room for a new segment (the disk is out of space or inodes); the request was refused",
                          extra={"error": str(exc)})
                raise WalNoSpace(f"no room for a new WAL segment: {exc}") from None
            raise WalError(f"cannot create a WAL segment: {exc}") from None
        os.close(self._fd)  # fsynced above; readers open their own files
        self._fd = fd
        with self._segments_lock:
            self._segments = [*self._segments, segment]

    def _fsync_failed(self, exc: OSError) -> None:
        """Refuse everything since the last good fsync and cut the log back to it, never retrying."""
        log.critical("WAL: fsync failed; refusing what it covered and recovering from the log", extra={"error": str(exc)})
        self._fail(f"fsync failed: {exc}")
        self._recovery_attempts = 0
        self._recover()

    def _recover(self) -> None:
        """Cut the log back to its last good fsync and take appends again; if the disk still fails,
        appends stay refused and the committer tries again later (a disk may come back)."""
        try:
            self._cut_back_to_durable()
        except OSError as cut:
            self._recovery_attempts += 1
            log.critical(
                "WAL: recovery after a failure failed; appends stay refused until it succeeds",
                extra={"error": str(cut), "attempts": self._recovery_attempts, "retry_in_secs": self._next_recovery_in()},
            )
            return
        self._recovery_attempts = 0
        self.failure = None
        log.warning("WAL: recovered after a failure; appends resume", extra={"next_lsn": self._next_lsn})

    def _fail(self, reason: str) -> None:
        self.failure = self.failure_seen = reason

    def _cut_back_to_durable(self) -> None:
        durable_lsn, segment_lsn, offset = self._durable
        self._cut_backs += 1
        self._close_fds()
        with self._segments_lock:
            self._segments = [seg for seg in self._segments if seg.first_lsn <= segment_lsn]
        # From the directory, not the list: a cut that failed half way is done again whole, and a
        # later segment left on disk would be read back as durable at the next start.
        for path in self.directory.glob("*.wal"):
            if path.stem.isdigit() and int(path.stem) > segment_lsn:
                path.unlink(missing_ok=True)
        segment = self._segments[-1]
        fd = os.open(segment.path, os.O_RDWR | os.O_APPEND)
        self._fd = fd
        os.ftruncate(fd, offset)
        os.fsync(fd)
        fsync_directory(self.directory)
        segment.size = offset
        self._next_lsn = durable_lsn
        self._on_rollback(durable_lsn)

    # -- consuming ---------------------------------------------------------------------------

    async def wait_for_data(self, lsn: int, timeout: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Wait until records at or beyond ``lsn`` are durable (or ``stop()``); False on timeout."""
        ready = (lambda: self._durable[0] > lsn or stop()) if stop else (lambda: self._durable[0] > lsn)
        if ready():
            return self._durable[0] > lsn
        async with self._data:
            try:
                await asyncio.wait_for(self._data.wait_for(ready), timeout)
            except TimeoutError:
                return False
        return self._durable[0] > lsn

    async def wake_consumers(self) -> None:
        async with self._data:
            self._data.notify_all()

    def reader(self, lsn: int) -> WalReader:
        return WalReader(self, lsn)

    def expect_consumers(self, names: Iterable[str]) -> None:
        """Nothing is released until each of these consumers has said what it still needs."""
        self._expected = set(names)

    def register_consumer(self, name: str, lsn: int) -> None:
        self._consumers[name] = lsn

    def release(self, name: str, lsn: int) -> None:
        """A consumer needs nothing below ``lsn`` any more; delete segments nobody needs."""
        self._consumers[name] = lsn
        if not self._expected <= self._consumers.keys():
            return  # a consumer that has not started yet may still need every segment
        floor = min(self._consumers.values())
        # Keep the last segment (it is being written) and any segment holding LSNs >= floor.
        with self._segments_lock:
            segments = self._segments
            keep_from = 0
            while keep_from < len(segments) - 1 and segments[keep_from + 1].first_lsn <= floor:
                keep_from += 1
            self._segments = segments[keep_from:]  # a new list: reader threads iterate their own copy
        if keep_from:
            # Gone from the log now (its room counts again); a crash before the file is deleted
            # leaves a segment below every consumer, deleted again by the next release.
            self._remover.submit(_delete, [gone.path for gone in segments[:keep_from]], self._before_delete)

    def settle(self) -> None:
        """Wait until the segments released so far are deleted (for tests and tools)."""
        self._remover.submit(lambda: None).result()

    def segment_start(self, lsn: int) -> int:
        """The first LSN of the segment holding ``lsn`` (for deciding when a position moved on)."""
        return _segment_at(self._segments, lsn).first_lsn

    def backlog_bytes(self, lsn: int) -> int:
        """Approximate bytes of log at or after ``lsn`` (whole segments)."""
        segments = self._segments
        total = 0
        for i, seg in enumerate(segments):
            nxt = segments[i + 1].first_lsn if i + 1 < len(segments) else self._next_lsn + 1
            if nxt > lsn:
                total += seg.size
        return total if self._next_lsn > lsn else 0

    def _durable_limit(self, segment: _Segment) -> int | None:
        return durable_limit(self._durable, segment)


def durable_limit(durable: tuple[int, int, int], segment: _Segment) -> int | None:
    """How far a reader may read in ``segment``: all of an old one, the synced part of the last."""
    _, segment_lsn, offset = durable
    if segment.first_lsn == segment_lsn:
        return offset
    if segment.first_lsn > segment_lsn:
        return len(MAGIC)
    return None


def _delete(paths: list[Path], before: Callable[[], None]) -> None:
    try:
        before()
    except Exception:  # deleting anyway: kept, they would fill the WAL and devices would be refused
        log.exception("WAL: what must be durable before segments are deleted failed; deleting them anyway",
                      extra={"segments": [path.name for path in paths]})
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # the next release of a later segment does not retry it: say so
            log.error("WAL: a released segment could not be deleted", extra={"segment": path.name, "error": str(exc)})


def _segment_at(segments: list[_Segment], lsn: int) -> _Segment:
    found = segments[0]
    for seg in segments:
        if seg.first_lsn <= lsn:
            found = seg
    return found


def _recoverable_end(f, first_lsn: int, size: int) -> _Recovered:
    """Where the last segment's intact, complete requests end, and what was damaged before that.

    A request of several frames that is not whole on disk is cut back to its ``KIND_TXN`` marker. A
    frame that fails its checksum but is followed by one that passes (``_damaged_frame``) was damaged
    at rest, not torn by a crash: it is passed over and what follows it is kept.
    """
    offset, lsn = len(MAGIC), first_lsn
    txn_start: tuple[int, int, int] | None = None  # (offset, lsn, end offset) of an unfinished request
    passed_over: list[tuple[int, int, int, int]] = []
    read_again_at = -1
    while True:
        scan = _read_frames(f, offset, lsn, None, 1, headers_only=False, markers=True)
        if not scan.frames:
            if scan.corrupt and read_again_at != offset and _intact_when_read_afresh(f.name, offset, None):
                read_again_at = offset  # once per frame: a device that keeps changing its answer is damage
                continue
            placed = _damaged_frame(f, offset, size, may_end_at_end=False) if scan.corrupt else None
            if placed is None:
                damaged = scan.corrupt and _damaged_not_torn(f, offset, size)
                damaged_at = offset if scan.corrupt else -1
                break
            passed_over.append((offset, placed[0], lsn, placed[1]))
            offset, lsn = offset + placed[0], lsn + placed[1]
        else:
            frame = scan.frames[0]
            if frame.kind == KIND_TXN and len(frame.payload) in (TXN.size, MARKER.size):
                txn_start = (offset, lsn, scan.offset + TXN.unpack_from(frame.payload)[0])
            offset, lsn = scan.offset, scan.next_lsn
        if txn_start is not None and offset >= txn_start[2]:
            txn_start = None
    if txn_start is not None:
        offset, lsn = txn_start[0], txn_start[1]
    return _Recovered(offset, lsn, damaged, [d for d in passed_over if d[0] < offset], damaged_at)


@dataclass(frozen=True, slots=True)
class _Recovered:
    end: int  # where the intact, complete requests end: the segment is cut back to it
    next_lsn: int
    damaged_after: bool  # a damaged frame with bytes after it at ``end``, not a torn write
    passed_over: list[tuple[int, int, int, int]]  # damaged frames kept in place: (offset, bytes, lsn, records)
    damaged_at: int = -1  # where a frame that failed its check and placed nothing after it starts (-1: none)


def _damaged_not_torn(f, offset: int, size: int) -> bool:
    """A frame that fails its check but whose declared length fits in the file, with bytes after it."""
    f.seek(offset)
    header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        return False
    length = PREFIX.unpack_from(header)[0]
    return length <= MAX_FRAME_PAYLOAD and offset + HEADER_SIZE + length < size


class WalReader:
    """Reads durable frames in order from an LSN, across segments; one per consumer."""

    def __init__(self, wal: WriteAheadLog, lsn: int) -> None:
        self._wal = wal
        self.lsn = lsn
        self._file = None
        self._segment: _Segment | None = None
        self._offset = 0
        self.corrupt_segments = 0
        self.lost_records = 0  # in damaged frames passed over, or missing between segments
        self._asked_lsn = lsn
        # Reads run in a worker thread, and a consumer stopping closes its reader from the event loop
        # meanwhile: closing waits for a running read, and no read opens a file after it.
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_segment_at(self, lsn: int) -> bool:
        wal = self._wal
        segments = wal._segments  # replaced, never mutated, by release(): safe from this thread
        if not segments:
            return False
        seg = _segment_at(segments, lsn)
        if self._segment is not seg and lsn == self.lsn and _same_file(self._segment, self._file, seg):
            self._segment = seg  # the same segment, listed again (a follower re-lists on each new one): keep our place
        elif self._segment is not seg:
            self._close_file()
            self._segment = seg
            self._file = open(seg.path, "rb")
            self._offset = len(MAGIC)
            # Skip whole frames until the one starting at our LSN (positions are frame boundaries),
            # checked: a damaged record count would misplace every LSN after it.
            at = seg.first_lsn
            limit = wal._durable_limit(seg)
            while at < lsn:
                scan = _read_frames(self._file, self._offset, at, limit, 1)
                if not scan.frames:
                    placed = _place_past_damage(self._file, scan.offset, at, limit, _next_segment(segments, seg)) if scan.corrupt else None
                    if placed is not None and at + placed[1] <= lsn:
                        # Damage below our LSN: passed over (and reported) by the read that got past it before.
                        self._offset, at = scan.offset + placed[0], at + placed[1]  # past any marker the scan skipped
                        continue
                    if limit is None and not scan.corrupt:
                        at = lsn  # past a sealed segment's end: in a gap before the next one, whose read reports it
                    break
                frame = scan.frames[0]
                if frame.end_lsn > lsn:
                    break
                at, self._offset = frame.end_lsn, scan.offset
            self.lsn = at
            self._asked_lsn = lsn  # a position inside a frame: the records before it were read before
        return True

    def read(self, max_bytes: int, kinds: frozenset[int] | None = None) -> list[Frame]:
        """Frames from the current position up to the durable end, about ``max_bytes`` of them;
        frames of other ``kinds`` come back without their payload. ``KIND_RECORDS_SHARED`` frames
        come back as ``KIND_RECORDS`` unless ``kinds`` names them: then as stored; none once closed."""
        with self._lock:
            return [] if self._closed else self._read(max_bytes, kinds)

    def _read(self, max_bytes: int, kinds: frozenset[int] | None) -> list[Frame]:
        wal = self._wal
        if self.lsn >= wal.durable_lsn or not self._open_segment_at(self.lsn):
            return []
        frames: list[Frame] = []
        budget = max_bytes
        whole = kinds is None or (KIND_RECORDS in kinds and KIND_RECORDS_SHARED not in kinds)
        if kinds is not None and whole:
            kinds = kinds | {KIND_RECORDS_SHARED}
        read_again_at = -1
        # Until there is a frame to give: an empty answer says the log holds nothing more for now,
        # and a gap (no records) larger than the budget must not say so.
        while (budget > 0 or not frames) and self.lsn < wal.durable_lsn:
            seg = self._segment
            limit = wal._durable_limit(seg)
            scan = _read_frames(self._file, self._offset, self.lsn, limit, max(budget, 1), kinds=kinds, known=KNOWN_KINDS)
            for f in scan.frames:
                if f.kind == KIND_GAP:  # damaged bytes a start mended (wal_salvage.py), which logged them
                    self.lost_records += max(0, f.end_lsn - max(f.lsn, self._asked_lsn))
                else:
                    frames.append(_whole(f) if f.kind == KIND_RECORDS_SHARED and whole else f)
            budget -= scan.offset - self._offset
            self._offset, self.lsn = scan.offset, scan.next_lsn
            if scan.unknown_kind is not None:
                if frames:
                    break  # what comes before it first; the next read stops at it
                raise WalError(
                    f"the WAL frame at LSN {self.lsn} ({seg.path.name}) is of kind {scan.unknown_kind}, which this "
                    "version cannot read: it was written by a later version. Its consumer stops here and lands "
                    "nothing past it; run that later version (or a newer one) on this wal.dir to land it"
                )
            if scan.corrupt and read_again_at != self._offset and _intact_when_read_afresh(seg.path, self._offset, limit):
                read_again_at = self._offset  # a read that failed once: read it again (once), its stale pages dropped
                # Through a file opened anew too, as the read that found it intact was: the old one
                # may still be answered from what its own open saw.
                self._file.close()
                self._file = open(seg.path, "rb")
                continue
            if scan.corrupt and self._pass_over_damaged(seg, limit):
                continue
            at_end = limit is not None and self._offset >= limit
            if scan.corrupt or (limit is None and not scan.frames and budget > 0):
                nxt = _next_segment(wal._segments, seg)
                if nxt is None:
                    break
                lost = max(0, nxt.first_lsn - self.lsn)
                self.lost_records += lost
                if scan.corrupt:
                    self.corrupt_segments += 1
                    log.error(
                        "WAL: corrupt frame in a sealed segment; skipping to the next segment",
                        extra={"segment": seg.path.name, "offset": self._offset, "lost_from_lsn": self.lsn, "records_lost": lost},
                    )
                elif lost:
                    log.error(
                        "WAL: records missing between two segments (a segment removed or cut short); they cannot land",
                        extra={"after_segment": seg.path.name, "next_segment": nxt.path.name, "lost_from_lsn": self.lsn, "records_lost": lost},
                    )
                self.lsn = max(self.lsn, nxt.first_lsn)
                self._open_segment_at(self.lsn)
            elif at_end or not scan.frames:
                break
        return frames

    def _pass_over_damaged(self, seg: _Segment, limit: int | None) -> bool:
        """Step over the damaged frame at the current position when its header still places it
        (``_damaged_frame``) and, in a sealed segment, the LSNs after it still add up to the next
        segment's first: only that frame's records are lost, not the rest of its segment."""
        placed = _place_past_damage(self._file, self._offset, self.lsn, limit, _next_segment(self._wal._segments, seg))
        if placed is None:
            return False
        size, records = placed
        self.lost_records += records
        log.error(
            "WAL: a frame damaged on disk; its records cannot land, those after it will",
            extra={"segment": seg.path.name, "offset": self._offset, "lsn": self.lsn, "records_lost": records,
                   "kept_in": _keep_aside(seg.path, self._offset, size)},
        )
        self._offset += size
        self.lsn += records
        return True


def _place_past_damage(f, offset: int, lsn: int, limit: int | None, nxt: _Segment | None) -> tuple[int, int] | None:
    """(bytes, records) lost to the damaged frame at ``offset`` (LSN ``lsn``) when what follows it
    can be placed: by the frame's own header (``_damaged_frame``), its LSNs adding up to the next
    segment's first where the segment is sealed; by the next request's marker, which gives its first
    LSN (the whole frames between, counted back from it); or, in a sealed segment, by the frames
    found after it (``_frames_after_damage``), counted back from the next segment's first LSN. None
    otherwise."""
    end = limit if limit is not None else os.fstat(f.fileno()).st_size
    placed = _damaged_frame(f, offset, end, may_end_at_end=True)
    sealed = limit is None and nxt is not None
    if placed is not None and sealed:
        size, records = placed
        rest = _read_frames(f, offset + size, lsn + records, None, 1 << 62, headers_only=True)
        if rest.corrupt or rest.next_lsn != nxt.first_lsn:
            placed = None  # a second damage further on: the marker after this one places it exactly
    if placed is not None:
        return placed
    anchored = _next_request_after_damage(f, offset, end)
    if anchored is not None and lsn <= anchored[1] <= (nxt.first_lsn if sealed else anchored[1]):
        marker, first_lsn = anchored
        # Whole frames of the damaged request after the damage are counted back from the marker:
        # every frame a reader meets was acknowledged, so part of a request is worth landing.
        between = _frames_after_damage(f, offset, marker)
        if between is not None and first_lsn - between[1] >= lsn:
            return between[0] - offset, first_lsn - between[1] - lsn
        return marker - offset, first_lsn - lsn
    if not sealed:
        return None
    found = _frames_after_damage(f, offset, end)
    if found is None or nxt.first_lsn - found[1] < lsn:
        return None
    return found[0] - offset, nxt.first_lsn - found[1] - lsn


def _next_request_after_damage(f, offset: int, end: int) -> tuple[int, int] | None:
    """(offset, first LSN) of the first request after the damaged frame at ``offset`` whose marker says its LSN."""
    from gateway.durable.wal_salvage import next_request  # it builds on this module

    f.seek(offset)
    found = next_request(f.read(end - offset), 1)
    return None if found is None else (offset + found[0], found[1])


def _same_file(segment: _Segment | None, file, other: _Segment) -> bool:
    """Whether ``file``, open on ``segment``, is the file ``other`` names (not one made again under
    its name after a cut-back removed it): then a reader keeps its place instead of scanning again."""
    if segment is None or file is None or segment.first_lsn != other.first_lsn:
        return False
    try:
        mine, theirs = os.fstat(file.fileno()), os.stat(other.path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _whole(frame: Frame) -> Frame:
    """A ``KIND_RECORDS_SHARED`` frame as the ``KIND_RECORDS`` frame it stands for."""
    f = frame
    return Frame(f.lsn, f.count, f.hour, f.received_ms, f.min_event_ms, f.max_event_ms, KIND_RECORDS, expand_shared(f.payload))


def _next_segment(segments: list[_Segment], seg: _Segment) -> _Segment | None:
    """The segment after ``seg`` by LSN (found even if ``seg`` itself is gone from the list)."""
    return next((s for s in segments if s.first_lsn > seg.first_lsn), None)
