"""A zone lander never commits past records it has not landed, and survives its own failures."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import orjson
import pytest

from connectors.local_lake import LocalLakeSink
from gateway.lake.formats import ZstdNdjsonBuilder
from gateway.lake.landing import LanderSettings, ZoneLander, recorded_floor
from gateway.ops.metrics import GatewayMetrics
from gateway.durable.retry_ledger import RetryLedger
from gateway.durable.wal_layout import WalSlot, wal_id
from gateway.lake.pipeline import recorded_floor_of
from connectors.errors import PermanentError
from gateway.durable.wal import KIND_QUARANTINE, KIND_RECORDS, KIND_RECORDS_SHARED, WriteAheadLog, encode_frame, shared_payload
from tests.gateway.conftest import read_zone


def frame(seqs: range, hour: int = 490_000, pad: int = 0) -> bytes:
    payload = b"".join(orjson.dumps({"seq": s, "pad": "x" * pad}) + b"\n" for s in seqs)
    return encode_frame(KIND_RECORDS, hour, 0, 0, 0, len(seqs), payload)


def lander(tmp_path, wal, sink, prepare=None, *, zone="raw", kind=KIND_RECORDS, builder=ZstdNdjsonBuilder,
           observer: GatewayMetrics | None = None, **settings) -> ZoneLander:
    values = dict(
        zone=zone, kind=kind, dataset="t", gateway_id="gw", target_object_bytes=1 << 20,
        max_object_age_secs=0.05, max_open_partitions=4, retry_initial_secs=0.01,
    )
    values.update(settings)
    return ZoneLander(
        LanderSettings(**values), wal=wal, sink=sink, builder_factory=builder, state_dir=tmp_path / "state",
        observer=observer or GatewayMetrics(), prepare=prepare,
    )


async def open_wal(tmp_path, segment_bytes: int = 1 << 20) -> WriteAheadLog:
    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=segment_bytes, max_total_bytes=1 << 30)
    await wal.start()
    return wal


def landed_seqs(lake, zone: str = "raw") -> list[int]:
    return sorted(line["seq"] for line in read_zone(lake, zone))


async def wait_for(predicate, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class HangsAfterLanding(LocalLakeSink):
    """Lands its first object, then never returns: a kill after the upload, before the state says so."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.landed = asyncio.Event()

    async def put_object(self, obj):
        result = await super().put_object(obj)
        self.landed.set()
        await asyncio.Event().wait()
        return result


async def test_frames_being_prepared_hold_the_committed_position(tmp_path):
    wal = await open_wal(tmp_path)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_prepare(frames):
        entered.set()
        await release.wait()
        return frames

    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), slow_prepare)
    await zone.start()
    await wal.append([frame(range(5))])
    await asyncio.wait_for(entered.wait(), 5)
    await zone._persist_state()  # what an upload finishing meanwhile would do
    assert zone.position == 0, "the position moved past records that are not in any object yet"
    release.set()
    assert await zone.drain(5)
    await wal.close()
    assert sorted(line["seq"] for line in read_zone(tmp_path / "lake", "raw")) == list(range(5))


async def test_a_failing_prepare_step_is_retried_and_skips_nothing(tmp_path):
    wal = await open_wal(tmp_path)
    calls = []

    async def flaky_prepare(frames):
        calls.append(len(frames))
        if len(calls) == 1:
            raise RuntimeError("scoring bug")
        return frames

    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), flaky_prepare)
    await zone.start()
    await wal.append([frame(range(3)), frame(range(3, 6))])
    await asyncio.sleep(0.2)
    assert await zone.drain(5)
    await wal.close()
    assert len(calls) >= 2
    assert sorted(line["seq"] for line in read_zone(tmp_path / "lake", "raw")) == list(range(6))


async def test_a_frame_damaged_on_disk_is_counted_and_the_frames_after_it_land(tmp_path):
    wal = await open_wal(tmp_path)
    await wal.append([frame(range(3))])
    await wal.append([frame(range(3, 6))])
    await wal.append([frame(range(6, 9))])
    await wal.close()
    segment = next((tmp_path / "wal").glob("*.wal"))
    data = bytearray(segment.read_bytes())
    second = data.index(b'{"seq":3')
    data[second + 3] ^= 0x20  # inside the second request's frame
    segment.write_bytes(bytes(data))
    wal = await open_wal(tmp_path)
    metrics = GatewayMetrics()
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), observer=metrics)
    await zone.start()
    assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == [0, 1, 2, 6, 7, 8]
    assert metrics.wal_records_lost.labels("raw")._value.get() == 3


