"""The newest WAL segment mended where a frame's header was damaged at rest (wal_salvage.py).

Such a frame places nothing after it, and the newest segment has no next one to count back from:
everything after it was cut away with it, as a crash's torn tail is, though every frame there was
whole and acknowledged. Now a damaged length is mended from the frame's checksum, and other damage
costs the request it hit: the requests after it land, each record under its own LSN.
"""

from __future__ import annotations

import logging

import pytest

from gateway.durable import wal_salvage
from gateway.durable.wal import HEADER_SIZE, KIND_GAP, KIND_RECORDS, KIND_TXN, MAGIC, MARKER, META, PREFIX, TXN, WriteAheadLog, encode_frame

KIND_OFFSET = PREFIX.size + META.size - 4  # the kind byte, after count, hour and three u64 times
TXN_BYTES = MARKER.size  # a request marker's payload


class Crash(BaseException):
    """The process dies here."""


def frame(n: int, tag: bytes) -> bytes:
    payload = b"".join(b'{"v":"%s%d"}\n' % (tag, i) for i in range(n))
    return encode_frame(KIND_RECORDS, 1, 1000, 10, 20, n, payload)


async def log_of_requests(tmp_path, requests: int, floor: int = 0) -> list[tuple[int, int]]:
    """A closed log of one segment: ``requests`` requests of 3 records (a marker, then frames of 2
    and 1), request i at LSNs 3i to 3i+2. Returns each request's (marker offset, bytes)."""
    wal = await open_wal(tmp_path, floor)
    for i in range(requests):
        await wal.append([frame(2, b"%d-a" % i), frame(1, b"%d-b" % i)])
    await wal.close()
    return requests_in(segment_of(tmp_path))


async def open_wal(path, floor: int = 0, segment_bytes: int = 1 << 20) -> WriteAheadLog:
    wal = WriteAheadLog(path, segment_bytes=segment_bytes, max_total_bytes=1 << 30, floor=lambda: floor)
    await wal.start()
    return wal


def segment_of(tmp_path):
    [segment] = tmp_path.glob("*.wal")
    return segment


def records(wal: WriteAheadLog, lsn: int = 0) -> list[tuple[int, int, bytes]]:
    """(LSN, records, first line) of each frame of records from ``lsn``."""
    reader = wal.reader(lsn)
    found = []
    while batch := reader.read(1 << 20):
        found += [(f.lsn, f.count, f.payload.split(b"\n")[0]) for f in batch if f.kind == KIND_RECORDS]
    reader.close()
    return found


def damage(segment, offset: int, byte_offsets: tuple[int, ...]) -> None:
    data = bytearray(segment.read_bytes())
    for i in byte_offsets:
        data[offset + i] ^= 0x20
    segment.write_bytes(bytes(data))


async def test_a_damaged_length_in_the_newest_segment_is_mended_and_nothing_is_lost(tmp_path, caplog):
    requests = await log_of_requests(tmp_path, 4)
    segment = segment_of(tmp_path)
    size = segment.stat().st_size
    damage(segment, requests[1][0] + HEADER_SIZE + TXN_BYTES, (1,))  # request 1's first frame: its length, 8 KiB off
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "mended from its checksum; nothing is lost" in caplog.text and "kept aside" not in caplog.text
    assert wal.next_lsn == 12 and segment.stat().st_size == size and not list(tmp_path.glob("*.damaged-at-*"))
    assert [r[:2] for r in records(wal)] == [(lsn, n) for i in range(4) for lsn, n in ((3 * i, 2), (3 * i + 2, 1))]
    await wal.close()


