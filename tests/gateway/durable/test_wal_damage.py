"""Frames damaged at rest: a damaged frame costs its own records, never those after it.

A byte flipped inside one frame (bad sector, a bit rotting, a stray write) used to cost every frame
after it: in a sealed segment the readers skipped to the next segment, and in the newest one the
damage was cut away with everything after it (inside a request of several frames, even reported as
a torn tail). A frame whose header still places it is now passed over alone, and so, in a sealed
segment, is one whose header was hit too: the frames after it are found by their checksums.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from gateway.durable import wal as wal_module
from gateway.durable.wal import HEADER_SIZE, KIND_QUARANTINE, KIND_RECORDS, MAGIC, PREFIX, WriteAheadLog, encode_frame


def frame(n: int, tag: bytes = b"r") -> bytes:
    payload = b"".join(b'{"v":"%s%d"}\n' % (tag, i) for i in range(n))
    return encode_frame(KIND_RECORDS, 1, 1000, 10, 20, n, payload)


async def open_wal(path, **kw) -> WriteAheadLog:
    wal = WriteAheadLog(path, segment_bytes=kw.pop("segment_bytes", 1 << 20), max_total_bytes=1 << 30)
    await wal.start()
    return wal


async def sealed_segment_then_one_more(tmp_path) -> WriteAheadLog:
    """Four 3-record frames fill a 300-byte segment (LSNs 0-11); a 2-record one starts the next (12-13)."""
    wal = await open_wal(tmp_path, segment_bytes=300)
    for i in range(4):
        await wal.append([frame(3, b"%d-" % i)])
    await wal.append([frame(2, b"next")])
    return wal


async def three_frames_closed(tmp_path) -> None:
    """A log of one segment holding three 2-record frames (LSNs 0-5), closed: its newest segment."""
    wal = await open_wal(tmp_path)
    for i in range(3):
        await wal.append([frame(2, b"%d-" % i)])
    await wal.close()


def read_all(wal: WriteAheadLog, lsn: int = 0, kinds: frozenset[int] | None = None) -> tuple[list, int]:
    reader = wal.reader(lsn)
    frames = []
    while batch := reader.read(1 << 20, kinds):
        frames.extend(batch)
    reader.close()
    return frames, reader.lost_records


def offsets(segment) -> list[int]:
    """Where each frame of ``segment`` starts (its headers are intact in these tests)."""
    data = segment.read_bytes()
    at, found = len(MAGIC), []
    while at < len(data):
        found.append(at)
        at += HEADER_SIZE + PREFIX.unpack_from(data, at)[0]
    return found


def flip(segment, offset: int) -> None:
    data = bytearray(segment.read_bytes())
    data[offset] ^= 0x20
    segment.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["payload", "length"])
async def test_a_damaged_frame_in_a_sealed_segment_costs_only_its_own_records(tmp_path, caplog, where):
    """A byte of the second frame's payload, or of its length: a length that no longer places the next
    frame is passed over too, the frames after it found by their shape and checksums and numbered
    back from the next segment's first LSN. (Before, a damaged length cost the rest of the segment:
    9 records here.)"""
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    second = offsets(sealed)[1]
    flip(sealed, second + (HEADER_SIZE + 5 if where == "payload" else 1))
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (6, 3), (9, 3), (12, 2)]
    assert frames[1].payload.startswith(b'{"v":"2-0"}')
    assert lost == 3 and "records cannot land" in caplog.text
    kept = list(tmp_path.glob("*.damaged-at-*"))
    assert [p.name for p in kept] == [f"{sealed.name}.damaged-at-{second}"]
    assert kept[0].stat().st_size == len(frame(3, b"1-"))
    await wal.close()


async def test_a_damaged_frame_that_ends_its_sealed_segment_is_passed_over(tmp_path, caplog):
    wal = await open_wal(tmp_path, segment_bytes=100)
    for _ in range(3):
        await wal.append([frame(5)])  # each append past 100 bytes rolls a segment
    segments = sorted(tmp_path.glob("*.wal"))
    assert len(segments) == 3
    flip(segments[0], segments[0].stat().st_size - 3)
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal)
    assert [f.lsn for f in frames] == [5, 10] and lost == 5
    await wal.close()


async def test_a_damaged_record_count_in_a_sealed_segment_costs_only_its_own_frame(tmp_path, caplog):
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    flip(sealed, offsets(sealed)[2] + PREFIX.size)  # the third frame says 35 records, not 3
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (3, 3), (9, 3), (12, 2)]
    assert lost == 3
    await wal.close()


async def test_a_damaged_kind_is_damage_not_a_frame_of_a_later_version(tmp_path, caplog):
    """A kind byte flipped to one this version does not know: the frame fails its checksum, so it is
    passed over like any damage. (Before, its reader stopped for good, as before a frame written by a
    later version, and the zone landed nothing after it.)"""
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    flip(sealed, offsets(sealed)[1] + HEADER_SIZE - 4)  # the second frame's kind
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (6, 3), (9, 3), (12, 2)]
    assert lost == 3 and "records cannot land" in caplog.text
    await wal.close()


async def test_a_damaged_count_in_another_zones_frame_shifts_no_lsn_after_it(tmp_path, caplog):
    """A zone counts the records of other zones' frames without owning them (the quarantine zone and
    every records frame): a count damaged there is caught by the frame's lines, not taken, which
    would have given every frame after it in the segment another LSN. (Before: (9, 3) came back as
    (41, 3).)"""
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    flip(sealed, offsets(sealed)[1] + PREFIX.size)  # the second frame says 35 records, not 3
    frames, lost = read_all(wal, kinds=frozenset({KIND_QUARANTINE}))
    assert [(f.lsn, f.count, f.payload) for f in frames] == [(0, 3, b""), (6, 3, b""), (9, 3, b""), (12, 2, b"")]
    assert lost == 3
    await wal.close()


async def test_a_reader_opened_past_a_damaged_header_starts_at_its_lsn_and_reports_nothing_again(tmp_path, caplog):
    """A zone restarted with its position past the damage: the frames before that position are
    passed over, not read to it again, and the loss was reported by the read that first met it."""
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    flip(sealed, offsets(sealed)[1] + PREFIX.size)  # the second frame's record count
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal, lsn=9)
    assert [(f.lsn, f.count) for f in frames] == [(9, 3), (12, 2)]
    assert lost == 0 and "cannot land" not in caplog.text
    await wal.close()


async def test_a_reader_opened_past_damage_behind_a_request_marker_keeps_its_place(tmp_path, caplog):
    """The damaged frame is the first of a request of several frames, behind its marker: a reader
    skipping to a later LSN steps past the damage from where the damage starts, not from the marker.
    (Before, it landed inside the next frame, took that for damage too and logged a second loss.)"""
    wal = await open_wal(tmp_path, segment_bytes=300)
    await wal.append([frame(3, b"0-")])
    await wal.append([frame(3, b"1-"), frame(3, b"2-")])  # a marker, then two frames
    await wal.append([frame(3, b"3-")])
    await wal.append([frame(2, b"next")])
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    at = offsets(sealed)  # the first frame, the marker, the request's two frames (LSNs 0-8)
    flip(sealed, at[2] + PREFIX.size)  # the request's first frame's record count
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal, lsn=6)
    assert [(f.lsn, f.count) for f in frames] == [(6, 3), (9, 3), (12, 2)]
    assert frames[0].payload.startswith(b'{"v":"2-0"}') and lost == 0
    assert "damaged" not in caplog.text and not list(tmp_path.glob("*.damaged-at-*"))
    await wal.close()


async def test_damage_that_leaves_nothing_placeable_still_skips_to_the_next_segment(tmp_path, caplog):
    """A damaged length and, further on, a damaged payload: no chain of intact frames runs from the
    first to the segment's end, so nothing after the first can be placed."""
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    at = offsets(sealed)
    flip(sealed, at[3] + HEADER_SIZE + 5)
    flip(sealed, at[1] + 1)
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (12, 2)]
    assert lost == 9 and "skipping to the next segment" in caplog.text  # the rest of that segment
    await wal.close()


