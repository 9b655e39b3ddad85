"""``GlueCatalog``: the lake's tables and partitions in the Glue Data Catalog, so Athena sees data at once.

On ``start()`` it creates the database and, for every configured dataset, one table per zone::

    <table_prefix><zone>_<dataset>   location s3://<bucket>/<prefix><zone>/<dataset>/
      raw         JSON lines (ndjson.zst), OpenX JSON SerDe, columns of the raw envelope
      quarantine  JSON lines (ndjson.zst), OpenX JSON SerDe, columns of the quarantine envelope
      curated     Parquet, columns generated from ``connectors.curated_parquet.CURATED_SCHEMA``
    partition keys: dt (YYYY-MM-DD), hour (HH), both strings, matching the Hive-style paths

Existing databases and tables are left as they are (``AlreadyExistsException`` is success), so
several gateways can start at once, and ``start()`` may be called again after it failed.
``partition_landed()`` registers one partition the first time it is asked to and remembers it, so
later calls for it cost no Glue call. It only ever works on the partition it is given: retrying a
failed registration is the caller's business, and ``connectors.announcing_sink.AnnouncingSink``
does it from a background queue, off the landing path.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta

from connectors.aws import translate
from connectors.aws.connector import AwsConnector
from connectors.aws.settings import AwsClientSettings
from connectors.base import Partition
from connectors.errors import ConnectorError
from connectors.retry import Sleep

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra, imported where a client is made (connectors/aws/client.py)
    from aiobotocore.session import AioSession

log = logging.getLogger(__name__)

ZONES = ("raw", "curated", "quarantine")
# Remembered partitions; a year of hourly partitions for a few datasets and zones fits many times.
KNOWN_PARTITIONS_MAX = 100_000

GlueName = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[a-z0-9_]+$")]
DatasetName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]

JSON_SERDE = "org.openx.data.jsonserde.JsonSerDe"
TEXT_INPUT = "org.apache.hadoop.mapred.TextInputFormat"
TEXT_OUTPUT = "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat"
PARQUET_SERDE = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
PARQUET_INPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat"
PARQUET_OUTPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat"

PARTITION_KEYS = [
    {"Name": "dt", "Type": "string", "Comment": "event date, YYYY-MM-DD (UTC)"},
    {"Name": "hour", "Type": "string", "Comment": "event hour, HH (UTC)"},
]


def _col(name: str, type_: str, comment: str) -> dict[str, str]:
    return {"Name": name, "Type": type_, "Comment": comment}


# The raw zone's envelope (gateway.ingest.records.RawLine): the record exactly as sent sits in `record`.
RAW_COLUMNS = [
    _col("ingest_id", "string", "id of the HTTP request"),
    _col("index", "int", "position in the request"),
    _col("received_at", "string", "RFC 3339 time the gateway accepted the request"),
    _col("gateway_id", "string", "gateway (worker) that accepted the record"),
    _col("availability_zone", "string", "availability zone of that gateway"),
    _col("device_id", "string", "authenticated device id"),
    _col("event_time_ms", "bigint", "the record's own time, epoch milliseconds"),
    _col("partitioned_by", "string", "event_time | arrival_time (device clock beyond the skew limit)"),
    _col("seq", "bigint", "device sequence number, if sent"),
    _col("clock_skew_ms", "bigint", "device clock minus gateway clock, from the signed timestamp"),
    _col("device", "map<string,string>", "device registry metadata"),
    _col("source_ip", "string", "device address (X-Forwarded-For from trusted proxies only)"),
    _col(
        "record",
        "struct<device_id:string,ts:string,seq:bigint,metrics:map<string,double>,tags:map<string,string>>",
        "the record as sent (schema v1 fields)",
    ),
]

# The quarantine zone's envelope (gateway.ingest.records.QuarantineLine).
QUARANTINE_COLUMNS = [
    _col("ingest_id", "string", "id of the HTTP request"),
    _col("index", "int", "position in the request"),
    _col("received_at", "string", "RFC 3339 time the gateway received the request"),
    _col("gateway_id", "string", "gateway (worker) that received the record"),
    _col("availability_zone", "string", "availability zone of that gateway"),
    _col("device_id", "string", "authenticated sender"),
    _col("reason", "string", "why the record was refused"),
    _col("raw", "string", "the record's text as sent"),
]


class GlueCatalogSettings(AwsClientSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Which Glue database holds the lake's tables."""

    database: GlueName
    datasets: Annotated[tuple[DatasetName, ...], Meta(min_length=1)] = ("telemetry",)
    table_prefix: Annotated[str, Meta(max_length=64, pattern=r"^[a-z0-9_]*$")] = ""
    # Empty: the caller's own account.
    catalog_id: Annotated[str, Meta(pattern=r"^([0-9]{12})?$")] = ""
    # Retry budget of one registration attempt (CreateTable if needed, CreatePartition); the caller
    # queues a partition that still failed and tries it again later, with its own backoff.
    register_timeout_secs: Annotated[float, Meta(ge=0)] = 5.0


@dataclass(slots=True)
class GlueCatalogStats:
    tables_created: int = 0
    partitions_registered: int = 0
    registration_failures: int = 0


