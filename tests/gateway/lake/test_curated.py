"""The curated zone: scored records as Parquet, and a dead model never blocking the lake."""

from __future__ import annotations

import socket

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.curated_parquet import CURATED_SCHEMA
from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, read_zone, record, signed

NORMAL = {"temperature_c": 21.0, "humidity_pct": 45.0, "pressure_hpa": 1013.0, "battery_v": 3.9, "rssi_dbm": -65.0, "cpu_pct": 20.0, "mem_pct": 40.0, "uptime_s": 86400.0}
ANOMALOUS = NORMAL | {"temperature_c": 95.0, "battery_v": 2.1, "cpu_pct": 99.0, "rssi_dbm": -120.0}


def curated_rows(env) -> list[dict]:
    rows = []
    for path in sorted((env.lake / "curated").rglob("*.parquet")):
        table = pq.read_table(path)
        assert table.schema.equals(CURATED_SCHEMA, check_metadata=False)
        rows.extend(table.to_pylist())
    return rows


async def post(http, url, env, records) -> dict:
    body = b"".join(orjson.dumps(r) + b"\n" for r in records)
    async with http.post(url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
        assert resp.status == 202, await resp.text()
        return await resp.json()


async def test_records_are_scored_and_land_as_parquet_once(tmp_path, http):
    env = make_env(tmp_path)
    running = await start_gateway(load_settings(env.config, environ={}))
    normal = [record(seq=i, **NORMAL) for i in range(40)]
    odd = [record(seq=100 + i, **ANOMALOUS) for i in range(5)]
    partial = [record(seq=200, temperature_c=21.0) | {"tags": {"fw": "2.0"}}]  # seven metrics missing: filled
    await post(http, running.url, env, normal + odd + partial)
    await running.stop()
    rows = curated_rows(env)
    raw = read_zone(env.lake, "raw")
    assert sorted((r["ingest_id"], r["record_index"]) for r in rows) == sorted((r["ingest_id"], r["index"]) for r in raw)
    by_seq = {r["seq"]: r for r in rows}
    assert all(r["inference"]["status"] == "ok" and r["inference"]["model"] == "telemetry_anomaly" for r in rows)
    normal_scores = [by_seq[i]["inference"]["score"] for i in range(40)]
    odd_scores = [by_seq[100 + i]["inference"]["score"] for i in range(5)]
    assert min(odd_scores) > max(normal_scores)
    assert {by_seq[100]["inference"]["label"], by_seq[0]["inference"]["label"]} == {"anomaly", "normal"}
    assert by_seq[200]["metrics"] == [("temperature_c", 21.0)] and by_seq[200]["tags"] == [("fw", "2.0")]
    assert by_seq[200]["inference"]["status"] == "ok"
    assert by_seq[0]["site"] == "plant-7" and by_seq[0]["device_id"] == "dev-1" and by_seq[0]["tags"] is None


async def test_a_request_of_one_hour_and_of_many_hours_scores_each_record_where_it_is(tmp_path, http):
    """Frames of many records keep their own inference column; a backfill's one-record frames, read
    with them, are scored together and each still gets its own score, label and status."""
    import time

    env = make_env(tmp_path)
    running = await start_gateway(load_settings(env.config, environ={}))
    hour_ms = 3_600_000
    now = int(time.time() * 1000)
    live = [record(seq=i, **NORMAL) for i in range(80)]
    backfill = [record(seq=1000 + h, ts=now - h * hour_ms, **(ANOMALOUS if h == 7 else NORMAL)) for h in range(1, 30)]
    await post(http, running.url, env, live + backfill)
    await running.stop()
    rows = curated_rows(env)
    assert sorted(r["seq"] for r in rows) == sorted(r["seq"] for r in live + backfill)
    assert all(r["inference"]["status"] == "ok" and r["inference"]["score"] is not None for r in rows)
    by_seq = {r["seq"]: r["inference"] for r in rows}
    normal = [by_seq[r["seq"]]["score"] for r in live + backfill if r["seq"] != 1007]
    assert by_seq[1007]["score"] > max(normal) and by_seq[1007]["label"] == "anomaly"
    hours = {r["event_time"].replace(minute=0, second=0, microsecond=0) for r in rows}
    assert len(hours) >= 29, "the backfill's records are in hours of their own"


async def test_reject_policy_marks_incomplete_records_failed(tmp_path, http):
    env = make_env(tmp_path, inference={"missing": "reject"})
    running = await start_gateway(load_settings(env.config, environ={}))
    await post(http, running.url, env, [record(seq=1, **NORMAL), record(seq=2, temperature_c=20.0)])
    await running.stop()
    by_seq = {r["seq"]: r["inference"] for r in curated_rows(env)}
    assert by_seq[1]["status"] == "ok"
    assert by_seq[2]["status"] == "failed" and "humidity_pct" in by_seq[2]["reason"]
    counted = running.gateway.metrics.inference_records
    assert counted.labels("ok")._value.get() == 1 and counted.labels("failed")._value.get() == 1


def test_a_partly_scored_chunk_gives_each_record_its_own_status():
    import numpy as np

    from connectors.inference.base import ShapedBatch
    from gateway.lake.curated import Scores, _scored_column

    # Records 1 and 3 were left out of the tensor; record 1 with a reason.
    rows = np.array([0, 2, 4])
    chunk = ShapedBatch(np.zeros((3, 2), np.float32), rows, np.zeros((3, 2), bool), {1: "missing metrics: a"}, 5, ("a", "b"))
    scored = _scored_column(chunk, Scores(np.array([0.1, 0.9, 0.2], np.float32), ["normal", "anomaly", "normal"], "m", "3", 4.0))
    got = scored.to_pylist()
    assert [r["status"] for r in got] == ["ok", "failed", "ok", "failed", "ok"]
    assert [r["label"] for r in got] == ["normal", None, "anomaly", None, "normal"]
    assert [None if r["score"] is None else round(r["score"], 3) for r in got] == [0.1, None, 0.9, None, 0.2]
    assert [r["reason"] for r in got] == [None, "missing metrics: a", None, None, None]
    assert {(r["model"], r["version"], r["latency_ms"]) for r in got} == {("m", "3", 4.0)}


async def test_a_dead_endpoint_defers_records_and_never_blocks_the_lake(tmp_path, http):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens here once the socket closes
    env = make_env(
        tmp_path,
        inference={"backend": "triton", "max_defer_secs": 0.5, "call_timeout_secs": 0.2},
    )
    text = env.config.read_text() + f'\n[[inference.endpoints]]\nurl = "127.0.0.1:{dead_port}"\nprotocol = "grpc"\n'
    env.config.write_text(text)
    running = await start_gateway(load_settings(env.config, environ={}))
    await post(http, running.url, env, [record(seq=i, **NORMAL) for i in range(30)])
    await running.stop()
    assert len(read_zone(env.lake, "raw")) == 30  # raw landing does not wait for inference
    statuses = {r["inference"]["status"] for r in curated_rows(env)}
    rows = curated_rows(env)
    assert len(rows) == 30 and statuses <= {"deferred", "failed"} and statuses
    assert all(r["inference"]["reason"] for r in rows)


@pytest.mark.parametrize("enabled", [False])
async def test_inference_can_be_turned_off(tmp_path, http, enabled):
    env = make_env(tmp_path, inference={"enabled": enabled})
    running = await start_gateway(load_settings(env.config, environ={}))
    await post(http, running.url, env, [record(seq=1, **NORMAL)])
    await running.stop()
    assert read_zone(env.lake, "raw") and not (env.lake / "curated").exists()


def test_frames_decoded_together_keep_each_requests_own_fields():
    import numpy as np

    from gateway.lake.curated import decode_frames

    def raw_frame(ingest_id: str, device: dict, seqs: range, metric: float) -> bytes:
        shared = {"ingest_id": ingest_id, "received_at": "2026-12-03T10:00:00.000Z", "gateway_id": "gw-1",
                  "availability_zone": "az-1", "device": device}
        return b"".join(
            orjson.dumps(shared | {"index": i, "device_id": ingest_id[-1:], "event_time_ms": 1_796_292_000_000 + s, "seq": s,
                                   "record": {"metrics": {"temperature_c": metric + i}}}) + b"\n"
            for i, s in enumerate(seqs)
        )

    payloads = [raw_frame("req-a", {"site": "north"}, range(3), 10.0), raw_frame("req-b", {}, range(7, 9), 50.0),
                raw_frame("req-c", {"site": "south", "model": "m2"}, range(20, 24), 90.0)]
    decoded = decode_frames(payloads, ("temperature_c",), np.zeros(1, np.float32), False)
    tables = decoded.tables()
    assert [t.num_rows for t in tables] == [3, 2, 4]
    assert [t.column("ingest_id").to_pylist() for t in tables] == [["req-a"] * 3, ["req-b"] * 2, ["req-c"] * 4]
    assert [t.column("site").to_pylist() for t in tables] == [["north"] * 3, [None] * 2, ["south"] * 4]
    assert [t.column("seq").to_pylist() for t in tables] == [[0, 1, 2], [7, 8], [20, 21, 22, 23]]
    assert [chunk.features[:, 0].tolist() for chunk in decoded.shaped] == [[10.0, 11.0, 12.0], [50.0, 51.0], [90.0, 91.0, 92.0, 93.0]]
    # The same frames as the WAL stores them (the beginning their lines share once), and one empty.
    from gateway.durable.wal import shared_payload

    def stored(payload: bytes) -> bytes:
        lines = payload.splitlines()
        cut = lines[0].index(b',"index"')
        return shared_payload(lines[0][:cut], [line[cut:] for line in lines])

    mixed = [stored(payloads[0]), payloads[1], stored(payloads[2]), shared_payload(stored(payloads[1]).split(b"\n")[0], [])]
    again = decode_frames(mixed, ("temperature_c",), np.zeros(1, np.float32), False, [True, False, True, True])
    assert all(a.equals(t) for a, t in zip(again.tables(), tables)) and again.tables()[3].num_rows == 0
    assert [chunk.features[:, 0].tolist() for chunk in again.shaped] == [[10.0, 11.0, 12.0], [50.0, 51.0], [90.0, 91.0, 92.0, 93.0], []]


def curated_row(seq: int) -> dict:
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device_id": "d", "seq": seq, "event_time": now, "received_at": now, "gateway_id": "gw", "availability_zone": "az",
        "ingest_id": "i", "record_index": seq, "metrics": [("temperature_c", 21.0)], "inference": {"status": "ok"},
    }