async def test_a_damaged_frame_inside_the_newest_segment_is_passed_over_and_kept_aside(tmp_path, caplog):
    await three_frames_closed(tmp_path)
    segment = next(tmp_path.glob("*.wal"))
    size = segment.stat().st_size
    flip(segment, len(MAGIC) + HEADER_SIZE + 3)  # inside the first frame's payload
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "newest segment; its records cannot land" in caplog.text and "torn tail" not in caplog.text
    assert segment.stat().st_size == size and wal.next_lsn == 6
    kept = list(tmp_path.glob("*.damaged-at-*"))
    assert len(kept) == 1 and kept[0].stat().st_size == len(frame(2, b"0-"))
    assert await wal.append([frame(1, b"after")]) == 7
    frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(2, 2), (4, 2), (6, 1)] and lost == 2
    await wal.close()


async def test_a_damaged_frame_inside_a_request_of_several_frames_is_not_taken_for_a_torn_tail(tmp_path, caplog):
    wal = await open_wal(tmp_path)
    await wal.append([frame(2, b"a"), frame(3, b"b")])  # one request: a marker, then its two frames
    await wal.append([frame(1, b"c")])
    await wal.close()
    segment = next(tmp_path.glob("*.wal"))
    marker, first, second, _ = offsets(segment)
    flip(segment, first + HEADER_SIZE + 4)
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "torn tail" not in caplog.text and wal.next_lsn == 6
    frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(2, 3), (5, 1)] and lost == 2
    await wal.close()


