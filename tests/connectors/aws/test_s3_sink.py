"""S3Sink against a real moto server: bytes, checksums, object settings, multipart hygiene."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
import pytest

from connectors.aws.s3 import MiB, S3Sink, S3SinkSettings, checksum
from connectors.base import ObjectSink
from connectors.errors import PermanentError
from tests.connectors.helpers import (
    GATEWAY_ID,
    PART_BYTES,
    lake_object,
    open_uploads,
    random_body,
    read_back,
    settings,
)
from tests.fixtures.fault_proxy import FaultProxy, SeenRequest, s3_error


async def started(sink: S3Sink) -> S3Sink:
    await sink.start()
    return sink


async def test_is_an_object_sink(moto_endpoint: str, bucket: str) -> None:
    sink = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    assert isinstance(sink, ObjectSink)
    assert sink.root_url == f"s3://{bucket}/lake/"


async def test_small_object_lands_byte_exact_with_checksum(moto_endpoint: str, bucket: str, s3_client: Any) -> None:
    sink = await started(S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID))
    obj = lake_object(random_body(64 * 1024))
    try:
        landed = await sink.put_object(obj)
    finally:
        await sink.close()

    key = f"lake/{obj.key}"
    assert landed.url == f"s3://{bucket}/{key}"
    assert (landed.key, landed.bytes, landed.records, landed.zone) == (obj.key, len(obj.body), 10, "raw")
    assert await read_back(s3_client, bucket, key) == obj.body
    head = await s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == checksum("CRC32", obj.body)
    assert head["ETag"].strip('"') == landed.etag
    assert head["ContentType"] == obj.content_type
    assert head["Metadata"]["schema"] == "v1"
    assert head["Metadata"]["gateway-id"] == GATEWAY_ID
    assert (head["Metadata"]["first-lsn"], head["Metadata"]["last-lsn"]) == ("0", "9")
    assert sink.stats.objects_landed == 1 and sink.stats.multipart_uploads == 0


async def test_multipart_object_lands_byte_exact(bucket: str, s3_client: Any, proxy: FaultProxy) -> None:
    sink = await started(S3Sink(settings(proxy.url, bucket, max_parts_in_flight=2), gateway_id=GATEWAY_ID))
    obj = lake_object(random_body(3 * PART_BYTES + 12345))
    # Parts linger a little at the proxy, so parallel uploads overlap there and can be counted.
    proxy.delay_when, proxy.delay_secs = (lambda r: "partNumber=" in r.query), 0.1
    try:
        landed = await sink.put_object(obj)
    finally:
        await sink.close()

    key = f"lake/{obj.key}"
    assert await read_back(s3_client, bucket, key) == obj.body
    assert landed.etag.endswith("-4")
    assert proxy.max_in_flight == 2  # parts go in parallel, never more than max_parts_in_flight
    head = await s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert "ChecksumCRC32" in head
    assert await open_uploads(s3_client, bucket) == []
    assert sink.stats.multipart_uploads == 1 and sink.stats.multipart_aborts == 0


async def test_sha256_checksum_is_sent(moto_endpoint: str, bucket: str, s3_client: Any) -> None:
    sink = await started(S3Sink(settings(moto_endpoint, bucket, checksum_algorithm="SHA256"), gateway_id=GATEWAY_ID))
    obj = lake_object(b'{"device_id":"d1"}\n' * 100)
    try:
        await sink.put_object(obj)
    finally:
        await sink.close()
    head = await s3_client.head_object(Bucket=bucket, Key=f"lake/{obj.key}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == checksum("SHA256", obj.body)


async def test_rewriting_the_same_key_is_idempotent(moto_endpoint: str, bucket: str, s3_client: Any) -> None:
    sink = await started(S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID))
    obj = lake_object(random_body(10_000))
    try:
        first = await sink.put_object(obj)
        replayed = await sink.put_object(obj)  # what a replay after a crash does
    finally:
        await sink.close()
    assert first == replayed
    listing = await s3_client.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listing["Contents"]] == [f"lake/{obj.key}"]
    assert await read_back(s3_client, bucket, f"lake/{obj.key}") == obj.body


async def test_encryption_storage_class_and_tags_are_stored(moto_endpoint: str, bucket: str, s3_client: Any) -> None:
    extra = {"kms_key_id": "alias/lake", "storage_class": "STANDARD_IA", "tags": {"team": "edge", "zone": "lake"}}
    sink = await started(S3Sink(settings(moto_endpoint, bucket, **extra), gateway_id=GATEWAY_ID))
    small = lake_object(b"x" * 1000, first=0, last=9)
    large = lake_object(random_body(8 * MiB + 1), first=10, last=19)
    try:
        await sink.put_object(small)
        await sink.put_object(large)
    finally:
        await sink.close()
    for obj in (small, large):
        key = f"lake/{obj.key}"
        head = await s3_client.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"] == "alias/lake"
        assert head["StorageClass"] == "STANDARD_IA"
        tags = await s3_client.get_object_tagging(Bucket=bucket, Key=key)
        assert {t["Key"]: t["Value"] for t in tags["TagSet"]} == {"team": "edge", "zone": "lake"}


async def test_start_aborts_only_this_gateways_stale_uploads(moto_endpoint: str, bucket: str, s3_client: Any) -> None:
    prefix = "lake/raw/telemetry/dt=2024-05-01/hour=13/"
    ours = [
        f"{prefix}{GATEWAY_ID}-0-9.ndjson.zst",
        f"lake/curated/telemetry/dt=2024-05-01/hour=14/{GATEWAY_ID}-5-7.parquet",  # an earlier version's: no tag
        f"{prefix}{GATEWAY_ID}-10-19-qzkbwmea.ndjson.zst",
    ]
    others = [
        f"{prefix}{GATEWAY_ID}0-0-9.ndjson.zst",  # other gateways whose ids merely start like ours
        f"{prefix}{GATEWAY_ID}-2-0-9.ndjson.zst",
        f"{prefix}{GATEWAY_ID}-2-0-9-qzkbwmea.ndjson.zst",
        f"{prefix}gw-other-0-9.ndjson.zst",
        f"elsewhere/{GATEWAY_ID}-0-9.ndjson.zst",  # outside the sink's prefix
    ]
    for key in ours + others:
        await s3_client.create_multipart_upload(Bucket=bucket, Key=key)

    sink = await started(S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID))
    await sink.close()

    remaining = sorted(u["Key"] for u in await open_uploads(s3_client, bucket))
    assert remaining == sorted(others)
    assert sink.stats.stale_uploads_aborted == 3


async def test_failed_part_aborts_the_upload(
    moto_endpoint: str, bucket: str, s3_client: Any, proxy: FaultProxy
) -> None:
    def deny_second_part(request: SeenRequest) -> Any:
        if request.method == "PUT" and "partNumber=2" in request.query:
            return s3_error(403, "AccessDenied")
        return None

    proxy.fail_when = deny_second_part
    sink = await started(S3Sink(settings(proxy.url, bucket), gateway_id=GATEWAY_ID))
    obj = lake_object(random_body(2 * PART_BYTES + 1))
    try:
        with pytest.raises(PermanentError, match="AccessDenied"):
            await sink.put_object(obj)
    finally:
        await sink.close()
    assert await open_uploads(s3_client, bucket) == []
    assert sink.stats.multipart_aborts == 1 and sink.stats.orphaned_uploads == 0
    listing = await s3_client.list_objects_v2(Bucket=bucket)
    assert listing.get("KeyCount", 0) == 0


async def test_cancelled_upload_is_aborted(moto_endpoint: str, bucket: str, s3_client: Any, proxy: FaultProxy) -> None:
    """A drain deadline cancels a multipart upload midway: it must not be left behind."""
    part_arrived = asyncio.Event()

    def hold_parts(request: SeenRequest) -> bool:
        if "partNumber=" in request.query:
            part_arrived.set()
            return True
        return False

    proxy.delay_when, proxy.delay_secs = hold_parts, 30.0
    sink = await started(S3Sink(settings(proxy.url, bucket), gateway_id=GATEWAY_ID))
    try:
        task = asyncio.create_task(sink.put_object(lake_object(random_body(2 * PART_BYTES))))
        await asyncio.wait_for(part_arrived.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await sink.close()
    assert await open_uploads(s3_client, bucket) == []
    assert sink.stats.multipart_aborts == 1


async def test_missing_bucket_fails_start(moto_endpoint: str) -> None:
    sink = S3Sink(settings(moto_endpoint, "no-such-bucket-here"), gateway_id=GATEWAY_ID)
    with pytest.raises(PermanentError, match="NoSuchBucket"):
        await sink.start()


async def test_keys_cannot_escape_the_prefix(moto_endpoint: str, bucket: str) -> None:
    sink = await started(S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID))
    try:
        for key in ("/abs/key", "raw/../../etc", "raw//x", ""):
            with pytest.raises(PermanentError):
                await sink.put_object(dataclasses.replace(lake_object(b"x"), key=key))
    finally:
        await sink.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prefix": "/lake/"}, "prefix"),
        ({"prefix": "lake"}, "prefix"),
        ({"part_size_bytes": 16 * MiB, "multipart_threshold_bytes": 8 * MiB}, "part_size_bytes"),
        ({"part_size_bytes": MiB}, r"part_size_bytes"),
        ({"initial_concurrency": 100, "max_concurrency": 10}, "concurrency"),
        ({"aws_secret_access_key": "nope"}, "unknown field"),
        ({"endpoint_url": "127.0.0.1:9000"}, "endpoint_url"),
    ],
)
def test_settings_reject_bad_values(change: dict[str, Any], message: str) -> None:
    raw = {"bucket": "lake-bucket", **change}
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, S3SinkSettings)


def test_settings_defaults_are_valid() -> None:
    s = msgspec.convert({"bucket": "lake-bucket"}, S3SinkSettings)
    assert s.multipart_threshold_bytes >= s.part_size_bytes
    assert s.retry.max_elapsed_secs > 0