def test_an_open_curated_object_holds_columns_not_payloads_and_writes_a_row_group_at_a_time():
    from gateway.durable.wal import KIND_RECORDS, Frame
    from gateway.lake.curated import ParquetBuilder, ScoredFrame

    builder = ParquetBuilder(row_group_rows=80)
    payload = b'{"device_id":"d","seq":0}\n' * 300
    for i in range(20):  # frames from several decode slices: a chunked table, one chunk per frame
        rows = [curated_row(seq=i * 10 + k) for k in range(10)]
        table = pa.Table.from_pylist(rows, schema=CURATED_SCHEMA)
        frame = ScoredFrame.of(Frame(i * 10, 10, 490_000, 0, 0, 0, KIND_RECORDS, payload), table)
        assert frame.payload == b"" and frame.source_bytes == len(payload)
        builder.add(frame)
        assert len(builder._tables) == (i + 1) % 8, "the columns of every full row group were written out"
    assert builder.size == 20 * len(payload)  # target_object_bytes still measures the input
    parquet = pq.ParquetFile(pa.BufferReader(builder.finish()))
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)] == [80, 80, 40]
    assert parquet.read(columns=["seq"]).column("seq").to_pylist() == list(range(200))
    assert parquet.schema_arrow.metadata == CURATED_SCHEMA.metadata


