"""A gateway started while its only Triton endpoint is still loading the model (a real PyTriton
server that loads its model late): not ready is not broken. Records wait for the endpoint instead of
failing, those that find none within their deadline land as deferred, and once the model is ready
records are scored, with every endpoint state change in the log."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
import pyarrow.parquet as pq
import pytest

from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, record, signed

pytestmark = pytest.mark.triton

METRICS = ("temperature_c", "humidity_pct", "pressure_hpa", "battery_v", "rssi_dbm", "cpu_pct", "mem_pct", "uptime_s")


async def _gateway_seeing_not_ready(tmp_path, late_server, caplog, **inference):
    """A gateway scoring on the late server only, once its log says the endpoint is not ready."""
    caplog.set_level(logging.INFO, logger="connectors.inference.pool")
    env = make_env(tmp_path, inference={"backend": "triton", "offload": "thread", **inference})
    url = late_server.server.url("grpc")
    env.config.write_text(env.config.read_text() + f'\n[[inference.endpoints]]\nurl = "{url}"\nprotocol = "grpc"\n')
    running = await start_gateway(load_settings(env.config, environ={}))
    try:
        await asyncio.wait_for(_log_line(caplog, "starting -> not ready"), timeout=60)
    except BaseException:
        await running.stop()
        raise
    return env, running


async def _post(running, env, first_seq: int, count: int) -> None:
    records = [record(seq=first_seq + i, **{m: 1.0 for m in METRICS}) for i in range(count)]
    body = b"".join(orjson.dumps(r) + b"\n" for r in records)
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
            assert resp.status == 202


def _inference(env) -> dict[int, dict]:
    rows = {}
    for path in (env.lake / "curated").rglob("*.parquet"):
        rows.update((r["seq"], r["inference"]) for r in pq.read_table(path).to_pylist())
    return rows


async def _log_line(caplog, text: str) -> None:
    while not any(text in r.getMessage() for r in caplog.records):
        await asyncio.sleep(0.05)


async def test_records_that_find_no_ready_endpoint_are_deferred_not_failed(tmp_path, late_server, caplog):
    env, running = await _gateway_seeing_not_ready(tmp_path, late_server, caplog, max_defer_secs=0.5)
    try:
        await _post(running, env, 0, 40)
    finally:
        await running.stop()
    inference = _inference(env)
    assert sorted(inference) == list(range(40))
    assert {i["status"] for i in inference.values()} == {"deferred"}, inference
    assert all("deadline" in i["reason"] for i in inference.values())
    assert not any("open" in r.getMessage() for r in caplog.records)  # the breaker was never tripped


async def test_records_are_scored_once_the_model_becomes_ready(tmp_path, late_server, caplog):
    env, running = await _gateway_seeing_not_ready(tmp_path, late_server, caplog, max_defer_secs=60.0)
    try:
        await _post(running, env, 0, 30)  # waits in the batcher: the only endpoint is not ready
        late_server.load()
        await _post(running, env, 30, 30)
        await asyncio.wait_for(_log_line(caplog, "not ready -> ready"), timeout=120)
    finally:
        await running.stop()  # drains: every record is scored or deferred before it returns
    inference = _inference(env)
    assert sorted(inference) == list(range(60))
    assert [inference[seq]["status"] for seq in range(60)] == ["ok"] * 60
    changes = [r.getMessage() for r in caplog.records if "inference endpoint" in r.getMessage()]
    assert changes[0].endswith("starting -> not ready (readiness check answered not ready)")
    assert changes[-1].endswith("not ready -> ready")
    assert not any("breaker" in line or "failing" in line for line in changes)
