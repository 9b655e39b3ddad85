"""The curated zone's format: one explicit Arrow schema, written as zstd-compressed Parquet.

Schema version 1 (``CURATED_SCHEMA``); the Glue table of the curated zone is generated from it
(``hive_columns``), so the catalog and the files cannot drift apart::

    column             Arrow type                        null?  meaning
    device_id          string                            no     the authenticated device
    seq                int64                             yes    the device's sequence number, if it sent one
    event_time         timestamp[ms, UTC]                no     the record's own time (arrival time when the
                                                                device clock was beyond the skew limit)
    received_at        timestamp[ms, UTC]                no     when the gateway accepted the request
    gateway_id         string                            no     the gateway (worker) that accepted it
    availability_zone  string                            no     that gateway's availability zone
    ingest_id          string                            no     one per HTTP request
    record_index       int32                             no     position in that request; with ingest_id,
                                                                names the record uniquely
    site               string                            yes    device registry metadata
    model              string                            yes    device registry metadata (hardware model)
    metrics            map<string, double>               no     the record's metrics, as sent
    tags               map<string, string>               yes    the record's tags, as sent
    inference          struct<                           no     what the model said, or why it did not:
                         status string (never null)             scored | deferred | failed | skipped
                         model string, version string           which model and version scored it
                         score float, label string              its output
                         latency_ms float>                      the inference call's duration

Partition columns (``dt``, ``hour``) are not stored in the files: they live in the object's path.

``encode_curated`` takes plain dicts with these keys (extra keys are ignored). Timestamps may be
epoch milliseconds, timezone-aware ``datetime`` objects, or RFC 3339 strings with an offset.
Encoding is CPU work that releases the GIL; callers run it in a worker thread, not on the loop.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
CONTENT_TYPE = "application/vnd.apache.parquet"
EXTENSION = "parquet"
DEFAULT_ZSTD_LEVEL = 1  # zstd-1 is both faster and (on this data) no worse in ratio than zstd-3

TIMESTAMP = pa.timestamp("ms", tz="UTC")

INFERENCE_TYPE = pa.struct(
    [
        pa.field(
            "status", pa.string(), nullable=False, metadata={"description": "scored | deferred | failed | skipped"}
        ),
        pa.field("model", pa.string(), metadata={"description": "model name"}),
        pa.field("version", pa.string(), metadata={"description": "model version"}),
        pa.field("score", pa.float32(), metadata={"description": "model score"}),
        pa.field("label", pa.string(), metadata={"description": "model label"}),
        pa.field("latency_ms", pa.float32(), metadata={"description": "inference call duration"}),
        pa.field("reason", pa.string(), metadata={"description": "why a record is deferred or failed"}),
    ]
)


def _field(name: str, type_: pa.DataType, nullable: bool, description: str) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


CURATED_SCHEMA = pa.schema(
    [
        _field("device_id", pa.string(), False, "authenticated device id"),
        _field("seq", pa.int64(), True, "device sequence number, if sent"),
        _field("event_time", TIMESTAMP, False, "record time (arrival time if the device clock was off)"),
        _field("received_at", TIMESTAMP, False, "time the gateway accepted the request"),
        _field("gateway_id", pa.string(), False, "gateway (worker) that accepted the record"),
        _field("availability_zone", pa.string(), False, "availability zone of that gateway"),
        _field("ingest_id", pa.string(), False, "id of the HTTP request"),
        _field("record_index", pa.int32(), False, "position in the request; unique with ingest_id"),
        _field("site", pa.string(), True, "device site, from the registry"),
        _field("model", pa.string(), True, "device hardware model, from the registry"),
        _field("metrics", pa.map_(pa.string(), pa.float64()), False, "metrics as sent"),
        _field("tags", pa.map_(pa.string(), pa.string()), True, "tags as sent"),
        _field("inference", INFERENCE_TYPE, False, "model output or the reason there is none"),
    ],
    metadata={"edge_gateway.curated.schema_version": SCHEMA_VERSION},
)

# Min/max statistics on every scalar column and the inference status, where queries filter (time,
# device, request, status); none for the maps, whose statistics prune nothing and cost the writer
# 2-11% of its time. Every column is dictionary-encoded where that pays (Arrow's default): readings
# of one or two decimals make a dictionary of the metrics' values up to a quarter smaller on disk.
_STATISTICS_COLUMNS = [f.name for f in CURATED_SCHEMA if not pa.types.is_nested(f.type)] + ["inference.status"]


def writer_options(zstd_level: int = DEFAULT_ZSTD_LEVEL) -> dict[str, Any]:
    """How every curated object is written (``pq.write_table`` and ``pq.ParquetWriter`` alike)."""
    return {
        "compression": "zstd",
        "compression_level": zstd_level,
        "write_statistics": _STATISTICS_COLUMNS,
        "coerce_timestamps": "ms",
        "version": "2.6",
    }


def to_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build the curated Arrow table; raises ``ValueError`` naming the first bad column."""
    arrays = [_column(records, field) for field in CURATED_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=CURATED_SCHEMA)
    _check_required(table)
    return table