async def test_a_damaged_header_in_the_newest_segment_costs_its_request_and_the_requests_after_it_land(tmp_path, caplog):
    requests = await log_of_requests(tmp_path, 4)
    segment = segment_of(tmp_path)
    hit, hit_bytes = requests[1]
    # Request 1's first frame: its kind and length, so neither it nor its checksum places what follows.
    damage(segment, hit + HEADER_SIZE + TXN_BYTES, (1, KIND_OFFSET))
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "the requests after it will" in caplog.text and "torn tail" not in caplog.text
    line = next(r for r in caplog.records if "requests after it will" in r.getMessage())
    assert (line.offset, line.bytes, line.lsn, line.records_lost) == (hit, hit_bytes, 3, 3)
    # What followed keeps its order and its LSNs (its marker says where it begins).
    assert records(wal) == [
        (0, 2, b'{"v":"0-a0"}'), (2, 1, b'{"v":"0-b0"}'),
        (6, 2, b'{"v":"2-a0"}'), (8, 1, b'{"v":"2-b0"}'),
        (9, 2, b'{"v":"3-a0"}'), (11, 1, b'{"v":"3-b0"}'),
    ]
    assert wal.next_lsn == 12 and await wal.append([frame(1, b"new")]) == 13
    kept = list(tmp_path.glob("*.damaged-at-*"))
    assert [p.name for p in kept] == [f"{segment.name}.damaged-at-{hit}"] and kept[0].stat().st_size == hit_bytes
    await wal.close()
    wal = await open_wal(tmp_path)  # mended once: a later start finds nothing to mend
    assert wal.next_lsn == 13 and len(records(wal)) == 7
    await wal.close()


async def test_a_consumer_that_had_read_past_the_damage_reads_on_where_it_was(tmp_path):
    """A zone that had read to LSN 8 (into request 2) before the damage: it goes on at 8, neither
    taking request 2's first records again nor passing over any after them."""
    requests = await log_of_requests(tmp_path, 4)
    damage(segment_of(tmp_path), requests[1][0] + HEADER_SIZE + TXN_BYTES, (1, KIND_OFFSET))
    wal = await open_wal(tmp_path)
    assert [(lsn, n) for lsn, n, _ in records(wal, 8)] == [(8, 1), (9, 2), (11, 1)]
    await wal.close()


async def test_two_damaged_headers_in_the_newest_segment_cost_their_two_requests(tmp_path):
    requests = await log_of_requests(tmp_path, 5)
    segment = segment_of(tmp_path)
    for i in (1, 3):
        damage(segment, requests[i][0] + HEADER_SIZE + TXN_BYTES, (1, KIND_OFFSET))
    wal = await open_wal(tmp_path)
    assert [(lsn, line) for lsn, _, line in records(wal)] == [
        (lsn, b'{"v":"%d-%s0"}' % (i, part)) for i in (0, 2, 4) for lsn, part in ((3 * i, b"a"), (3 * i + 2, b"b"))
    ]
    assert wal.next_lsn == 15 and len(list(tmp_path.glob("*.damaged-at-*"))) == 2
    await wal.close()


async def test_markers_without_an_lsn_number_nothing_and_the_segment_is_cut_back_as_before(tmp_path, caplog):
    """A segment an earlier version wrote: its markers give the bytes that follow only."""
    frames = []
    for i in range(3):
        body = [frame(2, b"%d-a" % i), frame(1, b"%d-b" % i)]
        frames += [encode_frame(KIND_TXN, 0, 0, 0, 0, 0, TXN.pack(sum(map(len, body)))), *body]
    segment = tmp_path / f"{0:020d}.wal"
    segment.write_bytes(MAGIC + b"".join(frames))
    second_request = len(MAGIC) + sum(map(len, frames[:3]))
    damage(segment, second_request + HEADER_SIZE + TXN.size, (KIND_OFFSET,))
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "bytes after it are kept aside" in caplog.text and wal.next_lsn == 3
    await wal.close()


async def test_a_mend_cut_short_by_a_crash_is_made_again_at_the_next_start(tmp_path, monkeypatch):
    """The gap frame's payload is written before its header: a crash between the two leaves the
    damaged header, which the next start mends the same way."""
    requests = await log_of_requests(tmp_path, 4)
    segment = segment_of(tmp_path)
    damage(segment, requests[1][0] + HEADER_SIZE + TXN_BYTES, (1, KIND_OFFSET))
    write = wal_salvage._write_durably

    def crash_after_the_first_piece(path, pieces):
        write(path, pieces[:1])
        raise Crash

    monkeypatch.setattr(wal_salvage, "_write_durably", crash_after_the_first_piece)
    with pytest.raises(Crash):
        await open_wal(tmp_path)
    monkeypatch.undo()
    wal = await open_wal(tmp_path)
    assert wal.next_lsn == 12 and [lsn for lsn, _, _ in records(wal)] == [0, 2, 6, 8, 9, 11]
    await wal.close()


