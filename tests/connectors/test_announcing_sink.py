"""AnnouncingSink against moto: Glue never on the landing path, landed-object events at least once.

Glue or EventBridge sit behind the fault proxy, so a test can hold, refuse or fail their calls
while objects land in S3 (straight to moto).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from connectors.announcing_sink import AnnouncingSink, AnnouncingSinkSettings
from connectors.aws.eventbridge import EventBridgePublisher, EventBridgeSettings, EventOutbox, OutboxSettings, event_id
from connectors.aws.glue import GlueCatalog, GlueCatalogSettings
from connectors.aws.s3 import S3Sink
from connectors.base import LandedObject, Partition
from connectors.errors import TransientError
from connectors.retry import RetrySettings
from tests.connectors.helpers import GATEWAY_ID, drain, lake_object, settings
from tests.fixtures.fault_proxy import FaultProxy, Forward, SeenRequest

# Give up on an unreachable service quickly, so the background tasks go round often.
QUICK = RetrySettings(initial_interval_secs=0.01, max_interval_secs=0.02, max_elapsed_secs=0.2)
ANNOUNCE = AnnouncingSinkSettings(
    catalog_retry_initial_secs=0.01,
    catalog_retry_max_secs=0.05,
    outbox=OutboxSettings(retry_initial_secs=0.01, retry_max_secs=0.05),
)
# A bound on how long a test waits for something that must happen, so a bug fails instead of hanging.
PATIENCE_SECS = 60.0


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE_SECS):
        while not condition():
            await asyncio.sleep(0.01)


def is_glue(request: SeenRequest) -> bool:
    return request.headers.get("X-Amz-Target", "").startswith("AWSGlue.")


def glue_settings(endpoint_url: str) -> GlueCatalogSettings:
    return GlueCatalogSettings(
        database=f"lake_{uuid.uuid4().hex[:8]}",
        endpoint_url=endpoint_url,
        region="us-east-1",
        retry=QUICK,
        register_timeout_secs=0.2,
    )


async def glue_partitions(glue_client: Any, database: str, table: str = "raw_telemetry") -> list[list[str]]:
    response = await glue_client.get_partitions(DatabaseName=database, TableName=table)
    return sorted(p["Values"] for p in response["Partitions"])


def event_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("events-*.ndjson"))


def outbox_lines(directory: Path) -> tuple[list[dict[str, Any]], int]:
    """The entries in every outbox file of ``directory``, and how many lines are damaged."""
    entries: list[dict[str, Any]] = []
    damaged = 0
    for path in event_files(directory):
        for line in path.read_bytes().split(b"\n"):
            if not line:
                continue
            crc, _, payload = line.partition(b" ")
            if int(crc, 16) == zlib.crc32(payload):
                entries.append(json.loads(payload))
            else:
                damaged += 1
    return entries, damaged


def expected_id(landed: LandedObject) -> str:
    return event_id(landed.url, landed.etag)


# -- the catalog --------------------------------------------------------------------------------


async def test_landing_never_waits_on_glue(
    moto_endpoint: str, bucket: str, s3_client: Any, glue_client: Any, proxy: FaultProxy
) -> None:
    """Glue holds every call: objects land anyway, and their partitions register once Glue answers."""
    proxy.delay_secs = 3600.0
    proxy.delay_when = is_glue
    s3 = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    # The held call must not time out on its own while the objects land.
    glue = msgspec.structs.replace(glue_settings(proxy.url), read_timeout_secs=3600.0)
    sink = AnnouncingSink(s3, catalog=GlueCatalog(glue, lake_url=s3.root_url), settings=ANNOUNCE)
    await sink.start()
    try:
        await eventually(lambda: proxy.in_flight == 1)  # the catalog's first Glue call, held
        hours = ["13", "13", "14", "15", "14"]
        async with asyncio.timeout(PATIENCE_SECS):  # only a guard: a landing that waited on Glue would hang
            for i, hour in enumerate(hours):
                await sink.put_object(lake_object(b"x", first=i, last=i, hour=hour))
        # Every landing returned while that one Glue call was still held and no other was made:
        # no put_object waited on Glue.
        assert proxy.in_flight == 1
        assert len([r for r in proxy.seen if is_glue(r)]) == 1
        listed = await s3_client.list_objects_v2(Bucket=bucket, Prefix="lake/raw/")
        assert len(listed["Contents"]) == len(hours)
        # Deduplicated: five objects, three partitions.
        assert sink.catalog_queued == 3
        assert sink.stats.catalog_partitions_queued == 3

        proxy.delay_when = None
        await proxy.pause()  # the held call fails, the catalog retries
        await proxy.resume()
        assert await sink.flush(PATIENCE_SECS)
        assert await glue_partitions(glue_client, glue.database) == [
            ["2024-05-01", "13"],
            ["2024-05-01", "14"],
            ["2024-05-01", "15"],
        ]
        assert (sink.catalog_queued, sink.catalog_registered) == (0, 3)

        # A registered partition is not queued again.
        calls = len(proxy.seen)
        await sink.put_object(lake_object(b"y", first=9, last=9, hour="13"))
        assert sink.catalog_queued == 0
        assert sink.stats.catalog_partitions_queued == 3
        assert await sink.flush(PATIENCE_SECS)
        assert len(proxy.seen) == calls
    finally:
        await sink.close()


async def test_unreachable_glue_keeps_partitions_queued_until_it_returns(
    moto_endpoint: str, bucket: str, glue_client: Any, proxy: FaultProxy
) -> None:
    await proxy.pause()  # connection refused
    s3 = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    glue = glue_settings(proxy.url)
    sink = AnnouncingSink(s3, catalog=GlueCatalog(glue, lake_url=s3.root_url), settings=ANNOUNCE)
    await sink.start()
    try:
        await sink.put_object(lake_object(b"a", first=0, last=0, hour="13"))
        await sink.put_object(lake_object(b"b", first=1, last=1, hour="14"))
        # The registrar keeps failing, with backoff, and the partitions stay queued.
        await eventually(lambda: sink.catalog_failures >= 3)
        assert sink.catalog_queued == 2
        assert sink.catalog_registered == 0

        await proxy.resume()
        assert await sink.flush(PATIENCE_SECS)
        assert await glue_partitions(glue_client, glue.database) == [["2024-05-01", "13"], ["2024-05-01", "14"]]
        assert sink.catalog_registered == 2
    finally:
        await sink.close()


async def test_a_full_queue_leaves_a_partition_for_a_later_landing(
    moto_endpoint: str, bucket: str, glue_client: Any, proxy: FaultProxy
) -> None:
    await proxy.pause()
    s3 = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    glue = glue_settings(proxy.url)
    small = AnnouncingSinkSettings(
        catalog_queue_max_partitions=2, catalog_retry_initial_secs=0.01, catalog_retry_max_secs=0.05
    )
    sink = AnnouncingSink(s3, catalog=GlueCatalog(glue, lake_url=s3.root_url), settings=small)
    await sink.start()
    try:
        for i, hour in enumerate(["13", "14", "15"]):
            await sink.put_object(lake_object(b"a", first=i, last=i, hour=hour))
        assert (sink.catalog_queued, sink.stats.catalog_queue_full) == (2, 1)

        await proxy.resume()
        assert await sink.flush(PATIENCE_SECS)
        assert await glue_partitions(glue_client, glue.database) == [["2024-05-01", "13"], ["2024-05-01", "14"]]
        # The next landing in the partition that was left out registers it.
        await sink.put_object(lake_object(b"b", first=3, last=3, hour="15"))
        assert await sink.flush(PATIENCE_SECS)
        assert ["2024-05-01", "15"] in await glue_partitions(glue_client, glue.database)
    finally:
        await sink.close()


async def test_close_tries_the_queue_once_more_then_says_what_is_left(
    moto_endpoint: str, bucket: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    await proxy.pause()
    s3 = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    quick_close = AnnouncingSinkSettings(
        catalog_retry_initial_secs=0.01, catalog_retry_max_secs=0.05, close_timeout_secs=0.5
    )
    sink = AnnouncingSink(s3, catalog=GlueCatalog(glue_settings(proxy.url), lake_url=s3.root_url), settings=quick_close)
    await sink.start()
    await sink.put_object(lake_object(b"a", hour="13"))
    with caplog.at_level(logging.WARNING, logger="connectors.announcing_sink"):
        await sink.close()
    assert "1 partition(s) not registered at close" in caplog.text
    assert "raw/telemetry/dt=2024-05-01/hour=13" in caplog.text


class FlakyCatalog:
    """A catalog that fails its first ``failures`` registrations (a stand-in, no Glue)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[Partition] = []
        self.registered: set[Partition] = set()

    async def start(self) -> None:
        pass

    async def partition_landed(self, partition: Partition) -> bool:
        self.calls.append(partition)
        if len(self.calls) <= self.failures:
            raise TransientError("Glue is away")
        self.registered.add(partition)
        return True

    async def close(self) -> None:
        pass


