"""The write-ahead log: durability, group commit, torn tails, capacity, retention (damage at rest: test_wal_damage.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import pytest

from gateway.durable.wal import (
    KIND_QUARANTINE,
    KIND_RECORDS,
    KIND_RECORDS_SHARED,
    MAGIC,
    WalClosed,
    WalError,
    WalFull,
    WriteAheadLog,
    encode_frame,
    expand_shared,
    expand_shared_in_slices,
    fresh_log_origin,
    shared_payload,
)


def frame(n: int, tag: bytes = b"r", hour: int = 1) -> bytes:
    payload = b"".join(b'{"v":"%s%d"}\n' % (tag, i) for i in range(n))
    return encode_frame(KIND_RECORDS, hour, 1000, 10, 20, n, payload)


async def open_wal(path, **kw) -> WriteAheadLog:
    wal = WriteAheadLog(path, segment_bytes=kw.pop("segment_bytes", 1 << 20), max_total_bytes=kw.pop("max_total_bytes", 1 << 30), **kw)
    await wal.start()
    return wal


def read_all(wal: WriteAheadLog, lsn: int = 0):
    reader = wal.reader(lsn)
    frames = []
    while batch := reader.read(1 << 20):
        frames.extend(batch)
    reader.close()
    return frames


async def test_append_returns_after_fsync_and_reads_back_in_order(tmp_path):
    fsyncs = []
    wal = await open_wal(tmp_path, on_fsync=fsyncs.append)
    end = await wal.append([frame(3, b"a"), frame(2, b"b")])
    assert end == 5 and wal.durable_lsn == 5 and fsyncs
    frames = read_all(wal)
    assert [(f.lsn, f.count) for f in frames] == [(0, 3), (3, 2)]
    assert frames[1].payload.startswith(b'{"v":"b0"}')
    await wal.close()


@pytest.mark.parametrize("held", ["in memory", "in a file"])
async def test_a_request_whose_spool_is_closed_before_it_is_written_is_refused_not_committed_empty(tmp_path, held):
    """A handler cancelled while its request waited behind a slow fsync (a drain's deadline passing)
    closed its spool; the writer then found no frames, wrote the request's marker alone, fsynced it
    and reported it durable: its records were acknowledged (to a retry, as duplicates) and never
    written. The request is refused now, and nothing of it stays in the log."""
    from gateway.ingest.spool import Spool

    wal = await open_wal(tmp_path / "wal")
    await wal.append([frame(2, b"before")])
    spool = Spool(tmp_path, memory_bytes=1 << 20 if held == "in memory" else 0)
    for i in range(3):
        spool.add(frame(5, b"r%d-" % i))
    committing = asyncio.ensure_future(wal.commit(spool.chunks(), spool.bytes, spool.frame_count))
    spool.close()  # before the writer thread reads it: the event loop has not run the committer yet
    with pytest.raises(WalError):
        await committing
    assert wal.durable_lsn == 2 and [f.count for f in read_all(wal)] == [2], "a request with no records was committed"
    assert await wal.append([frame(1, b"after")]) == 3
    await wal.close()


@pytest.mark.parametrize("held", ["in memory", "in a file"])
async def test_a_request_drained_into_the_wal_holds_none_of_its_frames_while_its_fsync_runs(tmp_path, monkeypatch, held):
    """The WAL's writer reads a request's frames once: read through ``Spool.drain`` (as the pipeline
    commits them), the spool has let them go before the fsync, which its request still waits for;
    everything is still written, in order."""
    from gateway.ingest.spool import Spool

    wal = await open_wal(tmp_path / "wal")
    spool = Spool(tmp_path, memory_bytes=1 << 20 if held == "in memory" else 40)
    for i in range(3):
        spool.add(frame(5, b"r%d-" % i))
    held_at_fsync = []
    fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: held_at_fsync.append((spool._frames, spool._file)) or fdatasync(fd))
    assert await wal.commit(spool.drain(), spool.bytes, spool.frame_count) == 15
    assert held_at_fsync == [([], None)], "frames still held by the spool when the fsync began"
    frames = read_all(wal)
    written = b"".join(f.payload for f in frames)
    assert sum(f.count for f in frames) == 15 and written.index(b"r0-") < written.index(b"r1-") < written.index(b"r2-")
    await wal.close()


async def test_once_settled_waits_for_what_is_queued_and_being_written_now(tmp_path):
    wal = await open_wal(tmp_path / "wal")
    called: list[str] = []
    wal.once_settled(lambda: called.append("idle"))
    assert called == ["idle"], "nothing queued: at once"
    writer_may_go = threading.Event()
    write_and_sync = wal._write_and_sync
    wal._write_and_sync = lambda batch: writer_may_go.wait(10) and write_and_sync(batch)
    writing = asyncio.ensure_future(wal.append([frame(2, b"a")]))
    while not wal._writing:
        await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(wal.append([frame(1, b"b")]))
    await asyncio.sleep(0)
    wal.once_settled(lambda: called.append(f"settled at {wal.durable_lsn}"))
    later = asyncio.ensure_future(wal.append([frame(1, b"c")]))  # queued after: not waited for
    await asyncio.sleep(0.1)
    assert called == ["idle"], "the write in progress has not ended"
    writer_may_go.set()
    await asyncio.gather(writing, queued, later)
    assert called[1] in ("settled at 3", "settled at 4"), called
    await wal.close()


async def test_lines_stored_with_their_shared_beginning_once_are_read_back_whole(tmp_path):
    shared = b'{"ingest_id":"i1","gateway_id":"gw","device":{"site":"a,b"}'
    rests = [b',"index":%d,"record":{"v":"x\\n,y"}}' % i for i in range(3)]  # an escaped line break and comma inside
    whole = b"".join(shared + rest + b"\n" for rest in rests)
    payload = shared_payload(shared, rests)
    assert expand_shared(payload) == whole and len(payload) < len(whole)
    wal = await open_wal(tmp_path)
    await wal.append([frame(2, b"old"), encode_frame(KIND_RECORDS_SHARED, 7, 1000, 10, 20, 3, payload), frame(1, b"new")])
    frames = read_all(wal)
    assert [(f.lsn, f.count, f.kind) for f in frames] == [(0, 2, KIND_RECORDS), (2, 3, KIND_RECORDS), (5, 1, KIND_RECORDS)]
    assert frames[1].payload == whole and frames[1].hour == 7
    # A consumer of other kinds keeps its place past it without reading it.
    reader = wal.reader(0)
    others = reader.read(1 << 20, frozenset({KIND_QUARANTINE}))
    assert [(f.lsn, f.payload) for f in others] == [(0, b""), (2, b""), (5, b"")] and reader.lsn == 6
    reader.close()
    # One that names the shared kind gets such frames as stored, and expands them itself.
    reader = wal.reader(0)
    stored = reader.read(1 << 20, frozenset({KIND_RECORDS, KIND_RECORDS_SHARED}))
    assert [(f.kind, f.payload) for f in stored][1] == (KIND_RECORDS_SHARED, payload)
    reader.close()
    await wal.close()


@pytest.mark.parametrize("records", [0, 1, 7, 300])
def test_shared_lines_expanded_in_slices_join_to_the_whole(records):
    shared = b'{"ingest_id":"i1","gateway_id":"gw"'
    rests = [b',"index":%d,"record":{"v":"%b"}}' % (i, b"x" * (i % 50)) for i in range(records)]
    payload = shared_payload(shared, rests)
    pieces = list(expand_shared_in_slices(payload, 1024))
    assert b"".join(pieces) == expand_shared(payload) == b"".join(shared + rest + b"\n" for rest in rests)
    assert all(piece.endswith(b"\n") and len(piece) <= 1024 for piece in pieces), "whole lines, under the size"
    assert len(pieces) > 10 or records < 300


async def test_a_reader_stops_at_a_frame_of_a_kind_it_does_not_know(tmp_path):
    wal = await open_wal(tmp_path)
    await wal.append([frame(2, b"a"), encode_frame(9, 1, 1000, 10, 20, 3, b"later format\n"), frame(1, b"b")])
    reader = wal.reader(0)
    assert [(f.lsn, f.count) for f in reader.read(1 << 20)] == [(0, 2)]  # what comes before it
    with pytest.raises(WalError, match="kind 9, which this version cannot read"):
        reader.read(1 << 20)
    assert reader.lsn == 2  # and stays there, however often it is asked
    with pytest.raises(WalError):
        reader.read(1 << 20, frozenset({KIND_QUARANTINE}))
    reader.close()
    await wal.close()


async def test_group_commit_covers_concurrent_appends_with_few_fsyncs(tmp_path):
    fsyncs = []
    wal = await open_wal(tmp_path, on_fsync=fsyncs.append)
    ends = await asyncio.gather(*(wal.append([frame(1)]) for _ in range(200)))
    assert sorted(ends) == list(range(1, 201))
    assert len(fsyncs) < 50, f"{len(fsyncs)} fsyncs for 200 concurrent appends"
    await wal.close()


async def test_reopen_continues_lsns_and_keeps_records(tmp_path):
    wal = await open_wal(tmp_path)
    await wal.append([frame(4)])
    await wal.close()
    wal = await open_wal(tmp_path)
    assert wal.next_lsn == 4
    assert await wal.append([frame(1)]) == 5
    assert [f.lsn for f in read_all(wal)] == [0, 4]
    await wal.close()


async def test_a_new_log_numbers_from_its_origin_and_a_reopened_one_ignores_it(tmp_path):
    origin = fresh_log_origin()
    wal = await open_wal(tmp_path, first_lsn=origin)
    assert wal.next_lsn == wal.first_lsn == wal.durable_lsn == origin
    assert await wal.append([frame(3)]) == origin + 3
    await wal.close()
    later = await open_wal(tmp_path, first_lsn=fresh_log_origin())  # a restart: the log on disk decides
    assert later.next_lsn == origin + 3
    assert [f.lsn for f in read_all(later, origin)] == [origin]
    await later.close()
    assert fresh_log_origin() > origin  # a second new log, later, starts past the first one's records


@pytest.mark.parametrize("tail", [b"\x05\x00", frame(3)[:-7], b"\xff" * 64], ids=["short-header", "short-payload", "garbage"])
async def test_torn_tail_is_truncated_with_a_log_line(tmp_path, caplog, tail):
    wal = await open_wal(tmp_path)
    await wal.append([frame(2)])
    await wal.close()
    segment = next(tmp_path.glob("*.wal"))
    good = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING):
        wal = await open_wal(tmp_path)
    assert "torn tail" in caplog.text
    assert segment.stat().st_size == good and wal.next_lsn == 2
    assert await wal.append([frame(1)]) == 3
    assert [f.count for f in read_all(wal)] == [2, 1]
    await wal.close()


async def test_header_less_segment_from_a_crash_at_creation_is_repaired(tmp_path):
    (tmp_path / f"{0:020d}.wal").write_bytes(MAGIC[:3])
    wal = await open_wal(tmp_path)
    assert await wal.append([frame(1)]) == 1
    await wal.close()


async def test_segments_are_deleted_once_every_consumer_is_past_them(tmp_path):
    wal = await open_wal(tmp_path, segment_bytes=100)
    wal.register_consumer("raw", 0)
    wal.register_consumer("quarantine", 0)
    for _ in range(4):
        await wal.append([frame(5)])
    assert len(list(tmp_path.glob("*.wal"))) == 4
    wal.release("raw", 15)
    wal.settle()
    assert len(list(tmp_path.glob("*.wal"))) == 4  # quarantine still needs them
    wal.release("quarantine", 12)
    wal.settle()
    assert sorted(p.name for p in tmp_path.glob("*.wal")) == [f"{10:020d}.wal", f"{15:020d}.wal"]
    await wal.close()


async def test_what_must_be_durable_first_is_made_so_before_each_deletion_and_a_failure_deletes_all_the_same(tmp_path, caplog):
    """The retry ledger's journal is fsynced there (``before_delete``): what the ledger learned from a
    segment outlives a power loss that comes after the segment is gone."""
    seen: list[list[str]] = []

    def before_delete():
        seen.append(sorted(p.name for p in tmp_path.glob("*.wal")))  # the files still there when it runs
        if len(seen) == 2:
            raise OSError(5, "Input/output error")

    wal = await open_wal(tmp_path, segment_bytes=100, before_delete=before_delete)
    wal.register_consumer("raw", 0)
    for _ in range(4):
        await wal.append([frame(5)])
    wal.release("raw", 5)
    wal.settle()
    assert seen == [[f"{n:020d}.wal" for n in (0, 5, 10, 15)]]
    wal.release("raw", 15)
    wal.settle()
    assert seen[1] == [f"{n:020d}.wal" for n in (5, 10, 15)]
    assert sorted(p.name for p in tmp_path.glob("*.wal")) == [f"{15:020d}.wal"]  # deleted, though it failed
    assert "deleting them anyway" in caplog.text
    await wal.close()


async def test_a_slow_file_system_delays_no_caller_of_release(tmp_path, monkeypatch):
    # Stands in for a file system slow to free a large file (tens of ms for 64 MiB here): the
    # deletion waits on an event, and release() must return before it is set.
    deleting = threading.Event()
    unblock = threading.Event()
    real_unlink = Path.unlink

    def slow_unlink(path, missing_ok=False):
        deleting.set()
        assert unblock.wait(10)
        real_unlink(path, missing_ok=missing_ok)

    wal = await open_wal(tmp_path, segment_bytes=100)
    wal.register_consumer("raw", 0)
    for _ in range(3):
        await wal.append([frame(5)])
    monkeypatch.setattr(Path, "unlink", slow_unlink)
    wal.release("raw", 10)  # returns at once: the two older segments leave the log now
    assert wal.first_lsn == 10 and deleting.wait(10)
    assert len(list(tmp_path.glob("*.wal"))) == 3  # their files are still being deleted
    await wal.append([frame(5)])  # the log goes on meanwhile
    unblock.set()
    wal.settle()
    assert sorted(p.name for p in tmp_path.glob("*.wal")) == [f"{10:020d}.wal", f"{15:020d}.wal"]
    await wal.close()


async def test_capacity_refuses_appends_instead_of_growing(tmp_path):
    wal = await open_wal(tmp_path, segment_bytes=100, max_total_bytes=400)
    with pytest.raises(WalFull):
        for _ in range(100):
            await wal.append([frame(5)])
    assert not wal.has_room(len(frame(5))) and wal.total_bytes <= 400, "the limit is never exceeded"
    wal.register_consumer("raw", 0)
    wal.release("raw", wal.next_lsn)
    assert wal.has_room(len(frame(5)))
    await wal.close()


async def test_closed_log_refuses_appends(tmp_path):
    wal = await open_wal(tmp_path)
    await wal.close()
    with pytest.raises(WalClosed):
        await wal.append([frame(1)])


async def test_reader_waits_for_durable_data(tmp_path):
    wal = await open_wal(tmp_path)
    waiter = asyncio.create_task(wal.wait_for_data(0, timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    await wal.append([frame(1)])
    assert await waiter is True
    assert await wal.wait_for_data(1, timeout=0.01) is False
    await wal.close()


async def test_reader_starts_at_a_frame_boundary_in_a_later_segment(tmp_path):
    wal = await open_wal(tmp_path, segment_bytes=100)
    for _ in range(3):
        await wal.append([frame(5), frame(2)])
    assert [f.lsn for f in read_all(wal, 12)] == [12, 14, 19]
    await wal.close()


async def test_closing_a_reader_waits_for_its_read_in_another_thread_and_leaves_no_file_open(tmp_path, monkeypatch):
    # A zone's lander reads in a worker thread; stopped meanwhile, it closed the reader under the
    # read, which then opened the next segment's file and left it open for the collector to find.
    from gateway.durable import wal as wal_module

    wal = await open_wal(tmp_path, segment_bytes=100)
    for _ in range(3):
        await wal.append([frame(5), frame(2)])
    reader = wal.reader(0)
    reading, release = threading.Event(), threading.Event()
    scan = wal_module._read_frames

    def slow_scan(*args, **kwargs):
        reading.set()
        release.wait(5)
        return scan(*args, **kwargs)

    monkeypatch.setattr(wal_module, "_read_frames", slow_scan)
    read = threading.Thread(target=reader.read, args=(1 << 20,))
    read.start()
    assert reading.wait(5)
    closing = threading.Thread(target=reader.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive(), "close() returned while the read still ran"
    release.set()
    read.join(5)
    closing.join(5)
    assert not closing.is_alive() and reader._file is None
    assert reader.read(1 << 20) == [] and reader._file is None, "a closed reader opens nothing"
    await wal.close()


async def test_fsync_can_be_disabled_for_benchmarks_only(tmp_path):
    calls = []
    wal = await open_wal(tmp_path, fsync=False, on_fsync=calls.append)
    await wal.append([frame(1)])
    assert os.path.getsize(next(tmp_path.glob("*.wal"))) > len(MAGIC)
    await wal.close()


async def test_nothing_is_released_until_every_expected_consumer_has_registered(tmp_path):
    wal = await open_wal(tmp_path, segment_bytes=100)
    wal.expect_consumers(["raw", "curated"])
    for _ in range(4):
        await wal.append([frame(5)])
    wal.register_consumer("raw", 0)
    wal.release("raw", 20)  # curated (still starting) may need every segment
    wal.settle()
    assert len(list(tmp_path.glob("*.wal"))) == 4
    wal.register_consumer("curated", 10)
    wal.release("raw", 20)
    wal.settle()
    assert sorted(p.name for p in tmp_path.glob("*.wal")) == [f"{10:020d}.wal", f"{15:020d}.wal"]
    await wal.close()
