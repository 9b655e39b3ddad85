"""A zone lander never commits past records it has not landed, and survives its own failures."""

from __future__ import annotations

import asyncio

import orjson

from connectors.local_lake import LocalLakeSink
from gateway.formats import ZstdNdjsonBuilder
from gateway.landing import LanderSettings, ZoneLander
from gateway.metrics import GatewayMetrics
from gateway.wal import KIND_RECORDS, WriteAheadLog, encode_frame
from tests.gateway.conftest import read_zone


def frame(seqs: range) -> bytes:
    payload = b"".join(orjson.dumps({"seq": s}) + b"\n" for s in seqs)
    return encode_frame(KIND_RECORDS, 490_000, 0, 0, 0, len(seqs), payload)


def lander(tmp_path, wal, sink, prepare=None) -> ZoneLander:
    settings = LanderSettings(
        zone="raw", kind=KIND_RECORDS, dataset="t", gateway_id="gw", target_object_bytes=1 << 20,
        max_object_age_secs=0.05, max_open_partitions=4, retry_initial_secs=0.01,
    )
    return ZoneLander(
        settings, wal=wal, sink=sink, builder_factory=ZstdNdjsonBuilder, state_dir=tmp_path / "state",
        observer=GatewayMetrics(), prepare=prepare,
    )


async def open_wal(tmp_path) -> WriteAheadLog:
    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=1 << 20, max_total_bytes=1 << 30)
    await wal.start()
    return wal


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