def test_a_curated_object_keeps_statistics_where_queries_filter_and_none_for_the_maps():
    """Athena prunes row groups by event_time, device and request; the maps' statistics prune nothing."""
    from gateway.durable.wal import KIND_RECORDS, Frame
    from gateway.lake.curated import ParquetBuilder, ScoredFrame

    builder = ParquetBuilder()
    rows = [curated_row(seq) | {"tags": [("fw", "1.4.2")]} for seq in range(50)]
    builder.add(ScoredFrame.of(Frame(0, 50, 490_000, 0, 0, 0, KIND_RECORDS, b"x"), pa.Table.from_pylist(rows, schema=CURATED_SCHEMA)))
    group = pq.ParquetFile(pa.BufferReader(builder.finish())).metadata.row_group(0)
    stats = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(group.num_columns)}
    assert stats["event_time"] and stats["device_id"] and stats["seq"] and stats["ingest_id"] and stats["inference.status"]
    assert group.column(list(stats).index("seq")).statistics.max == 49
    assert not any(stats[path] for path in stats if path.startswith(("metrics.", "tags."))), stats


def test_a_small_curated_object_is_written_without_dictionaries_and_a_large_one_with_them():
    """A backfill lands an object per hour of a few records each: over so few rows a dictionary costs
    bytes and CPU; over many rows of few distinct values (devices, zones) it saves bytes."""
    from gateway.durable.wal import KIND_RECORDS, Frame
    from gateway.lake.curated import SMALL_OBJECT_ROWS, ParquetBuilder, ScoredFrame

    def encodings(rows: int) -> tuple[str, ...]:
        builder = ParquetBuilder()
        for first in range(0, rows, 10):
            table = pa.Table.from_pylist([curated_row(seq) for seq in range(first, first + 10)], schema=CURATED_SCHEMA)
            builder.add(ScoredFrame.of(Frame(first, 10, 490_000, 0, 0, 0, KIND_RECORDS, b"x"), table))
        parquet = pq.ParquetFile(pa.BufferReader(builder.finish()))
        assert parquet.read(columns=["seq"]).column("seq").to_pylist() == list(range(rows))
        return parquet.metadata.row_group(0).column(CURATED_SCHEMA.names.index("device_id")).encodings

    assert not any("DICTIONARY" in e for e in encodings(50))
    assert any("DICTIONARY" in e for e in encodings(SMALL_OBJECT_ROWS + 10))