async def test_a_failed_partition_is_retried_with_backoff_until_it_registers(moto_endpoint: str, bucket: str) -> None:
    catalog = FlakyCatalog(failures=4)
    delays: list[float] = []
    sink = AnnouncingSink(
        S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID),
        catalog=catalog,
        settings=AnnouncingSinkSettings(catalog_retry_initial_secs=0.01, catalog_retry_max_secs=0.04),
        rng=lambda: delays.append(1.0) or 1.0,  # the top of each jitter range
    )
    await sink.start()
    try:
        await sink.put_object(lake_object(b"a", hour="13"))
        assert await sink.flush(PATIENCE_SECS)
    finally:
        await sink.close()
    assert catalog.registered == {lake_object(b"a", hour="13").partition}
    assert len(catalog.calls) == 5
    assert (sink.catalog_failures, sink.catalog_registered) == (4, 1)
    assert len(delays) == 4  # one backoff per failure


# -- events -----------------------------------------------------------------------------------


def publisher(bus: str, endpoint_url: str) -> EventBridgePublisher:
    return EventBridgePublisher(EventBridgeSettings(event_bus_name=bus, endpoint_url=endpoint_url, retry=QUICK))


async def test_recorded_events_survive_a_crash_and_arrive_at_least_once(
    moto_endpoint: str, bucket: str, landed_queue: tuple[str, Any], proxy: FaultProxy, tmp_path: Path
) -> None:
    bus, sqs = landed_queue
    await proxy.pause()  # EventBridge away: nothing leaves the outbox
    outbox = tmp_path / "wal" / "outbox"
    first_settings = AnnouncingSinkSettings(
        close_timeout_secs=0.2,
        outbox=OutboxSettings(retry_initial_secs=0.01, retry_max_secs=0.05, limit_bytes=1),
    )
    sink = AnnouncingSink(
        S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID),
        events=publisher(bus, proxy.url),
        outbox_dir=outbox,
        settings=first_settings,
    )
    await sink.start()
    landed = [await sink.put_object(lake_object(b"x" * (i + 1), first=i, last=i)) for i in range(3)]
    # Each event was on disk when its put_object returned: this is what a crash would leave behind.
    crash_image = tmp_path / "after-crash"
    shutil.copytree(outbox, crash_image)
    entries, damaged = outbox_lines(crash_image)
    assert [e["id"] for e in entries] == [expected_id(x) for x in landed]
    assert damaged == 0
    assert sink.stats.events_recorded == 3
    assert sink.outbox is not None
    assert sink.outbox.stats.over_limit == 3  # past the limit: counted, never dropped
    await sink.close()
    assert len(outbox_lines(outbox)[0]) == 3  # still kept, for the next start
    # A crash in the middle of an append leaves a torn line at the end of the file.
    with open(event_files(crash_image)[-1], "ab") as f:
        f.write(b'0badc0de {"id":"torn')

    await proxy.resume()
    again = AnnouncingSink(
        S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID),
        events=publisher(bus, proxy.url),
        outbox_dir=crash_image,
        settings=ANNOUNCE,
    )
    await again.start()
    try:
        # The zone had not committed the last landing before the crash: it lands that object again.
        assert await again.put_object(lake_object(b"x" * 3, first=2, last=2)) == landed[2]
        assert await again.flush(PATIENCE_SECS)
    finally:
        await again.close()

    assert event_files(crash_image) == []
    assert again.outbox is not None
    assert again.outbox.stats.corrupt_entries == 1
    events = await drain(sqs, 4)
    ids = [e["detail"]["event_id"] for e in events]
    assert sorted(ids) == sorted([expected_id(x) for x in landed] + [expected_id(landed[2])])
    first = next(e for e in events if e["detail"]["event_id"] == expected_id(landed[0]))
    assert first["detail"]["key"] == f"lake/{lake_object(b'x', first=0, last=0).key}"
    assert first["detail"]["etag"] == landed[0].etag


