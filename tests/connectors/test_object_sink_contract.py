"""What every ``ObjectSink`` promises, checked on each implementation against a real store.

The pipeline lands objects through ``ObjectSink.put_object`` without knowing which sink it has, so
every sink must keep the same promises: the bytes land under the object's key, a replay rewrites
the same key with the same bytes and reports the same landing, and a failure comes out as a
``connectors.errors`` kind naming where it happened, never as a vendor or OS exception.

Implementations: the local lake (a temporary directory) and the S3 sink (moto's server, the
same one the other AWS connector tests use).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from connectors.aws.s3 import S3Sink
from connectors.base import ObjectSink
from connectors.errors import ConnectorError
from connectors.local_lake import LocalLakeSink
from tests.connectors.helpers import GATEWAY_ID, lake_object, random_body, read_back, settings

SINKS = ["local", "s3"]


@dataclass
class SinkUnderTest:
    """A started sink and the store-specific ways to look behind it."""

    sink: ObjectSink
    # The bytes stored under a lake key.
    read: Callable[[str], Awaitable[bytes]]
    # Every stored name under a lake prefix (to see leftovers and duplicates).
    listing: Callable[[str], Awaitable[list[str]]]
    # The user metadata stored with a lake key; None where the store keeps none.
    metadata: Callable[[str], Awaitable[dict[str, str]]] | None
    # Makes the next put_object fail in the store's own way.
    break_store: Callable[[], Awaitable[None]]


@pytest.fixture
async def local_sink(tmp_path: Path) -> AsyncIterator[SinkUnderTest]:
    root = tmp_path / "lake"
    sink = LocalLakeSink(root)
    await sink.start()

    async def read(key: str) -> bytes:
        return (root / key).read_bytes()

    async def listing(prefix: str) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in (root / prefix).rglob("*") if p.is_file())

    async def break_store() -> None:
        # A file where the zone's directory must go: creating the partition fails (ENOTDIR).
        for entry in root.iterdir():
            if entry.is_dir():
                os.rename(entry, tmp_path / f"moved-{entry.name}")
        (root / "raw").write_bytes(b"")

    yield SinkUnderTest(sink, read, listing, None, break_store)
    await sink.close()


@pytest.fixture
async def s3_sink(moto_endpoint: str, s3_client: Any, bucket: str) -> AsyncIterator[SinkUnderTest]:
    client = s3_client
    s = settings(moto_endpoint, bucket)
    sink = S3Sink(s, gateway_id=GATEWAY_ID)
    await sink.start()

    async def read(key: str) -> bytes:
        return await read_back(client, bucket, s.prefix + key)

    async def listing(prefix: str) -> list[str]:
        page = await client.list_objects_v2(Bucket=bucket, Prefix=s.prefix + prefix)
        return sorted(item["Key"][len(s.prefix) :] for item in page.get("Contents", []))

    async def metadata(key: str) -> dict[str, str]:
        return dict((await client.head_object(Bucket=bucket, Key=s.prefix + key))["Metadata"])

    async def break_store() -> None:
        # The bucket goes away (emptied first, as S3 requires): NoSuchBucket on the next put.
        page = await client.list_objects_v2(Bucket=bucket)
        for item in page.get("Contents", []):
            await client.delete_object(Bucket=bucket, Key=item["Key"])
        await client.delete_bucket(Bucket=bucket)

    yield SinkUnderTest(sink, read, listing, metadata, break_store)
    await sink.close()


@pytest.fixture(params=SINKS)
def under_test(request: pytest.FixtureRequest) -> SinkUnderTest:
    # Looked up by name so moto starts only for the S3 case.
    return request.getfixturevalue(f"{request.param}_sink")


def test_it_is_an_object_sink(under_test: SinkUnderTest) -> None:
    assert isinstance(under_test.sink, ObjectSink)
    assert under_test.sink.name


async def test_put_object_lands_the_bytes_under_the_key(under_test: SinkUnderTest) -> None:
    obj = lake_object(random_body(64 * 1024), records=7)

    landed = await under_test.sink.put_object(obj)

    assert await under_test.read(obj.key) == obj.body
    assert landed.key == obj.key
    # A file:// URL quotes the "=" of the Hive partition names.
    assert unquote(landed.url).endswith(obj.key)
    assert (landed.bytes, landed.records, landed.zone) == (len(obj.body), 7, obj.partition.zone)


async def test_put_object_keeps_the_metadata(under_test: SinkUnderTest) -> None:
    if under_test.metadata is None:
        pytest.skip("this store keeps no per-object metadata (a directory of plain files)")
    obj = lake_object(b'{"device_id":"d1"}\n', first=10, last=19, records=10)

    await under_test.sink.put_object(obj)

    stored = await under_test.metadata(obj.key)
    assert stored["schema"] == obj.metadata["schema"]
    assert stored["records"] == "10"
    assert (stored["first-lsn"], stored["last-lsn"]) == ("10", "19")


async def test_a_replayed_put_rewrites_the_same_key_once(under_test: SinkUnderTest) -> None:
    obj = lake_object(random_body(4096))

    first = await under_test.sink.put_object(obj)
    again = await under_test.sink.put_object(obj)

    assert again == first
    assert await under_test.read(obj.key) == obj.body
    # One object, and nothing a write left half-done beside it.
    assert await under_test.listing(obj.partition.prefix) == [obj.key]


async def test_failures_come_out_as_connector_errors(under_test: SinkUnderTest) -> None:
    await under_test.break_store()

    with pytest.raises(ConnectorError) as caught:
        await under_test.sink.put_object(lake_object(b"x" * 100))

    assert caught.value.endpoint
