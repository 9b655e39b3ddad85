"""A WAL landed by another process: the follower reads only what its owner made durable, and the
owner deletes only what every zone released through the shared board."""

from __future__ import annotations

import asyncio
import os

import pytest

from connectors.local_lake import LocalLakeSink
from gateway.durable import wal as wal_module
from gateway.durable.wal import WriteAheadLog
from gateway.durable.wal_board import Board, ReleasedPositions, durable_board, released_board
from gateway.durable.wal_follower import WalFollower
from gateway.lake.pipeline import Pipeline
from gateway.durable.wal_layout import WalLocked, WalSlot
from gateway.lake.landing import RETIRED
from gateway.lake.zones import Zones
from gateway.ops.metrics import GatewayMetrics
from gateway.settings import Settings
from tests.gateway.durable.test_wal import frame
from tests.gateway.lake.test_landing import frame as seq_frame
from tests.gateway.lake.test_landing import landed_seqs, lander


def follower_of(directory) -> WalFollower:
    return WalFollower(directory / "segments", durable_board(directory), ReleasedPositions(released_board(directory)), poll_secs=0.01)


async def owned_wal(directory, segment_bytes: int = 1024) -> WriteAheadLog:
    wal = WriteAheadLog(directory / "segments", segment_bytes=segment_bytes, max_total_bytes=1 << 30, board=durable_board(directory))
    await wal.start()
    return wal


async def test_the_follower_reads_what_the_owner_made_durable_across_segments(tmp_path):
    follower = follower_of(tmp_path)
    assert not follower.refresh()  # no owner yet: nothing to read, no error
    wal = await owned_wal(tmp_path)
    await wal.append([frame(3, b"a")])
    assert follower.refresh() and follower.durable_lsn == 3
    reader = follower.reader(0)
    assert [(f.lsn, f.count) for f in reader.read(1 << 20)] == [(0, 3)]
    for i in range(40):  # several segments of 1 KiB
        await wal.append([frame(5, b"b%d" % i)])
    assert len(wal._segments) > 3
    assert await follower.wait_for_data(reader.lsn, 1.0)
    lsns = []
    while frames := reader.read(1 << 20):
        lsns.extend(f.lsn for f in frames)
    assert lsns == [3 + 5 * i for i in range(40)] and reader.lsn == wal.durable_lsn == 203
    assert not await follower.wait_for_data(203, 0.05)  # nothing more: a timeout, not an error
    reader.close()
    await wal.close()


async def test_a_reader_keeps_its_place_when_the_follower_lists_its_segment_again(tmp_path, monkeypatch):
    """The follower lists the segments again whenever the owner starts a new one; a reader part way
    through a segment must go on from where it is, not scan that segment's frames again from its
    start (in a 64 MiB segment, a tenth of a second each time, for every zone)."""
    wal = await owned_wal(tmp_path, segment_bytes=4096)
    follower = follower_of(tmp_path)
    await wal.append([frame(3, b"a")])
    await wal.append([frame(3, b"b")])
    assert follower.refresh()
    reader = follower.reader(0)
    assert [f.lsn for f in reader.read(1 << 20)] == [0, 3]
    scans = []
    real = wal_module._read_frames
    monkeypatch.setattr(wal_module, "_read_frames", lambda *a, **kw: scans.append(kw.get("headers_only", a[5] if len(a) > 5 else False)) or real(*a, **kw))
    while len(wal._segments) < 2:
        await wal.append([frame(40, b"c")])
    assert await follower.wait_for_data(reader.lsn, 1.0)
    lsns = []
    while frames := reader.read(1 << 20):
        lsns.extend(f.lsn for f in frames)
    assert lsns[0] == 6 and reader.lsn == wal.durable_lsn
    assert True not in scans, "the reader scanned its segment's headers again after a listing"
    reader.close()
    await wal.close()


async def test_a_follower_never_reads_past_the_durable_end_in_the_segment_being_written(tmp_path):
    wal = await owned_wal(tmp_path, segment_bytes=1 << 20)
    await wal.append([frame(2)])
    follower = follower_of(tmp_path)
    follower.refresh()
    # Bytes the owner wrote but has not made durable (as if killed before its fsync).
    with open(wal._segments[-1].path, "ab") as f:
        f.write(frame(7, b"late"))
    reader = follower.reader(0)
    assert [f.count for f in reader.read(1 << 20)] == [2]
    assert reader.read(1 << 20) == []
    reader.close()
    await wal.close()