async def test_records_taken_after_the_newest_segment_was_lost_land(tmp_path):
    """The newest segment removed while the gateway was down, after the zone had landed it: the log
    must not give its LSNs again, or the zone, whose position is past them, skips the new records."""
    wal = await open_wal(tmp_path, segment_bytes=100)
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), max_object_age_secs=3600)
    await zone.start()
    await wal.append([frame(range(0, 3))])
    await wal.append([frame(range(3, 6))])  # a segment of its own
    assert await zone.drain(5)
    await zone.close()
    await wal.close()
    sorted((tmp_path / "wal").glob("*.wal"))[-1].unlink()
    state_dir = tmp_path / "state"
    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=100, max_total_bytes=1 << 30, floor=lambda: recorded_floor(state_dir))
    await wal.start()
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    await zone.start()
    await wal.append([frame(range(6, 9))])
    assert await zone.drain(5)
    await zone.close()
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(9))


async def test_a_log_missing_its_newest_records_numbers_past_the_retry_ledgers_mark_too(tmp_path):
    """The retry ledger records each request as it becomes durable, ahead of the zones: a log that
    reused LSNs below its mark would have a catch-up after a crash start past the new records."""
    slot = WalSlot(tmp_path / "slot", "gw", "")
    wal = WriteAheadLog(slot.directory / "segments", segment_bytes=100, max_total_bytes=1 << 30)
    await wal.start()
    await wal.append([frame(range(0, 3))])
    await wal.append([frame(range(3, 6))])  # a segment of its own
    await wal.close()
    ledger = RetryLedger(tmp_path / "ledger", window_secs=600, max_keys=1000)
    ledger.open()
    ledger.record(wal_id(slot.directory), 6, [], [])  # recorded through LSN 6; no zone has landed anything
    sorted((slot.directory / "segments").glob("*.wal"))[-1].unlink()
    wal = WriteAheadLog(slot.directory / "segments", segment_bytes=100, max_total_bytes=1 << 30,
                        floor=lambda: recorded_floor_of(slot, ledger))
    await wal.start()
    assert wal.next_lsn == 6
    await wal.close()
    ledger.close()


async def test_a_damaged_state_file_is_said_and_the_zone_lands_again_from_the_wal(tmp_path, caplog):
    wal = await open_wal(tmp_path)
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    await zone.start()
    await wal.append([frame(range(3))])
    assert await zone.drain(5)
    await zone.close()
    await wal.append([frame(range(3, 6))])  # not landed yet
    state = tmp_path / "state" / "raw.state"
    data = bytearray(state.read_bytes())
    for slot in (0, len(data) // 2):
        if data[slot : slot + 4] == b"EGST":
            data[slot + 20] ^= 0xFF  # its payload: the checksum fails
    state.write_bytes(bytes(data))
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    with caplog.at_level(logging.ERROR):
        await zone.start()
        assert await zone.drain(5)
    await zone.close()
    await wal.close()
    assert "state file is damaged" in caplog.text
    assert sorted(set(landed_seqs(tmp_path / "lake"))) == list(range(6))  # 0-2 may land twice: never lost


async def test_an_untranslated_sink_error_is_retried(tmp_path):
    wal = await open_wal(tmp_path)

    class Flaky(LocalLakeSink):
        failures = 2

        async def put_object(self, obj):
            if self.failures:
                self.failures -= 1
                raise OSError("disk hiccup the sink forgot to translate")
            return await super().put_object(obj)

    sink = Flaky(tmp_path / "lake")
    zone = lander(tmp_path, wal, sink)
    await zone.start()
    await wal.append([frame(range(4))])
    assert await zone.drain(5)
    await wal.close()
    assert sink.failures == 0
    assert sorted(line["seq"] for line in read_zone(tmp_path / "lake", "raw")) == list(range(4))


async def test_a_zone_with_nothing_of_its_kind_never_pins_the_wal(tmp_path):
    wal = await open_wal(tmp_path, segment_bytes=16 * 1024)
    sink = LocalLakeSink(tmp_path / "lake")
    raw = lander(tmp_path, wal, sink)
    quarantine = lander(tmp_path, wal, sink, zone="quarantine", kind=KIND_QUARANTINE)
    await raw.start()
    await quarantine.start()
    for i in range(40):  # valid records only: ~40 segments' worth, quarantine never sees a frame
        await wal.append([frame(range(i * 20, i * 20 + 20), pad=800)])
    for _ in range(200):
        if len(list((tmp_path / "wal").glob("*.wal"))) <= 2:
            break
        await asyncio.sleep(0.02)
    assert len(list((tmp_path / "wal").glob("*.wal"))) <= 2, "the idle quarantine zone holds segments"
    assert quarantine.position > 0
    assert await raw.drain(5) and await quarantine.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(800))