def encode_curated(records: Sequence[Mapping[str, Any]], *, zstd_level: int = DEFAULT_ZSTD_LEVEL) -> bytes:
    """Encode curated records as one Parquet file (zstd), ready to land as a lake object."""
    table = to_table(records)
    sink = io.BytesIO()
    pq.write_table(table, sink, **writer_options(zstd_level))
    return sink.getvalue()


def hive_type(type_: pa.DataType) -> str:
    """The Hive / Glue / Athena type name for an Arrow type of this schema."""
    if pa.types.is_string(type_):
        return "string"
    if pa.types.is_int64(type_):
        return "bigint"
    if pa.types.is_int32(type_):
        return "int"
    if pa.types.is_float64(type_):
        return "double"
    if pa.types.is_float32(type_):
        return "float"
    if pa.types.is_boolean(type_):
        return "boolean"
    if pa.types.is_timestamp(type_):
        return "timestamp"
    if pa.types.is_map(type_):
        return f"map<{hive_type(type_.key_type)},{hive_type(type_.item_type)}>"
    if pa.types.is_struct(type_):
        members = ",".join(f"{type_.field(i).name}:{hive_type(type_.field(i).type)}" for i in range(type_.num_fields))
        return f"struct<{members}>"
    raise ValueError(f"no Hive type for Arrow type {type_}")


def hive_columns(schema: pa.Schema = CURATED_SCHEMA) -> list[dict[str, str]]:
    """Glue ``Columns`` for a schema, each with its description as the comment."""
    columns = []
    for field in schema:
        description = (field.metadata or {}).get(b"description", b"").decode()
        columns.append({"Name": field.name, "Type": hive_type(field.type), "Comment": description})
    return columns


def _column(records: Sequence[Mapping[str, Any]], field: pa.Field) -> pa.Array:
    values = [record.get(field.name) for record in records]
    try:
        if pa.types.is_timestamp(field.type) and any(isinstance(v, str) for v in values):
            # RFC 3339 text (what the raw envelope carries) is parsed column-wise by Arrow.
            return pc.cast(pa.array(values, pa.string()), field.type)
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
        raise ValueError(f"curated column {field.name!r}: {exc}") from exc


def _check_required(table: pa.Table) -> None:
    """Arrow does not enforce ``nullable=False`` on construction; Parquet readers rely on it."""
    for field, column in zip(table.schema, table.columns, strict=True):
        if not field.nullable and column.null_count:
            raise ValueError(f"curated column {field.name!r} is required but has {column.null_count} null(s)")
    status = pc.struct_field(table.column("inference"), "status")
    if status.null_count:
        raise ValueError("curated column 'inference.status' is required but has null(s)")