async def test_damage_that_cannot_be_placed_inside_a_request_is_kept_aside_not_called_torn(tmp_path, caplog):
    wal = await open_wal(tmp_path)
    await wal.append([frame(2, b"a"), frame(3, b"b")])
    await wal.append([frame(1, b"c")])
    await wal.close()
    segment = next(tmp_path.glob("*.wal"))
    marker, first, _, _ = offsets(segment)
    size = segment.stat().st_size
    flip(segment, first + PREFIX.size + 32)  # the first frame's kind: what follows cannot be placed, nor a request found after it
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "bytes after it are kept aside" in caplog.text and "torn tail" not in caplog.text
    kept = list(tmp_path.glob("*.damaged-at-*"))
    assert [p.name for p in kept] == [f"{segment.name}.damaged-at-{marker}"] and kept[0].stat().st_size == size - marker
    assert wal.next_lsn == 0
    await wal.close()


async def test_a_torn_last_frame_is_still_cut_back_as_torn(tmp_path, caplog):
    """A frame that fails its check with nothing after it is a write a crash cut short, not damage."""
    wal = await open_wal(tmp_path)
    await wal.append([frame(2, b"a")])
    await wal.append([frame(3, b"b")])
    await wal.close()
    segment = next(tmp_path.glob("*.wal"))
    last = offsets(segment)[-1]
    flip(segment, segment.stat().st_size - 2)
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "torn tail" in caplog.text and not list(tmp_path.glob("*.damaged-at-*"))
    assert segment.stat().st_size == last and wal.next_lsn == 2
    await wal.close()


async def test_records_missing_between_segments_are_counted_and_the_rest_read(tmp_path, caplog):
    wal = await open_wal(tmp_path, segment_bytes=100)
    for i in range(3):
        await wal.append([frame(5, b"%d-" % i)])  # one segment each
    await wal.close()
    sorted(tmp_path.glob("*.wal"))[1].unlink()  # removed by hand while the gateway was down
    wal = await open_wal(tmp_path, segment_bytes=100)
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal)
    assert [f.lsn for f in frames] == [0, 10] and lost == 5
    assert "records missing between two segments" in caplog.text
    reader = wal.reader(7)  # a consumer that had read part of what is gone loses only the rest
    assert [f.lsn for f in reader.read(1 << 20)] == [10] and reader.lost_records == 3
    reader.close()
    await wal.close()