async def test_objects_of_two_hours_due_together_both_hold_the_position(tmp_path):
    wal = await open_wal(tmp_path)
    gate = asyncio.Event()

    class Held(LocalLakeSink):
        async def put_object(self, obj):
            await gate.wait()
            return await super().put_object(obj)

    zone = lander(tmp_path, wal, Held(tmp_path / "lake"), target_object_bytes=150, max_object_age_secs=60)
    persisted = []
    await zone.start()
    write = zone._state_file.write
    zone._state_file.write = lambda payload: (persisted.append(orjson.loads(payload)["position"]), write(payload))
    # Hour A opens first but fills last: in one read, B's object is due before A's older one.
    await wal.append([frame(range(0, 5), hour=490_000), frame(range(5, 15), hour=490_001), frame(range(15, 20), hour=490_000)])
    for _ in range(100):
        if len(zone._state.sealed) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(zone._state.sealed) == 2 and persisted
    assert set(persisted) == {0}, f"a persisted position passed the unlanded object at LSN 0: {persisted}"
    gate.set()
    assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(20))


async def test_an_object_that_cannot_be_built_is_dead_lettered_and_nothing_is_skipped(tmp_path):
    wal = await open_wal(tmp_path)
    built = []

    class Breaks(ZstdNdjsonBuilder):
        def finish(self) -> bytes:
            built.append(1)
            if len(built) == 1:
                raise ValueError("encoder bug")
            return super().finish()

    metrics = GatewayMetrics()
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), builder=Breaks, target_object_bytes=64, max_uploads_in_flight=1, observer=metrics)
    await zone.start()
    for i in range(6):  # the same hour: later objects must not move the watermark past the broken one
        await wal.append([frame(range(i * 5, i * 5 + 5))])
    assert await zone.drain(5)
    await wal.close()
    dead = [line["seq"] for line in read_zone(tmp_path / "lake" / "deadletter", "raw")]
    assert dead == list(range(5))
    assert landed_seqs(tmp_path / "lake") == list(range(5, 30))
    assert metrics.dead_lettered_records.labels("raw", "build failed")._value.get() == 5
    # After a restart nothing is replayed or skipped: the dead-lettered object counts as landed.
    wal = await open_wal(tmp_path)
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    await zone.start()
    assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(5, 30))


async def test_an_object_the_sink_refuses_for_good_is_dead_lettered_after_bounded_attempts(tmp_path):
    wal = await open_wal(tmp_path)

    class Refuses(LocalLakeSink):
        attempts = 0

        async def put_object(self, obj):
            if not obj.key.startswith("deadletter/"):
                self.attempts += 1
                raise PermanentError("AccessDenied", endpoint="test")
            return await super().put_object(obj)

    sink = Refuses(tmp_path / "lake")
    zone = lander(tmp_path, wal, sink, max_object_attempts=3)
    await zone.start()
    await wal.append([frame(range(4))])
    assert await zone.drain(5)
    await wal.close()
    assert sink.attempts == 3
    assert [line["seq"] for line in read_zone(tmp_path / "lake" / "deadletter", "raw")] == list(range(4))


