"""EventBridgePublisher against moto: events reach an SQS target through a rule, failed entries are resent."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from connectors.aws.eventbridge import EventBridgePublisher, EventBridgeSettings, event_id
from connectors.base import LandedObject
from connectors.retry import RetrySettings
from tests.connectors.helpers import FAST_RETRY, drain, lake_object
from tests.fixtures.fault_proxy import FaultProxy, Forward, SeenRequest
from tests.fixtures.moto_server import free_port


def landed_pair(i: int) -> tuple[Any, LandedObject]:
    obj = lake_object(b"x" * (100 + i), first=i * 10, last=i * 10 + 9)
    key = f"lake/{obj.key}"
    url = f"s3://lake-bucket/{key}"
    landed = LandedObject(url=url, key=obj.key, bytes=len(obj.body), records=10, zone="raw", etag=f"etag{i}")
    return obj, landed


async def test_one_event_per_landed_object_in_batches_of_ten(moto_endpoint: str, landed_queue: tuple[str, Any]) -> None:
    bus, sqs = landed_queue
    settings = EventBridgeSettings(event_bus_name=bus, endpoint_url=moto_endpoint, retry=FAST_RETRY)
    publisher = EventBridgePublisher(settings)
    await publisher.start()
    try:
        for i in range(12):
            publisher.object_landed(*landed_pair(i))
        assert await publisher.flush(10)
    finally:
        await publisher.close()

    assert publisher.stats.events_sent == 12
    assert publisher.stats.calls == 2  # 10 + 2
    events = await drain(sqs, 12)
    assert len(events) == 12
    first = next(e for e in events if e["detail"]["first_lsn"] == 0)
    assert first["source"] == "edge-gateway"
    assert first["detail-type"] == "Lake Object Landed"
    obj, landed = landed_pair(0)
    assert first["detail"] == {
        "event_id": event_id(landed.url, "etag0"),  # stable: the same for every landing of this object
        "bucket": "lake-bucket",
        "key": f"lake/{obj.key}",
        "url": landed.url,
        "zone": "raw",
        "dataset": "telemetry",
        "dt": "2024-05-01",
        "hour": "13",
        "records": 10,
        "bytes": 100,
        "etag": "etag0",
        "min_event_time": "2024-05-01T13:00:00.000Z",
        "max_event_time": "2024-05-01T13:59:59.000Z",
        "min_event_ms": 1714568400000,
        "max_event_ms": 1714571999000,
        "first_lsn": 0,
        "last_lsn": 9,
    }


async def test_failed_entries_are_resent(moto_endpoint: str, landed_queue: tuple[str, Any], proxy: FaultProxy) -> None:
    """The proxy fails the first entry of the first PutEvents call the way EventBridge does."""
    bus, sqs = landed_queue
    failed_once = False

    async def fail_first_entry(request: SeenRequest, body: bytes, forward: Forward) -> web.Response | None:
        nonlocal failed_once
        if failed_once or not request.headers.get("X-Amz-Target", "").endswith("PutEvents"):
            return None
        failed_once = True
        payload = json.loads(body)
        payload["Entries"] = payload["Entries"][1:]  # entry 0 is not delivered
        status, headers, content = await forward(json.dumps(payload).encode())
        result = json.loads(content)
        result["Entries"].insert(0, {"ErrorCode": "ThrottlingException", "ErrorMessage": "Rate exceeded"})
        result["FailedEntryCount"] = 1
        return web.json_response(result, status=status, content_type="application/x-amz-json-1.1")

    proxy.intercept = fail_first_entry
    publisher = EventBridgePublisher(EventBridgeSettings(event_bus_name=bus, endpoint_url=proxy.url, retry=FAST_RETRY))
    await publisher.start()
    try:
        for i in range(3):
            publisher.object_landed(*landed_pair(i))
        assert await publisher.flush(10)
    finally:
        await publisher.close()

    assert failed_once
    assert (publisher.stats.events_sent, publisher.stats.events_failed) == (3, 0)
    assert publisher.stats.calls == 2  # the second call carried only the failed entry
    events = await drain(sqs, 3)
    assert sorted(e["detail"]["first_lsn"] for e in events) == [0, 10, 20]


async def test_unreachable_eventbridge_never_blocks_landing(moto_endpoint: str) -> None:
    settings = EventBridgeSettings(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        max_pending_events=10,
        retry=RetrySettings(initial_interval_secs=0.01, max_interval_secs=0.02, max_elapsed_secs=0.2),
    )
    publisher = EventBridgePublisher(settings)
    await publisher.start()
    try:
        for i in range(25):
            publisher.object_landed(*landed_pair(i))  # returns at once, whatever EventBridge does
        assert await publisher.flush(10)
    finally:
        await publisher.close()
    stats = publisher.stats
    assert stats.events_sent == 0
    assert stats.events_failed + stats.events_dropped == 25
    assert stats.events_dropped > 0
