"""Finding 5, the rate-limit side: buckets lived in each worker's memory.

With ``listen.workers = 2`` a device got twice its limit, and a restart refilled every bucket. The
real ``edge-gateway serve`` runs here with two workers; the bucket barely refills during the test
(0.001 records/s), so whatever was let in is what the burst allowed.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp

from gateway.edge.ratelimit_store import AUTH_FAILURES, DEVICES
from tests.durability.client import Device, ndjson
from tests.durability.harness import ServeProcess, make_devices, write_gateway_config
from tests.gateway.conftest import free_port, make_env
from tests.gateway.edge.test_abuse import send

BURST = 20
FORGED_WAVE = 12  # failures cost the gateway little: a wider wave keeps both workers accepting
FORGERS = [f"127.0.0.{i}" for i in range(9, 19)]  # the readiness probes come from 127.0.0.1
WAVE = 4  # concurrent requests, so that a busy worker leaves the next connection to the other


async def post_one(device: Device, url: str, source: str | None = None) -> int:
    """One single-record request on a fresh connection (so the kernel spreads them across workers)."""
    body = ndjson(device.records(1))
    connector = aiohttp.TCPConnector(force_close=True, local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(url + "/v1/telemetry", data=body, headers=device.headers_for(body)) as resp:
            await resp.read()
            return resp.status


async def answered_per_worker(ops_url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(ops_url + "/metrics") as resp:
            text = await resp.text()
    per_worker: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('edge_gateway_http_requests_total{route="/v1/telemetry"'):
            worker = re.search(r'worker="(\d+)"', line).group(1)
            per_worker[worker] = per_worker.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return per_worker


async def test_a_devices_limit_holds_across_workers_and_restarts(tmp_path):
    port, ops_port = free_port(), free_port()
    (device,) = make_devices(tmp_path / "devices.json", 1)
    config = write_gateway_config(
        tmp_path,
        port,
        listen={"workers": 2},
        ops={"port": ops_port},
        rate_limits={"records_per_sec": 0.001, "burst_records": BURST, "bytes_per_sec": 1e9, "burst_bytes": 10**9},
    )
    serve = ServeProcess(config, port, tmp_path / "logs")
    try:
        serve.start(workers=2)
        statuses: list[int] = []
        # Until each worker has answered more requests than the burst (with a bucket per worker, each
        # would have let a whole burst in) and a whole wave is refused.
        for _ in range(80):
            wave = await asyncio.gather(*(post_one(device, serve.url) for _ in range(WAVE)))
            statuses += wave
            per_worker = await answered_per_worker(f"http://127.0.0.1:{ops_port}")
            if len(per_worker) == 2 and min(per_worker.values()) > BURST and wave == [429] * WAVE:
                break
        assert len(per_worker) == 2 and min(per_worker.values()) > BURST, f"both workers must take requests: {per_worker}"
        # The burst, plus what one wave let in while the bucket stood at zero before their charges.
        assert statuses.count(202) <= BURST + WAVE, f"{statuses.count(202)} accepted with a burst of {BURST}: {statuses}"

        assert serve.terminate() == 0
        serve.start(workers=2)
        after = [await post_one(device, serve.url) for _ in range(6)]
        assert after == [429] * 6, f"a restart refilled the bucket: {after}"
    finally:
        serve.kill()


async def test_a_restart_keeps_a_devices_bucket(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, rate_limits={"records_per_sec": 0.001, "burst_records": 3})
    gw = await start(env)
    assert [(await send(http, gw, env, "dev-1", n=1))[0] for _ in range(5)] == [202] * 4 + [429]
    await gw.stop()
    gw = await start(env)
    assert (await send(http, gw, env, "dev-1", n=1))[0] == 429, "a restart refilled the bucket"


async def test_the_shared_buckets_are_bounded(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=12, rate_limits={"records_per_sec": 0.001, "burst_records": 100, "max_tracked_devices": 4})
    gw = await start(env)
    for device_id in env.devices:
        assert (await send(http, gw, env, device_id))[0] == 202
    ledger_env = gw.gateway.ledger._env
    with ledger_env.begin() as txn:
        entries = txn.stat(ledger_env.open_db(DEVICES, txn=txn, create=False))["entries"]
    assert 0 < entries <= 4


async def test_a_sources_failed_authentications_are_counted_across_workers_and_restarts(tmp_path):
    port, ops_port = free_port(), free_port()
    (device,) = make_devices(tmp_path / "devices.json", 1)
    forger = Device(device.device_id, "not-the-key-" + "x" * 40)
    config = write_gateway_config(
        tmp_path, port, listen={"workers": 2}, ops={"port": ops_port},
        rate_limits={"auth_failures_per_sec": 0.001, "burst_auth_failures": BURST},
    )
    serve = ServeProcess(config, port, tmp_path / "logs")
    try:
        serve.start(workers=2)
        ops_url = f"http://127.0.0.1:{ops_port}"
        # Which worker accepts a connection is the kernel's choice: a source whose requests all went
        # to one worker proves nothing, so the next source address tries again (each has its own bucket).
        for source in FORGERS:
            before = await answered_per_worker(ops_url)
            statuses: list[int] = []
            for _ in range(80):  # until a whole wave is refused (later connections are refused on accept)
                wave = await asyncio.gather(*(post_one(forger, serve.url, source) for _ in range(FORGED_WAVE)))
                statuses += wave
                if wave == [429] * FORGED_WAVE:
                    break
            after = await answered_per_worker(ops_url)
            taken = [after.get(w, 0.0) - before.get(w, 0.0) for w in ("0", "1")]
            if min(taken) >= 4:
                break
        assert min(taken) >= 4, f"the kernel gave one worker every connection from {len(FORGERS)} sources: {taken}"
        # With a bucket per worker, each would have answered a whole burst of 401s.
        assert statuses.count(401) <= BURST + FORGED_WAVE, f"{statuses.count(401)} failures let through with a burst of {BURST}: {statuses}"
        assert serve.terminate() == 0
        serve.start(workers=2)
        restarted = [await post_one(forger, serve.url, source) for _ in range(4)]
        # Remembered: a bucket the failures drove into deficit stays there. One they emptied exactly
        # (its level 0, refilling while the gateway was down) may let one more failure through, no more.
        allowed = 1 if statuses.count(401) == BURST else 0
        assert restarted.count(401) <= allowed and restarted[allowed:] == [429] * (4 - allowed), (
            f"a restart forgot the source's failures: {restarted} after {statuses.count(401)} let through"
        )
        # The source is what is limited: the device with its key is refused from there, not from elsewhere.
        assert await post_one(device, serve.url, source) == 429
        assert await post_one(device, serve.url) == 202
    finally:
        serve.kill()