def test_an_empty_curated_object_is_a_valid_parquet_file():
    from gateway.lake.curated import ParquetBuilder

    parquet = pq.ParquetFile(pa.BufferReader(ParquetBuilder().finish()))
    assert parquet.metadata.num_rows == 0 and parquet.schema_arrow.equals(CURATED_SCHEMA)


def test_an_object_open_across_many_reads_of_a_few_records_holds_few_tables():
    """A backfill's object gets a record or two per read; each frame's table is a slice of its read's
    columns. After each read they become one table, and the tables of several reads one table."""
    from gateway.durable.wal import KIND_RECORDS, Frame
    from gateway.lake.curated import SMALL_TABLES_HELD, ParquetBuilder, ScoredFrame

    builder = ParquetBuilder()
    seq = 0
    for read in range(40):
        whole_read = pa.Table.from_pylist([curated_row(seq=seq + k) for k in range(50)], schema=CURATED_SCHEMA)
        for k in range(2):  # two one-record frames of this object in a read of 50 records
            builder.add(ScoredFrame.of(Frame(seq, 1, 490_000, 0, 0, 0, KIND_RECORDS, b"x"), whole_read.slice(k, 1)))
        builder.settle()
        seq += 50
        assert len(builder._tables) <= SMALL_TABLES_HELD + 1
        assert all(chunk.offset == 0 for t in builder._tables for chunk in t.column("seq").chunks), "copies, no slices of a read"
    expected = [read * 50 + k for read in range(40) for k in range(2)]
    assert pq.read_table(pa.BufferReader(builder.finish())).column("seq").to_pylist() == expected


def test_frames_of_many_records_are_not_copied_after_a_read():
    from gateway.durable.wal import KIND_RECORDS, Frame
    from gateway.lake.curated import ParquetBuilder, ScoredFrame

    builder = ParquetBuilder()
    table = pa.Table.from_pylist([curated_row(seq=k) for k in range(300)], schema=CURATED_SCHEMA)
    for k in range(3):
        builder.add(ScoredFrame.of(Frame(k * 100, 100, 490_000, 0, 0, 0, KIND_RECORDS, b"x"), table.slice(k * 100, 100)))
    builder.settle()
    assert len(builder._tables) == 3, "a live read's frames are written as they are, without a copy"
    assert pq.read_table(pa.BufferReader(builder.finish())).column("seq").to_pylist() == list(range(300))


def test_small_chunks_are_scored_together_in_order_and_large_ones_alone():
    """A backfill's frames hold a record or two each: their chunks are joined (up to 256 records)
    so an inference column is built per run of them, with every record where it was."""
    import numpy as np

    from connectors.inference.base import ShapedBatch
    from gateway.lake.curated import COALESCED_CHUNK_RECORDS, coalesce_chunks

    def chunk(first: int, n: int, rejected: dict[int, str] | None = None) -> ShapedBatch:
        kept = [i for i in range(n) if i not in (rejected or {})]
        x = np.array([[first + i] for i in kept], dtype=np.float32).reshape(len(kept), 1)
        return ShapedBatch(x, np.array(kept, dtype=np.int64), np.zeros((len(kept), 1), bool), rejected or {}, n, ("t",))

    chunks = [chunk(0, 2), chunk(2, 3, {1: "missing metrics: t"}), chunk(5, 1), chunk(6, 300), *[chunk(306 + 2 * i, 2) for i in range(200)]]
    joined = coalesce_chunks(chunks)
    assert [c.n_records for c in joined[:3]] == [6, 300, COALESCED_CHUNK_RECORDS]
    assert sum(c.n_records for c in joined) == sum(c.n_records for c in chunks)
    first = joined[0]
    assert first.features[:, 0].tolist() == [0, 1, 2, 4, 5] and first.rows.tolist() == [0, 1, 2, 4, 5]
    assert first.rejected == {3: "missing metrics: t"}
    assert joined[1] is chunks[3], "a frame of many records is scored as it is"
    every_record = [int(v) for c in joined for v in c.features[:, 0]]
    assert every_record == [v for v in range(706) if v != 3]