async def test_a_sink_that_refuses_everything_for_a_while_gets_every_record_in_its_zone(tmp_path):
    """Access denied to every object (a bucket policy mended minutes later) is the sink's fault, not
    the objects': nothing is dead-lettered, everything lands in the zone once the sink takes it."""
    wal = await open_wal(tmp_path)

    class DeniesForAWhile(LocalLakeSink):
        refusals = 0

        async def put_object(self, obj):
            if self.refusals < 12:
                self.refusals += 1
                raise PermanentError("AccessDenied", endpoint="test")
            return await super().put_object(obj)

    sink = DeniesForAWhile(tmp_path / "lake")
    metrics = GatewayMetrics()
    zone = lander(tmp_path, wal, sink, max_object_attempts=3, retry_max_secs=0.02, observer=metrics)
    await zone.start()
    await wal.append([frame(range(4))])
    assert await zone.drain(10)
    await wal.close()
    assert sink.refusals == 12, "the sink never got to refuse dead-letter objects too"
    assert landed_seqs(tmp_path / "lake") == list(range(4))
    assert not (tmp_path / "lake" / "deadletter").exists()
    assert metrics.dead_lettered_records.labels("raw", "refused by the sink")._value.get() == 0


async def test_an_object_filled_by_a_later_read_holds_the_position_while_it_is_sealed(tmp_path):
    # Frames are added off the event loop: an object opened by an earlier read that fills up in this
    # one leaves the open set before it is sealed, and an upload finishing meanwhile persists state.
    wal = await open_wal(tmp_path)
    later_hour = 490_001
    entered, release = threading.Event(), threading.Event()

    class PausesOnTheLaterHour(ZstdNdjsonBuilder):
        def add(self, frame):
            if frame.hour == later_hour:
                entered.set()
                release.wait(10)
            super().add(frame)

    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), builder=PausesOnTheLaterHour, target_object_bytes=150, max_object_age_secs=60)
    await zone.start()
    await wal.append([frame(range(0, 5))])
    for _ in range(200):
        if zone._open and zone._reading_from is None:
            break
        await asyncio.sleep(0.01)
    assert zone._open, "the first read should leave an open object"
    await wal.append([frame(range(5, 15)), frame(range(15, 20), hour=later_hour)])
    assert await asyncio.to_thread(entered.wait, 10)
    await zone._persist_state()  # what an upload finishing meanwhile would do
    release.set()
    assert zone.position == 0, f"the persisted position {zone.position} passed the unlanded records at LSN 0"
    assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(20))


async def test_a_prepare_step_that_fails_on_everything_for_a_while_dead_letters_nothing(tmp_path):
    """A scorer that stopped fails every frame, alone or not: the step is broken, not the frames, so
    they wait in the WAL and land in the zone once it works again."""
    wal = await open_wal(tmp_path)
    calls = []

    async def broken_for_a_while(frames):
        calls.append(len(frames))
        if len(calls) <= 12:
            raise RuntimeError("the batcher's scheduler stopped")
        return frames

    metrics = GatewayMetrics()
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), broken_for_a_while, max_object_attempts=3, retry_max_secs=0.02, observer=metrics)
    await zone.start()
    await wal.append([frame(range(0, 5)), frame(range(5, 10))])
    assert await zone.drain(10)
    await wal.close()
    assert len(calls) > 12 and 1 in calls, "the frames were never tried one by one"
    assert landed_seqs(tmp_path / "lake") == list(range(10))
    assert not (tmp_path / "lake" / "deadletter").exists()


async def test_a_frame_the_prepare_step_always_fails_on_is_dead_lettered_alone(tmp_path):
    # One poison frame between good ones of the same hour and of another: retried, then set aside alone.
    wal = await open_wal(tmp_path)
    attempts = []

    async def fails_on_seq_7(frames):
        attempts.append(len(frames))
        if any(b'"seq":7,' in f.payload for f in frames):
            raise ValueError("scoring bug on this record")
        return frames

    metrics = GatewayMetrics()
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), fails_on_seq_7, max_object_attempts=3, retry_max_secs=0.02, observer=metrics)
    await zone.start()
    await wal.append([frame(range(0, 5)), frame(range(5, 10)), frame(range(10, 15), hour=490_001), frame(range(15, 20))])
    assert await zone.drain(5)
    await wal.close()
    assert [line["seq"] for line in read_zone(tmp_path / "lake" / "deadletter", "raw")] == list(range(5, 10))
    assert landed_seqs(tmp_path / "lake") == [*range(0, 5), *range(10, 20)]
    assert metrics.dead_lettered_records.labels("raw", "prepare failed")._value.get() == 5
    # After a restart nothing is replayed or skipped.
    wal = await open_wal(tmp_path)
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    await zone.start()
    assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == [*range(0, 5), *range(10, 20)]


