"""Small builders shared by the connector tests."""

from __future__ import annotations

import json
import os
from typing import Any

from connectors.aws.s3 import MiB, S3SinkSettings
from connectors.base import LakeObject, Partition
from connectors.retry import RetrySettings

GATEWAY_ID = "gw-test"
# moto, like S3, refuses parts under 5 MiB; these keep multipart tests small but real.
PART_BYTES = 5 * MiB
FAST_RETRY = RetrySettings(initial_interval_secs=0.01, max_interval_secs=0.05, max_elapsed_secs=5.0)


def partition(zone: str = "raw", dt: str = "2024-05-01", hour: str = "13") -> Partition:
    return Partition(zone=zone, dataset="telemetry", dt=dt, hour=hour)


def lake_object(
    body: bytes,
    *,
    zone: str = "raw",
    first: int = 0,
    last: int = 9,
    gateway_id: str = GATEWAY_ID,
    ext: str = "ndjson.zst",
    content_type: str = "application/zstd",
    records: int = 10,
    hour: str = "13",
) -> LakeObject:
    part = partition(zone, hour=hour)
    return LakeObject(
        partition=part,
        key=f"{part.prefix}/{gateway_id}-{first}-{last}.{ext}",
        body=body,
        content_type=content_type,
        records=records,
        first_lsn=first,
        last_lsn=last,
        min_event_ms=1714568400000,
        max_event_ms=1714571999000,
        metadata={"schema": "v1"},
    )


def settings(endpoint_url: str, bucket: str, **overrides: Any) -> S3SinkSettings:
    values: dict[str, Any] = {
        "bucket": bucket,
        "prefix": "lake/",
        "endpoint_url": endpoint_url,
        "region": "us-east-1",
        "multipart_threshold_bytes": 8 * MiB,
        "part_size_bytes": PART_BYTES,
        "max_parts_in_flight": 2,
        "connect_timeout_secs": 2.0,
        "read_timeout_secs": 10.0,
        "start_timeout_secs": 2.0,
        "retry": FAST_RETRY,
    }
    values.update(overrides)
    return S3SinkSettings(**values)


def random_body(size: int) -> bytes:
    return os.urandom(size)


async def read_back(client: Any, bucket: str, key: str) -> bytes:
    response = await client.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as stream:
        return bytes(await stream.read())


async def open_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list((await client.list_multipart_uploads(Bucket=bucket)).get("Uploads", []))


async def drain(sqs: Any, expected: int) -> list[dict[str, Any]]:
    """Up to ``expected`` events from the ``landed_queue`` fixture's queue (each message once)."""
    events: list[dict[str, Any]] = []
    for _ in range(20):
        response = await sqs.receive_message(QueueUrl=sqs.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        events += [json.loads(m["Body"]) for m in response.get("Messages", [])]
        if len(events) >= expected:
            break
    return events
