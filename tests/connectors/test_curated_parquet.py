"""The curated zone's Parquet format, in process and landed through S3Sink on moto."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.aws.s3 import S3Sink
from connectors.curated_parquet import CONTENT_TYPE, CURATED_SCHEMA, encode_curated, hive_columns
from tests.connectors.helpers import GATEWAY_ID, lake_object, read_back, settings

EVENT_MS = 1714568400123


def curated(i: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "device_id": f"dev-{i:06d}",
        "seq": i,
        "event_time": EVENT_MS + i,
        "received_at": "2024-05-01T13:00:01.500Z",
        "gateway_id": GATEWAY_ID,
        "availability_zone": "eu-west-1a",
        "ingest_id": "ing-1",
        "record_index": i,
        "site": "plant-7",
        "model": "tx-200",
        "metrics": {"temp_c": 21.5 + i, "rh": 0.4},
        "tags": {"fw": "1.2.3"},
        "inference": {
            "status": "scored",
            "model": "anomaly",
            "version": "3",
            "score": 0.25,
            "label": "ok",
            "latency_ms": 2.5,
        },
        "unknown_extra": "ignored",
    }
    record.update(overrides)
    return record


def test_round_trip_keeps_the_declared_schema_and_values() -> None:
    records = [
        curated(0),
        curated(1, seq=None, site=None, model=None, tags=None, inference={"status": "deferred"}),
        curated(2, event_time=datetime(2024, 5, 1, 13, 30, tzinfo=UTC)),
    ]
    table = pq.read_table(io.BytesIO(encode_curated(records)))
    assert table.schema.equals(CURATED_SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"edge_gateway.curated.schema_version"] == b"1"
    rows = table.to_pylist()
    assert rows[0]["event_time"] == datetime.fromtimestamp(EVENT_MS / 1000, tz=UTC)
    assert rows[0]["received_at"] == datetime(2024, 5, 1, 13, 0, 1, 500000, tzinfo=UTC)
    assert dict(rows[0]["metrics"]) == {"temp_c": 21.5, "rh": 0.4}
    assert rows[0]["inference"]["score"] == pytest.approx(0.25)
    assert rows[1]["seq"] is None and rows[1]["tags"] is None
    assert rows[1]["inference"]["status"] == "deferred"
    missing = {k for k, v in rows[1]["inference"].items() if v is None}
    assert missing == {"model", "version", "score", "label", "latency_ms", "reason"}
    assert rows[2]["event_time"] == datetime(2024, 5, 1, 13, 30, tzinfo=UTC)


def test_files_are_zstd_compressed() -> None:
    metadata = pq.ParquetFile(io.BytesIO(encode_curated([curated(i) for i in range(100)]))).metadata
    assert metadata.row_group(0).column(0).compression == "ZSTD"


@pytest.mark.parametrize(
    ("override", "column"),
    [
        ({"device_id": None}, "device_id"),
        ({"event_time": None}, "event_time"),
        ({"inference": {"score": 1.0}}, "inference.status"),
        ({"metrics": {"x": "not a number"}}, "metrics"),
        ({"received_at": "2024-05-01T13:00:00"}, "received_at"),  # no offset: ambiguous
    ],
)
def test_bad_records_are_refused_naming_the_column(override: dict[str, Any], column: str) -> None:
    with pytest.raises(ValueError, match=column):
        encode_curated([curated(0), curated(1, **override)])


def test_glue_columns_follow_the_schema() -> None:
    columns = {c["Name"]: c["Type"] for c in hive_columns()}
    assert list(columns) == CURATED_SCHEMA.names
    assert columns["event_time"] == "timestamp"
    assert columns["seq"] == "bigint" and columns["record_index"] == "int"
    assert columns["metrics"] == "map<string,double>"
    assert columns["inference"] == (
        "struct<status:string,model:string,version:string,score:float,label:string,latency_ms:float,reason:string>"
    )


async def test_parquet_object_lands_and_reads_back_with_the_schema(
    moto_endpoint: str, bucket: str, s3_client: Any
) -> None:
    records = [curated(i) for i in range(500)]
    body = encode_curated(records)
    obj = lake_object(body, zone="curated", ext="parquet", content_type=CONTENT_TYPE, records=len(records))
    sink = S3Sink(settings(moto_endpoint, bucket), gateway_id=GATEWAY_ID)
    await sink.start()
    try:
        await sink.put_object(obj)
    finally:
        await sink.close()
    table = pq.read_table(pa.BufferReader(await read_back(s3_client, bucket, f"lake/{obj.key}")))
    assert table.schema.equals(CURATED_SCHEMA, check_metadata=False)
    assert table.num_rows == 500
    assert table.column("device_id")[499].as_py() == "dev-000499"