async def test_frames_committed_within_the_read_interval_are_read_together(tmp_path):
    wal = await open_wal(tmp_path)
    reads: list[int] = []

    async def counting_prepare(frames):
        reads.append(len(frames))
        return frames

    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), counting_prepare, read_interval_secs=0.5)
    await zone.start()
    await wal.append([frame(range(0, 5))])  # the first read is not delayed
    for _ in range(100):
        if reads:
            break
        await asyncio.sleep(0.01)
    for i in range(1, 11):  # ten small commits, 20 ms apart: well within one interval
        await wal.append([frame(range(i * 5, i * 5 + 5))])
        await asyncio.sleep(0.02)
    assert await zone.drain(5)
    await wal.close()
    assert reads[0] == 1 and len(reads) <= 3, f"one read per commit instead of gathered reads: {reads}"
    assert landed_seqs(tmp_path / "lake") == list(range(55))


async def test_a_frame_of_a_kind_this_version_does_not_know_stops_the_zone_without_losing_a_record(tmp_path):
    """A WAL written by a later version (a downgrade that did not drain): land what comes before the
    unknown frame, then stop there; passing it would let the zone release records it never landed."""
    wal = await open_wal(tmp_path)
    await wal.append([frame(range(3)), encode_frame(9, 490_000, 0, 0, 0, 2, b"new format\n"), frame(range(5, 8))])
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    await zone.start()
    assert not await zone.drain(1)  # it cannot land everything
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == [0, 1, 2]
    assert zone.position == 3, "the zone's position passed a frame it could not read"


async def test_an_object_replayed_after_a_rename_keeps_the_key_it_was_sealed_with(tmp_path):
    """Landed, then killed before its state said so; restarted with another gateway id and dataset:
    the replay must rewrite the same key, not add a second copy under the new names."""
    wal = await open_wal(tmp_path)
    sink = HangsAfterLanding(tmp_path / "lake")
    first = lander(tmp_path, wal, sink, gateway_id="gw-a", dataset="old")
    await first.start()
    await wal.append([frame(range(6))])
    await asyncio.wait_for(sink.landed.wait(), 5)
    await first.close()
    renamed = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), gateway_id="gw-b", dataset="new")
    await renamed.start()
    await wal.append([frame(range(6, 9))])
    assert await renamed.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(9))
    keys = sorted(str(p.relative_to(tmp_path / "lake")) for p in (tmp_path / "lake").rglob("*.zst"))
    assert len(keys) == 2 and "old" in keys[0] + keys[1] and "new" in keys[0] + keys[1], keys


@pytest.mark.parametrize("lost", ["its last frame", "its first frame", "its last frame, and no later frame of its hour comes"])
async def test_an_object_replayed_without_frames_lost_to_damage_replaces_the_one_that_landed(tmp_path, lost):
    """Landed, then killed before its state said so; at the restart a damaged block of the WAL took
    one of its frames (the mend drops that frame's request). The replay must still end the object
    where it was written down and land it under the same key, replacing the copy that landed, not
    cut it elsewhere under another key beside it (its other records would land twice), nor wait for
    a frame of its hour that may never come, holding the zone's position (and the WAL) back."""
    wal = await open_wal(tmp_path)
    sink = HangsAfterLanding(tmp_path / "lake")
    first = lander(tmp_path, wal, sink)
    await wal.append([frame(range(6)), frame(range(6, 10))])  # LSNs 0-5 and 6-9: one object
    await first.start()
    await asyncio.wait_for(sink.landed.wait(), 5)
    await first.close()
    assert landed_seqs(tmp_path / "lake") == list(range(10))
    replay = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    gone = 0 if lost == "its first frame" else 6  # stands for the frame the mend at start dropped
    wanted = replay._wanted
    replay._wanted = lambda f: f.lsn != gone and wanted(f)
    await replay.start()
    survivors = [s for s in range(10) if not (gone <= s < gone + (4 if gone else 6))]
    if lost.endswith("comes"):
        await wal.append([frame(range(10, 13), hour=490_001)])  # the next hour's: the position must pass the object
        assert await wait_for(lambda: replay.position > 10 and landed_seqs(tmp_path / "lake") == [*survivors, 10, 11, 12], 5)
    else:
        await wal.append([frame(range(10, 13))])  # a later frame of the same hour
    assert await replay.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == [*survivors, 10, 11, 12]