async def test_damage_with_no_request_after_it_is_still_cut_back_and_kept_aside(tmp_path, caplog):
    requests = await log_of_requests(tmp_path, 3)
    segment = segment_of(tmp_path)
    damage(segment, requests[2][0] + HEADER_SIZE + TXN_BYTES, (KIND_OFFSET,))  # its length still fits: not torn
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "bytes after it are kept aside" in caplog.text
    assert wal.next_lsn == 6 and segment.stat().st_size == requests[2][0]
    await wal.close()


def test_a_gap_frame_stands_for_its_count_of_lsns_and_holds_no_records():
    gap = wal_salvage.gap_frame(5, 100)
    assert len(gap) == 100 and gap[KIND_OFFSET] == KIND_GAP and META.unpack_from(gap, PREFIX.size)[0] == 5
    assert wal_salvage.mended_length(gap) == 100 - HEADER_SIZE  # whole: its own length passes its checksum


async def test_a_gap_larger_than_a_read_ends_no_reading(tmp_path):
    """A read returns nothing only where the log holds nothing more: a consumer that reads until an
    empty answer (the retry ledger's catch-up) must not stop at a gap larger than its read."""
    requests = await log_of_requests(tmp_path, 4)
    damage(segment_of(tmp_path), requests[1][0] + HEADER_SIZE + TXN_BYTES, (1, KIND_OFFSET))
    wal = await open_wal(tmp_path)
    reader = wal.reader(3)
    first = reader.read(10)  # far less than the gap's bytes
    assert [(f.lsn, f.count) for f in first][:1] == [(6, 2)] and reader.lost_records == 3
    reader.close()
    await wal.close()


async def test_two_damaged_headers_in_a_sealed_segment_cost_their_two_requests(tmp_path, caplog):
    """Readers place what follows a damaged header by the next request's marker too: a second damage
    further on no longer costs the frames between the two (the chain of checksums to the segment's
    end, which numbered them before, breaks at the second: 5 records lost here, not 4, and with the
    damage one request further apart, every frame in between)."""
    wal = await open_wal(tmp_path, segment_bytes=900)
    for i in range(6):
        await wal.append([frame(2, b"%d-a" % i), frame(1, b"%d-b" % i)])
    sealed = sorted(tmp_path.glob("*.wal"))[0]
    assert len(list(tmp_path.glob("*.wal"))) == 2, "the test needs a sealed segment and one after it"
    markers = [at for at, _ in requests_in(sealed)]
    assert len(markers) >= 4
    for i in (1, 2):
        damage(sealed, markers[i] + HEADER_SIZE + TXN_BYTES, (1, KIND_OFFSET))
    reader = wal.reader(0)
    found = []
    with caplog.at_level(logging.ERROR):
        while batch := reader.read(1 << 20):
            found += [f.lsn for f in batch if f.kind == KIND_RECORDS]
    # Each damaged request loses its first frame only: the whole frame after it is counted back
    # from the next request's marker.
    expected = [lsn for i in range(6) for lsn in ((3 * i + 2,) if i in (1, 2) else (3 * i, 3 * i + 2))]
    assert found == expected and reader.lost_records == 4
    reader.close()
    await wal.close()


def requests_in(segment) -> list[tuple[int, int]]:
    """(marker offset, bytes) of each request in ``segment``."""
    data = segment.read_bytes()
    at, found = len(MAGIC), []
    while at < len(data):
        length = PREFIX.unpack_from(data, at)[0]
        if data[at + KIND_OFFSET] == KIND_TXN:
            found.append((at, 0))
        found[-1] = (found[-1][0], at + HEADER_SIZE + length - found[-1][0])
        at += HEADER_SIZE + length
    return found


async def test_a_mend_the_disk_refuses_stops_the_start_naming_the_segment(tmp_path, monkeypatch):
    """A start that cannot write its mend stops with the segment's path; the next one mends it."""
    import errno

    requests = await log_of_requests(tmp_path, 4)
    segment = segment_of(tmp_path)
    damage(segment, requests[1][0] + HEADER_SIZE + TXN_BYTES, (1, KIND_OFFSET))

    def failing_pwrite(fd, data, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(wal_salvage.os, "pwrite", failing_pwrite)
    with pytest.raises(OSError, match="mending a WAL frame or segment header damaged on disk failed") as failed:
        await open_wal(tmp_path)
    assert failed.value.filename == str(segment) and failed.value.errno == errno.EIO
    monkeypatch.undo()
    wal = await open_wal(tmp_path)
    assert wal.next_lsn == 12
    await wal.close()
