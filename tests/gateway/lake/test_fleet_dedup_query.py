"""The lake-side answer to a retry that reached another instance: the curated dedup view.

Two gateways (two instances of a fleet) land the same records, as when a device lost an answer and
its retry went to another instance. The shipped view (deploy/athena/curated_deduplicated.sql) is
run on the curated Parquet they wrote, with DuckDB standing in for Athena (no AWS account here).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, record, signed
from tests.gateway.conftest import URL, ndjson

VIEW = Path(__file__).resolve().parents[3] / "deploy" / "athena" / "curated_deduplicated.sql"


async def land(root: Path, lake: Path, gateway_id: str, records: list[dict], http) -> None:
    env = make_env(root, n_devices=1, gateway={"gateway_id": gateway_id}, lake={"dir": str(lake), "max_object_age_secs": 0.1})
    running = await start_gateway(load_settings(env.config, environ={}))
    body = ndjson(*records)
    async with http.post(running.url + URL, data=body, headers=signed(env.device(), body)) as resp:
        assert resp.status == 202
    assert await running.stop()


async def test_the_view_keeps_one_copy_of_each_record_across_instances(tmp_path, http):
    lake = tmp_path / "lake"
    ts = 1_764_000_000_000
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    await land(tmp_path / "a", lake, "gw-a", [record(seq=s, ts=ts + s) for s in range(10)] + [record(ts=ts)], http)
    # The retry of seqs 5..9 reached the other instance; 10..14 are new; a seq-less record stays.
    await land(tmp_path / "b", lake, "gw-b", [record(seq=s, ts=ts + s) for s in range(5, 15)] + [record(ts=ts)], http)
    db = duckdb.connect()
    db.execute(f"CREATE VIEW curated_telemetry AS SELECT * FROM read_parquet('{lake}/curated/**/*.parquet', hive_partitioning = true)")
    assert db.execute("SELECT count(*) FROM curated_telemetry").fetchone()[0] == 22, "both instances landed the overlap"
    db.execute(VIEW.read_text())
    rows = db.execute(
        "SELECT seq, count(*), min(gateway_id) FROM curated_telemetry_deduplicated GROUP BY seq ORDER BY seq NULLS LAST"
    ).fetchall()
    assert [(seq, n) for seq, n, _ in rows] == [(s, 1) for s in range(15)] + [(None, 2)]
    assert {seq: gw for seq, _, gw in rows if seq is not None and 5 <= seq < 10} == {s: "gw-a" for s in range(5, 10)}, "the first arrival is kept"
