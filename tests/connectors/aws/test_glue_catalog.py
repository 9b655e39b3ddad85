"""GlueCatalog against moto: database, zone tables and partitions registered as objects land."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import pytest

from connectors.announcing_sink import AnnouncingSink
from connectors.aws.glue import GlueCatalog, GlueCatalogSettings
from connectors.aws.s3 import S3Sink
from connectors.curated_parquet import CURATED_SCHEMA
from tests.connectors.helpers import FAST_RETRY, GATEWAY_ID, lake_object, partition, settings


def catalog_settings(moto_endpoint: str) -> GlueCatalogSettings:
    return GlueCatalogSettings(
        database=f"lake_{uuid.uuid4().hex[:8]}", endpoint_url=moto_endpoint, region="us-east-1", retry=FAST_RETRY
    )


async def test_start_creates_the_database_and_zone_tables(moto_endpoint: str, glue_client: Any) -> None:
    s = catalog_settings(moto_endpoint)
    catalog = GlueCatalog(s, lake_url="s3://lake-bucket/lake/")
    await catalog.start()
    await catalog.close()
    again = GlueCatalog(s, lake_url="s3://lake-bucket/lake/")  # a second gateway starting: no error
    await again.start()
    await again.close()

    tables = {t["Name"]: t for t in (await glue_client.get_tables(DatabaseName=s.database))["TableList"]}
    assert set(tables) == {"raw_telemetry", "curated_telemetry", "quarantine_telemetry"}
    assert (catalog.stats.tables_created, again.stats.tables_created) == (3, 0)
    curated = tables["curated_telemetry"]
    assert [k["Name"] for k in curated["PartitionKeys"]] == ["dt", "hour"]
    storage = curated["StorageDescriptor"]
    assert storage["Location"] == "s3://lake-bucket/lake/curated/telemetry/"
    assert storage["SerdeInfo"]["SerializationLibrary"].endswith("ParquetHiveSerDe")
    assert [c["Name"] for c in storage["Columns"]] == CURATED_SCHEMA.names
    raw = tables["raw_telemetry"]["StorageDescriptor"]
    assert raw["SerdeInfo"]["SerializationLibrary"] == "org.openx.data.jsonserde.JsonSerDe"
    assert raw["Location"] == "s3://lake-bucket/lake/raw/telemetry/"
    quarantine = tables["quarantine_telemetry"]["StorageDescriptor"]
    assert "reason" in [c["Name"] for c in quarantine["Columns"]]


async def test_partitions_appear_as_objects_land(moto_endpoint: str, bucket: str, glue_client: Any) -> None:
    s = catalog_settings(moto_endpoint)
    s3 = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    catalog = GlueCatalog(s, lake_url=s3.root_url)
    sink = AnnouncingSink(s3, catalog=catalog)
    await sink.start()
    try:
        await sink.put_object(lake_object(b"a", first=0, last=0, hour="13"))
        await sink.put_object(lake_object(b"b", first=1, last=1, hour="13"))  # same partition: cached
        await sink.put_object(lake_object(b"c", first=2, last=2, hour="14"))
        await sink.put_object(lake_object(b"d", zone="curated", first=0, last=0, ext="parquet"))
        # Registered in the background before close: close cancels a registration in flight, whose
        # retry then finds the partition there already and does not count it as created.
        async with asyncio.timeout(10):
            while sink.catalog_queued:
                await asyncio.sleep(0.01)
    finally:
        await sink.close()

    raw = (await glue_client.get_partitions(DatabaseName=s.database, TableName="raw_telemetry"))["Partitions"]
    assert sorted(p["Values"] for p in raw) == [["2024-05-01", "13"], ["2024-05-01", "14"]]
    locations = {tuple(p["Values"]): p["StorageDescriptor"]["Location"] for p in raw}
    assert locations[("2024-05-01", "13")] == f"s3://{bucket}/lake/raw/telemetry/dt=2024-05-01/hour=13/"
    curated = (await glue_client.get_partitions(DatabaseName=s.database, TableName="curated_telemetry"))["Partitions"]
    assert [p["Values"] for p in curated] == [["2024-05-01", "13"]]
    assert curated[0]["StorageDescriptor"]["SerdeInfo"]["SerializationLibrary"].endswith("ParquetHiveSerDe")
    assert catalog.stats.partitions_registered == 3


async def test_registration_is_idempotent_across_gateways(moto_endpoint: str) -> None:
    s = catalog_settings(moto_endpoint)
    first, second = GlueCatalog(s, lake_url="s3://b/"), GlueCatalog(s, lake_url="s3://b/")
    await first.start()
    await second.start()
    try:
        assert await first.partition_landed(partition()) is True
        assert await first.partition_landed(partition()) is False  # cached, no call
        assert await second.partition_landed(partition()) is False  # AlreadyExistsException is fine
    finally:
        await first.close()
        await second.close()


def test_settings_reject_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"database": "lake", "crawler": "x"}, GlueCatalogSettings)
    with pytest.raises(msgspec.ValidationError, match="database"):
        msgspec.convert({"database": "Lake-DB"}, GlueCatalogSettings)