async def test_the_owner_deletes_a_segment_only_once_every_zone_released_it(tmp_path):
    settings = Settings()
    slot = WalSlot(tmp_path, "gw-w0", "w0")
    metrics = GatewayMetrics()
    pipeline = Pipeline(settings, slot=slot, sink=None, metrics=metrics, landing_elsewhere=True)
    await pipeline.start()
    wal = pipeline.wal
    wal.segment_bytes = 1024
    for i in range(30):
        await wal.append([frame(5, b"c%d" % i)])
    first_segments = len(wal._segments)
    origin = wal._segments[0].first_lsn  # a new log numbers from its creation time (fresh_log_origin)
    released = ReleasedPositions(released_board(tmp_path))
    released.publish("raw", origin + 150)
    released.publish("quarantine", origin + 150)
    await asyncio.sleep(0.3)
    assert len(wal._segments) == first_segments  # the curated zone has said nothing yet
    released.publish("curated", origin + 100)
    await asyncio.sleep(0.3)
    kept = wal._segments
    assert len(kept) < first_segments and kept[0].first_lsn <= origin + 100 < (kept[1].first_lsn if len(kept) > 1 else 1 << 62)
    await pipeline.close()


async def test_a_zone_over_a_follower_lands_every_record_once_across_its_restart(tmp_path):
    wal = await owned_wal(tmp_path, segment_bytes=8192)
    lake = tmp_path / "lake"
    state = tmp_path / "landing"
    seq = 0

    async def send(requests: int) -> None:
        nonlocal seq
        for _ in range(requests):
            await wal.append([seq_frame(range(seq, seq + 10), pad=40)])
            seq += 10

    follower = follower_of(tmp_path)
    follower.refresh()
    zone = lander(state, follower, LocalLakeSink(lake))
    await zone.start()
    await send(30)
    await asyncio.sleep(0.5)
    await zone.close()  # killed mid-stream, as the lake process may be
    follower.close()
    await send(30)
    follower = follower_of(tmp_path)
    follower.refresh()
    zone = lander(state, follower, LocalLakeSink(lake))
    await zone.start()
    await send(20)
    assert await zone.drain(10.0)
    assert landed_seqs(lake) == list(range(seq))
    # What the zone released is on the board, and the owner may delete below it.
    assert ReleasedPositions(released_board(tmp_path)).read()["raw"] == wal.durable_lsn
    await wal.close()


async def test_one_lander_per_wal_directory_whichever_process_runs_it(tmp_path):
    settings = Settings()
    slot = WalSlot(tmp_path, "gw-w0", "w0")
    wal = await owned_wal(tmp_path)
    first = Zones(settings, wal=follower_of(tmp_path), slot=slot, sink=LocalLakeSink(tmp_path / "lake"), metrics=GatewayMetrics(), scorer=None)
    await first.start()
    second = Zones(settings, wal=follower_of(tmp_path), slot=slot, sink=LocalLakeSink(tmp_path / "lake"), metrics=GatewayMetrics(), scorer=None)
    with pytest.raises(WalLocked, match="landing"):
        await second.start()
    await first.close()
    await wal.close()


def test_a_board_read_half_written_is_read_again_and_a_damaged_one_is_named(tmp_path):
    board = Board(tmp_path / "b", 3)
    assert board.read() is None
    board.write((1, 2, 3))
    reader = Board(tmp_path / "b", 3)
    assert reader.read() == (1, 2, 3)
    board.write((4, 5, 6))
    assert reader.read() == (4, 5, 6)
    with open(tmp_path / "b", "r+b") as f:  # a value changed without its checksum
        f.seek(4)
        f.write(os.urandom(8))
    with pytest.raises(OSError, match="unreadable"):
        reader.read()


async def test_a_damaged_durable_end_keeps_the_last_one_until_the_owner_writes_it_again(tmp_path):
    wal = await owned_wal(tmp_path)
    await wal.append([frame(3)])
    follower = follower_of(tmp_path)
    assert follower.refresh() and follower.durable_lsn == 3
    with open(tmp_path / "wal.durable", "r+b") as f:
        f.seek(4)
        f.write(b"\xff" * 8)
    assert not follower.refresh() and follower._durable[0] == 3  # not an error, and not a guess
    await wal.append([frame(2)])  # the owner's next fsync rewrites the board whole
    assert follower.refresh() and follower.durable_lsn == 5
    await wal.close()


async def test_zones_that_start_forget_what_an_earlier_life_published(tmp_path):
    wal = await owned_wal(tmp_path)
    await wal.append([frame(3)])
    # Positions far past what the zones' state files say (state reset by hand, a restored backup):
    # trusted, they would let the owner delete segments the zones still need.
    stale = ReleasedPositions(released_board(tmp_path))
    stale.publish("raw", 10_000)
    stale.publish("quarantine", 10_000)
    zones = Zones(Settings(), wal=follower_of(tmp_path), slot=WalSlot(tmp_path, "gw-w0", "w0"), sink=LocalLakeSink(tmp_path / "lake"), metrics=GatewayMetrics(), scorer=None)
    zones.wal.refresh()
    zones.wal.expect_consumers(["raw", "quarantine"])  # the first thing starting zones do
    assert ReleasedPositions(released_board(tmp_path)).read() == {}
    await zones.start()
    # A zone these zones do not land (no scorer: no curated zone) needs nothing: the owner hears so.
    assert ReleasedPositions(released_board(tmp_path)).read() == {"raw": 0, "quarantine": 0, "curated": RETIRED}
    await zones.close()
    await wal.close()