async def test_outbox_files_go_once_sent_and_failed_entries_are_resent(
    moto_endpoint: str, bucket: str, landed_queue: tuple[str, Any], proxy: FaultProxy, tmp_path: Path
) -> None:
    bus, sqs = landed_queue
    failed_once = False

    async def fail_first_entry(request: SeenRequest, body: bytes, forward: Forward) -> web.Response | None:
        """EventBridge's partial failure: entry 0 is not delivered and reported as throttled."""
        nonlocal failed_once
        if failed_once or not request.headers.get("X-Amz-Target", "").endswith("PutEvents"):
            return None
        failed_once = True
        payload = json.loads(body)
        payload["Entries"] = payload["Entries"][1:]
        status, _, content = await forward(json.dumps(payload).encode())
        result = json.loads(content)
        result["Entries"].insert(0, {"ErrorCode": "ThrottlingException", "ErrorMessage": "Rate exceeded"})
        result["FailedEntryCount"] = 1
        return web.json_response(result, status=status, content_type="application/x-amz-json-1.1")

    await proxy.pause()
    proxy.intercept = fail_first_entry
    outbox = tmp_path / "outbox"
    rotating = AnnouncingSinkSettings(
        outbox=OutboxSettings(file_max_events=2, retry_initial_secs=0.01, retry_max_secs=0.05)
    )
    sink = AnnouncingSink(
        S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID),
        events=publisher(bus, proxy.url),
        outbox_dir=outbox,
        settings=rotating,
    )
    await sink.start()
    try:
        landed = [await sink.put_object(lake_object(b"y", first=i, last=i)) for i in range(5)]
        assert len(event_files(outbox)) == 3  # 2 + 2 + 1
        await proxy.resume()
        assert await sink.flush(PATIENCE_SECS)
        assert event_files(outbox) == []
        assert sink.outbox_pending_files == 0
        assert sink.outbox_pending_bytes == 0
    finally:
        await sink.close()

    assert failed_once
    assert sink.outbox is not None
    stats = sink.outbox.stats
    assert (stats.events_recorded, stats.events_sent, stats.events_rejected, stats.files_deleted) == (5, 5, 0, 3)
    events = await drain(sqs, 5)
    assert sorted(e["detail"]["event_id"] for e in events) == sorted(expected_id(x) for x in landed)