class GlueCatalog(AwsConnector):
    """Creates the lake's Glue tables and registers partitions as objects land in them."""

    service = "glue"

    def __init__(
        self,
        settings: GlueCatalogSettings,
        *,
        lake_url: str,
        session: AioSession | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``lake_url`` is the lake root, ``s3://<bucket>/<prefix>`` (``S3Sink.root_url``)."""
        if not lake_url.startswith("s3://"):
            raise ValueError("lake_url must be an s3:// URL")
        super().__init__(settings, session=session, sleep=sleep, rng=rng, clock=clock)
        self.settings = settings
        self.lake_url = lake_url if lake_url.endswith("/") else lake_url + "/"
        self.stats = GlueCatalogStats()
        self._known: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()
        self._tables: set[str] = set()

    def table_name(self, zone: str, dataset: str) -> str:
        return f"{self.settings.table_prefix}{zone}_{dataset.lower().replace('-', '_').replace('.', '_')}"

    async def start(self) -> None:
        s = self.settings
        await self._open_client()
        try:
            await self._create_idempotent(
                "CreateDatabase",
                lambda: self._client.create_database(
                    **self._catalog(),
                    DatabaseInput={"Name": s.database, "Description": "Edge gateway telemetry lake"},
                ),
            )
            for dataset in s.datasets:
                for zone in ZONES:
                    await self._ensure_table(zone, dataset)
        except BaseException:
            await self.close()
            raise

    async def partition_landed(self, partition: Partition) -> bool:
        """Register ``partition`` if it is new; True when this call created it.

        Raises ``ConnectorError`` when Glue still fails after ``register_timeout_secs`` of retries;
        nothing is remembered then, and the caller decides when to ask again.
        """
        if self._client is None:
            raise RuntimeError("GlueCatalog.partition_landed called before start()")
        key = (partition.zone, partition.dataset, partition.dt, partition.hour)
        if key in self._known:
            self._known.move_to_end(key)
            return False
        budget = self.settings.register_timeout_secs
        try:
            await self._ensure_table(partition.zone, partition.dataset, max_elapsed_secs=budget)
            table = self.table_name(partition.zone, partition.dataset)
            created = await self._create_idempotent(
                "CreatePartition",
                lambda: self._client.create_partition(
                    **self._catalog(),
                    DatabaseName=self.settings.database,
                    TableName=table,
                    PartitionInput={
                        "Values": [partition.dt, partition.hour],
                        "StorageDescriptor": self._storage(partition.zone, f"{self.lake_url}{partition.prefix}/"),
                    },
                ),
                max_elapsed_secs=budget,
            )
        except ConnectorError:
            self.stats.registration_failures += 1
            raise
        self._known[key] = None
        if len(self._known) > KNOWN_PARTITIONS_MAX:
            self._known.popitem(last=False)
        if created:
            self.stats.partitions_registered += 1
            log.info("glue: registered partition %s", partition.prefix)
        return created

    async def _ensure_table(self, zone: str, dataset: str, *, max_elapsed_secs: float | None = None) -> None:
        name = self.table_name(zone, dataset)
        if name in self._tables:
            return
        created = await self._create_idempotent(
            "CreateTable",
            lambda: self._client.create_table(
                **self._catalog(), DatabaseName=self.settings.database, TableInput=self._table_input(zone, dataset)
            ),
            max_elapsed_secs=max_elapsed_secs,
        )
        if created:
            self.stats.tables_created += 1
        self._tables.add(name)

    def _table_input(self, zone: str, dataset: str) -> dict[str, Any]:
        location = f"{self.lake_url}{zone}/{dataset}/"
        return {
            "Name": self.table_name(zone, dataset),
            "Description": f"{zone} zone of dataset {dataset}",
            "TableType": "EXTERNAL_TABLE",
            "Parameters": {
                "EXTERNAL": "TRUE",
                "classification": "parquet" if zone == "curated" else "json",
                **({} if zone == "curated" else {"compressionType": "zstd"}),
            },
            "PartitionKeys": PARTITION_KEYS,
            "StorageDescriptor": self._storage(zone, location),
        }

    def _storage(self, zone: str, location: str) -> dict[str, Any]:
        if zone == "curated":
            from connectors.curated_parquet import hive_columns  # Arrow, only once a curated table is created

            return {
                "Columns": hive_columns(),
                "Location": location,
                "InputFormat": PARQUET_INPUT,
                "OutputFormat": PARQUET_OUTPUT,
                "SerdeInfo": {"SerializationLibrary": PARQUET_SERDE, "Parameters": {"serialization.format": "1"}},
            }
        return {
            "Columns": QUARANTINE_COLUMNS if zone == "quarantine" else RAW_COLUMNS,
            "Location": location,
            "InputFormat": TEXT_INPUT,
            "OutputFormat": TEXT_OUTPUT,
            # Mixed firmware sends fields the table does not declare; a bad line must not fail a query.
            "SerdeInfo": {"SerializationLibrary": JSON_SERDE, "Parameters": {"ignore.malformed.json": "true"}},
        }

    def _catalog(self) -> dict[str, str]:
        return {"CatalogId": self.settings.catalog_id} if self.settings.catalog_id else {}

    async def _create_idempotent(
        self, operation: str, request: Callable[[], Awaitable[Any]], *, max_elapsed_secs: float | None = None
    ) -> bool:
        """Run a Create* call; True if it created something, False if it already existed."""

        async def create() -> bool:
            try:
                await request()
            except Exception as exc:
                # Another gateway (or an earlier start) got there first: that is the state we want.
                if translate.error_code(exc) == "AlreadyExistsException":
                    return False
                raise
            return True

        return await self._call(operation, create, max_elapsed_secs=max_elapsed_secs)