async def test_the_raw_zone_lands_shared_frames_as_whole_lines_and_sizes_objects_by_them(tmp_path):
    wal = await open_wal(tmp_path)
    shared = b'{"ingest_id":"i1","gateway_id":"gw","pad":"' + b"p" * 200 + b'"'
    shared_frames = [
        encode_frame(KIND_RECORDS_SHARED, 490_000, 0, 0, 0, 100, shared_payload(shared, [b',"seq":%d}' % s for s in range(first, first + 100)]))
        for first in range(10, 1010, 100)
    ]
    # 1,000 records of ~230 bytes: 230 KB as lines, stored in 12 KB; objects roll at 64 KB of lines.
    await wal.append([frame(range(10)), *shared_frames])
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), shared_frames=True, target_object_bytes=64 * 1024)
    await zone.start()
    assert await zone.drain(5)
    await wal.close()
    lines = read_zone(tmp_path / "lake", "raw")
    assert sorted(line["seq"] for line in lines) == list(range(1010))
    assert all(line["pad"] == "p" * 200 for line in lines if line["seq"] >= 10)
    assert len(list((tmp_path / "lake").rglob("*.ndjson.zst"))) >= 3, "sized by the lines, not the stored bytes"


async def test_two_writers_numbering_records_alike_never_overwrite_each_others_objects(tmp_path):
    """Two gateways given one gateway_id (or a disk cloned with its WAL) number their records alike:
    an object of the same hour and LSN range from each must land beside the other, not replace it."""
    lake = tmp_path / "lake"
    for writer, seqs in (("a", range(0, 5)), ("b", range(100, 105))):
        wal = await open_wal(tmp_path / writer)  # both logs number their records from 0
        zone = lander(tmp_path / writer, wal, LocalLakeSink(lake))
        await zone.start()
        await wal.append([frame(seqs)])
        assert await zone.drain(5)
        await zone.close()
        await wal.close()
    assert landed_seqs(lake) == [*range(0, 5), *range(100, 105)]
    names = sorted(p.name for p in lake.rglob("*.zst"))
    assert len(names) == 2 and names[0].rsplit("-", 1)[0] == names[1].rsplit("-", 1)[0], "same gateway id and LSN range"


async def test_an_object_sealed_untagged_by_an_earlier_version_is_replayed_under_its_untagged_key(tmp_path, monkeypatch):
    """Sealed and landed by a version whose keys had no tag, then killed before its state said so:
    the replay must rewrite that key, not add a tagged copy beside it."""
    from gateway.lake import landing

    wal = await open_wal(tmp_path)
    monkeypatch.setattr(landing, "_draw_tag", lambda: "")  # the earlier version drew no tag
    sink = HangsAfterLanding(tmp_path / "lake")
    earlier = lander(tmp_path, wal, sink)
    await earlier.start()
    await wal.append([frame(range(6))])
    await asyncio.wait_for(sink.landed.wait(), 5)
    await earlier.close()
    monkeypatch.undo()
    upgraded = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"))
    await upgraded.start()
    await wal.append([frame(range(6, 9))])
    assert await upgraded.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(9))
    names = sorted(p.name.split(".")[0] for p in (tmp_path / "lake").rglob("*.zst"))
    assert len(names) == 2 and sum(name.count("-") for name in names) == 2 + 3, names  # one untagged, one tagged


async def test_a_read_spanning_more_hours_than_open_partitions_fills_one_object_per_hour(tmp_path, caplog):
    # A backfill of hourly readings: each request holds one record for each of 12 hours, and the
    # zone may keep 4 objects open. Taken frame by frame, nearly every frame rolled another hour's
    # object early (one object per record).
    wal = await open_wal(tmp_path)
    metrics = GatewayMetrics()
    zone = lander(tmp_path, wal, LocalLakeSink(tmp_path / "lake"), observer=metrics, max_open_partitions=4, max_object_age_secs=60)
    hours = range(490_000, 490_012)
    requests = [[frame(range(r * 12 + i, r * 12 + i + 1), hour=h) for i, h in enumerate(hours)] for r in range(6)]
    await wal.append([f for request in requests for f in request])  # one commit: one read
    with caplog.at_level(logging.WARNING):
        await zone.start()
        assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(72))
    objects = [p for p in (tmp_path / "lake" / "raw").rglob("*") if p.is_file()]
    assert len(objects) == len(hours), f"{len(objects)} objects for 72 records in {len(hours)} hours"
    # Hours 5 to 12 each rolled an open object early, and the operator is told (the drain rolled the rest).
    assert metrics.objects_rolled_early.labels("raw")._value.get() == 8
    assert "objects are rolled early" in caplog.text