async def test_a_full_disk_fails_the_call_until_the_event_is_recorded(
    moto_endpoint: str,
    bucket: str,
    landed_queue: tuple[str, Any],
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus, sqs = landed_queue
    await proxy.pause()  # keep the events in the outbox until the files are checked
    outbox = tmp_path / "outbox"
    real_write = os.write
    writes_to_outbox = 0

    def full_disk_write(fd: int, data: Any) -> int:
        """The second append gets half its bytes down, then the disk is full."""
        nonlocal writes_to_outbox
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(outbox)):
            return real_write(fd, data)
        writes_to_outbox += 1
        if writes_to_outbox == 2:
            return real_write(fd, bytes(data)[: len(data) // 2])
        if writes_to_outbox == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk_write)
    s3 = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    sink = AnnouncingSink(s3, events=publisher(bus, proxy.url), outbox_dir=outbox, settings=ANNOUNCE)
    await sink.start()
    try:
        before = await sink.put_object(lake_object(b"y" * 100, first=0, last=0))
        obj = lake_object(b"z" * 100, first=1, last=1)
        with pytest.raises(TransientError, match="not recorded"):
            await sink.put_object(obj)
        assert s3.stats.objects_landed == 2  # the object is in the lake; only its event is missing
        assert sink.stats.event_record_failures == 1

        landed = await sink.put_object(obj)  # the lander's retry: records the event, no second upload
        assert s3.stats.objects_landed == 2
        assert sink.stats.uploads_skipped == 1
        entries, damaged = outbox_lines(outbox)
        assert [e["id"] for e in entries] == [expected_id(before), expected_id(landed)]
        assert damaged == 0  # the half-written line was cut away
        assert len(event_files(outbox)) == 2  # the next append went to a new file

        await proxy.resume()
        assert await sink.flush(PATIENCE_SECS)
        assert event_files(outbox) == []
    finally:
        await sink.close()
    events = await drain(sqs, 2)
    assert sorted(e["detail"]["event_id"] for e in events) == sorted([expected_id(before), expected_id(landed)])


async def test_without_an_outbox_events_are_queued_in_memory(
    moto_endpoint: str, bucket: str, landed_queue: tuple[str, Any]
) -> None:
    bus, sqs = landed_queue
    sink = AnnouncingSink(
        S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID), events=publisher(bus, moto_endpoint)
    )
    assert sink.outbox is None
    await sink.start()
    try:
        landed = await sink.put_object(lake_object(b"m"))
    finally:
        await sink.close()
    events = await drain(sqs, 1)
    assert [e["detail"]["event_id"] for e in events] == [expected_id(landed)]


async def test_one_owner_per_outbox_directory(tmp_path: Path) -> None:
    settings_ = EventBridgeSettings(endpoint_url="http://127.0.0.1:9")
    first = EventOutbox(tmp_path / "outbox", EventBridgePublisher(settings_))
    await first.start()
    try:
        with pytest.raises(RuntimeError, match="in use"):
            await EventOutbox(tmp_path / "outbox", EventBridgePublisher(settings_)).start()
    finally:
        await first.close()
    second = EventOutbox(tmp_path / "outbox", EventBridgePublisher(settings_))
    await second.start()
    await second.close()