async def test_a_log_missing_its_newest_records_numbers_new_ones_past_what_a_consumer_read(tmp_path, caplog):
    wal = await open_wal(tmp_path, segment_bytes=100)
    for i in range(3):
        await wal.append([frame(5, b"%d-" % i)])
    await wal.close()
    sorted(tmp_path.glob("*.wal"))[-1].unlink()  # the newest: LSNs 10-14, which a zone had read
    with caplog.at_level(logging.ERROR):
        wal = WriteAheadLog(tmp_path, segment_bytes=100, max_total_bytes=1 << 30, floor=lambda: 15)
        await wal.start()
    assert "numbered past them" in caplog.text
    assert wal.next_lsn == 15 and await wal.append([frame(2, b"new")]) == 17
    frames, lost = read_all(wal, 15)
    assert [(f.lsn, f.count) for f in frames] == [(15, 2)] and lost == 0
    await wal.close()
    wal = WriteAheadLog(tmp_path, segment_bytes=100, max_total_bytes=1 << 30, floor=lambda: 15)
    await wal.start()  # a floor already passed changes nothing
    assert wal.next_lsn == 17
    await wal.close()


class _WrappedFile:
    """An open file of the disk, some of whose reads a subclass changes."""

    def __init__(self, f) -> None:
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class ShortOnce(_WrappedFile):
    """A file on a device whose first read of ``size`` bytes comes back one byte short (a flaky device
    or FUSE file system), through whichever file is open: every other read as the disk has it."""

    shorted: set[int] = set()  # the sizes a read already came back short for, on this device

    def __init__(self, f, size: int) -> None:
        super().__init__(f)
        self._size = size

    @property
    def done(self) -> bool:
        return self._size in ShortOnce.shorted

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if n == self._size and not self.done:
            ShortOnce.shorted.add(n)
            return data[:-1]
        return data


def short_reads_of(monkeypatch, size: int) -> list[ShortOnce]:
    opened: list[ShortOnce] = []
    monkeypatch.setattr(ShortOnce, "shorted", set())

    def flaky_open(*args, **kwargs):
        opened.append(ShortOnce(open(*args, **kwargs), size))
        return opened[-1]

    monkeypatch.setattr(wal_module, "open", flaky_open, raising=False)
    return opened


async def test_a_read_that_comes_back_short_once_is_read_again_not_passed_over(tmp_path, monkeypatch):
    wal = await sealed_segment_then_one_more(tmp_path)
    opened = short_reads_of(monkeypatch, len(frame(3, b"1-")) - HEADER_SIZE)  # a frame's payload
    frames, lost = read_all(wal)
    assert any(f.done for f in opened), "no read came back short"
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (3, 3), (6, 3), (9, 3), (12, 2)] and lost == 0
    await wal.close()


class StaleCache:
    """Stands in for a page cache that holds wrong bytes of one frame (seen on a FUSE file system: a
    page read while an append was filling it, then handed back to every read of every open file of
    the segment) until its pages are dropped (``posix_fadvise(DONTNEED)``). No file system here can be
    made to do this on demand, so ``open`` and ``posix_fadvise`` of the WAL module are replaced."""

    def __init__(self, monkeypatch, segment, offset: int) -> None:
        self.segment, self.offset, self.stale, self.wrong_reads = str(segment), offset, True, 0
        real_fadvise = os.posix_fadvise

        def fadvise(fd, start, length, advice):
            if advice == os.POSIX_FADV_DONTNEED and os.readlink(f"/proc/self/fd/{fd}") == self.segment and start <= self.offset:
                self.stale = False
            return real_fadvise(fd, start, length, advice)

        def cached_open(path, *args, **kwargs):
            f = open(path, *args, **kwargs)
            return _CachedFile(f, self) if str(path) == self.segment else f

        monkeypatch.setattr(wal_module.os, "posix_fadvise", fadvise)
        monkeypatch.setattr(wal_module, "open", cached_open, raising=False)