async def test_objects_landing_together_share_their_state_writes(tmp_path):
    # Four objects of four hours finish uploading together; each then asks for the zone's state to
    # be written. One write begun after an ask holds its change, so those asks share writes.
    wal = await open_wal(tmp_path)
    uploading: list[asyncio.Event] = []

    class Together(LocalLakeSink):
        async def put_object(self, obj):
            landed = await super().put_object(obj)
            uploading.append(gate := asyncio.Event())
            if len(uploading) == 4:
                for waiting in uploading:
                    waiting.set()
            await gate.wait()
            return landed

    zone = lander(tmp_path, wal, Together(tmp_path / "lake"), max_open_partitions=8, max_object_age_secs=60)
    await wal.append([frame(range(i, i + 1), hour=490_000 + i) for i in range(4)])
    await zone.start()
    writes: list[dict] = []
    write = zone._state_file.write
    zone._state_file.write = lambda payload: (writes.append(orjson.loads(payload)), write(payload))
    assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == [0, 1, 2, 3]
    assert writes[-1]["sealed"] == [] and len(writes[-1]["landed"]) in (0, 4)
    # The drain's seal, the four landings (two writes instead of four), the drain's last.
    assert len(writes) <= 4, f"{len(writes)} state writes: {[(len(w['sealed']), len(w['landed'])) for w in writes]}"


def test_the_floor_takes_in_an_hour_landed_past_the_position(tmp_path):
    """Hours land apart: one can have landed records past the position, which an older hour's open
    object holds back. A log renumbered from the position would give that hour's landed LSNs again,
    and the zone would take the new records for ones it landed."""
    import msgspec

    from connectors.durable_files import ReservedStateFile
    from gateway.lake.landing import LanderState, state_path

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_file = ReservedStateFile(state_path(state_dir, "raw"))
    state_file.open()
    state_file.write(msgspec.json.encode(LanderState(position=3, landed={"7": 20, "8": 11}, sealed=[(9, 4, 6)])))
    state_file.close()
    assert recorded_floor(state_dir) == 21


async def test_open_objects_holding_more_than_max_open_bytes_roll_the_largest_first(tmp_path):
    # A backfill keeps many hours open; the memory they hold together is bounded: past
    # max_open_bytes the largest open objects are rolled early, the small ones stay open.
    wal = await open_wal(tmp_path)
    metrics = GatewayMetrics()
    sink = LocalLakeSink(tmp_path / "lake")
    zone = lander(tmp_path, wal, sink, observer=metrics, max_open_partitions=100, max_object_age_secs=60, max_open_bytes=4096)
    def noisy(seqs: range) -> bytes:  # lines that compress little: the object holds nearly their size
        payload = b"".join(orjson.dumps({"seq": s, "pad": os.urandom(100).hex()}) + b"\n" for s in seqs)
        return encode_frame(KIND_RECORDS, 490_000, 0, 0, 0, len(seqs), payload)

    big = [noisy(range(1000 + i * 50, 1000 + (i + 1) * 50)) for i in range(4)]  # about 45 KiB
    small = [frame(range(i, i + 1), hour=490_001 + i) for i in range(10)]
    await wal.append(big + small)
    await zone.start()
    for _ in range(200):
        if list((tmp_path / "lake").rglob("*.zst")):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # anything else rolled with it has landed too
    landed_early = sorted(line["seq"] for line in read_zone(tmp_path / "lake", "raw"))
    assert landed_early == list(range(1000, 1200)), "only the largest object was rolled; the small hours stay open"
    assert metrics.objects_rolled_early.labels("raw")._value.get() == 1
    assert await zone.drain(5)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(10)) + list(range(1000, 1200))
