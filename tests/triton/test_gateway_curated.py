"""The gateway scoring through a real Triton server (PyTriton on CPU), over gRPC and HTTP."""

from __future__ import annotations

import aiohttp
import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from connectors.inference.local_model import LocalModelInferencer
from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, record, signed

pytestmark = pytest.mark.triton

METRICS = ("temperature_c", "humidity_pct", "pressure_hpa", "battery_v", "rssi_dbm", "cpu_pct", "mem_pct", "uptime_s")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_curated_scores_come_from_triton_and_match_the_local_model(tmp_path, primary, protocol):
    env = make_env(tmp_path, inference={"backend": "triton"})
    url = primary.url(protocol)
    env.config.write_text(env.config.read_text() + f'\n[[inference.endpoints]]\nurl = "{url}"\nprotocol = "{protocol}"\n')
    running = await start_gateway(load_settings(env.config, environ={}))
    rng = np.random.default_rng(3)
    records = [record(seq=i, **{m: float(v) for m, v in zip(METRICS, rng.normal([21, 45, 1013, 3.9, -65, 20, 40, 86400], [3, 5, 5, 0.1, 5, 10, 10, 1000]))}) for i in range(64)]
    body = b"".join(orjson.dumps(r) + b"\n" for r in records)
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
            assert resp.status == 202
    await running.stop()
    rows = []
    for path in (env.lake / "curated").rglob("*.parquet"):
        rows.extend(pq.read_table(path).to_pylist())
    rows.sort(key=lambda r: r["seq"])
    assert [r["inference"]["status"] for r in rows] == ["ok"] * 64
    local = LocalModelInferencer()
    expected = (await local.infer(np.array([[dict(r["metrics"])[m] for m in METRICS] for r in rows], dtype=np.float32))).scores
    got = np.array([r["inference"]["score"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


async def test_a_slow_throttling_endpoint_never_makes_records_late_or_lost(tmp_path, slow_server):
    """The slow model sleeps 300 ms per call and queues at most two: the batcher backs off, what
    cannot make its deadline is deferred explicitly, and every record reaches the curated zone."""
    env = make_env(tmp_path, inference={"backend": "triton", "max_defer_secs": 1.5, "call_timeout_secs": 2.0, "max_wait_ms": 20.0})
    env.config.write_text(env.config.read_text() + f'\n[[inference.endpoints]]\nurl = "{slow_server.url("grpc")}"\nprotocol = "grpc"\n')
    running = await start_gateway(load_settings(env.config, environ={}))
    async with aiohttp.ClientSession() as http:
        for batch in range(20):
            records = [record(seq=batch * 10 + i, **{m: 1.0 for m in METRICS}) for i in range(10)]
            body = b"".join(orjson.dumps(r) + b"\n" for r in records)
            async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                assert resp.status == 202
    await running.stop()
    rows = []
    for path in (env.lake / "curated").rglob("*.parquet"):
        rows.extend(pq.read_table(path).to_pylist())
    assert sorted(r["seq"] for r in rows) == list(range(200))
    by_status = {}
    for r in rows:
        by_status.setdefault(r["inference"]["status"], []).append(r["inference"])
    assert set(by_status) <= {"ok", "deferred"} and by_status.get("ok"), {k: len(v) for k, v in by_status.items()}
    assert all(any(why in i["reason"] for why in ("deadline", "backpressure", "overload")) for i in by_status.get("deferred", []))
    assert all(i["score"] is not None for i in by_status["ok"])