class _CachedFile(_WrappedFile):
    def __init__(self, f, cache: StaleCache) -> None:
        super().__init__(f)
        self._cache = cache

    def read(self, n: int = -1) -> bytes:
        at = self._f.tell()
        data = self._f.read(n)
        inside = self._cache.offset + HEADER_SIZE + 2 - at  # a payload byte of the frame at ``offset``
        if self._cache.stale and 0 <= inside < len(data):
            self._cache.wrong_reads += 1
            return data[:inside] + bytes([data[inside] ^ 0x20]) + data[inside + 1 :]
        return data


async def test_a_frame_a_cache_keeps_reading_wrong_is_read_afresh_not_passed_over(tmp_path, monkeypatch):
    """A wrong read that the cache hands back again: read again through the same file (as before) it
    failed again, and the frame's acknowledged records were passed over as damaged (3 here). Its
    cached pages are now dropped and it is read through a file opened anew."""
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    cache = StaleCache(monkeypatch, sealed, offsets(sealed)[1])
    frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (3, 3), (6, 3), (9, 3), (12, 2)] and lost == 0
    assert not list(tmp_path.glob("*.damaged-at-*"))
    assert cache.wrong_reads >= 1, "no read came back wrong"
    await wal.close()


async def test_a_frame_a_cache_keeps_reading_wrong_at_start_does_not_cut_the_newest_segment(tmp_path, monkeypatch):
    await three_frames_closed(tmp_path)
    segment = next(tmp_path.glob("*.wal"))
    cache = StaleCache(monkeypatch, segment, offsets(segment)[1])
    wal = await open_wal(tmp_path)
    assert wal.next_lsn == 6 and not list(tmp_path.glob("*.damaged-at-*"))
    assert cache.wrong_reads >= 1, "no read came back wrong"
    await wal.close()


async def test_a_short_read_at_start_does_not_cut_the_newest_segment(tmp_path, monkeypatch):
    await three_frames_closed(tmp_path)
    opened = short_reads_of(monkeypatch, len(frame(2, b"0-")) - HEADER_SIZE)
    wal = await open_wal(tmp_path)
    assert any(f.done for f in opened), "no read came back short"
    assert wal.next_lsn == 6 and not list(tmp_path.glob("*.damaged-at-*"))
    await wal.close()


async def test_a_damaged_frame_whose_copy_cannot_be_made_is_still_passed_over(tmp_path, monkeypatch, caplog):
    """The copy kept beside the segment is for forensics: a full disk must not stop the frames after
    the damaged one from landing."""
    wal = await sealed_segment_then_one_more(tmp_path)
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    flip(sealed, offsets(sealed)[1] + HEADER_SIZE + 5)

    def no_room_for_copies(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(wal_module, "open", no_room_for_copies, raising=False)
    with caplog.at_level(logging.ERROR):
        frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (6, 3), (9, 3), (12, 2)] and lost == 3
    assert "not kept" in caplog.records[-1].kept_in and not list(tmp_path.glob("*.damaged-at-*"))
    await wal.close()


async def test_a_damaged_header_of_the_newest_segment_costs_none_of_its_frames(tmp_path, caplog):
    """The segment's first bytes (its magic) hit at rest: the segment was taken for one a crash had
    left before its header was written, and emptied, every record in it lost."""
    await three_frames_closed(tmp_path)
    segment = next(tmp_path.glob("*.wal"))
    size = segment.stat().st_size
    flip(segment, 2)
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "header was damaged on disk" in caplog.text
    assert wal.next_lsn == 6 and segment.stat().st_size == size and segment.read_bytes().startswith(MAGIC)
    frames, lost = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 2), (2, 2), (4, 2)] and lost == 0
    await wal.close()


async def test_a_newest_segment_left_without_its_header_by_a_crash_starts_empty(tmp_path):
    await three_frames_closed(tmp_path)
    segment = next(tmp_path.glob("*.wal"))
    segment.write_bytes(MAGIC[:3])  # created, its header not yet durable when the machine stopped
    wal = await open_wal(tmp_path)
    assert wal.next_lsn == 0 and segment.read_bytes() == MAGIC
    assert await wal.append([frame(1, b"new")]) == 1
    await wal.close()
