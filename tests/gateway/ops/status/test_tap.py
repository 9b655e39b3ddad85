"""``edge-gateway tap``: a sample of the records passing each stage, filtered by device."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest

from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import free_port, make_env, record, signed
from tests.gateway.conftest import ndjson

TOKEN = "t" * 32


def admin_env(tmp_path, **sections):
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    (tmp_path / "admin-token").chmod(0o600)
    port = free_port()
    env = make_env(tmp_path, admin={"enabled": True, "port": port, "token_path": str(tmp_path / "admin-token")}, **sections)
    return env, f"http://127.0.0.1:{port}"


async def test_tap_streams_each_stage_for_one_device(tmp_path):
    env, admin = admin_env(tmp_path, lake={"max_object_age_secs": 0.3})
    running = await start_gateway(load_settings(env.config, environ={}))
    events: list[dict] = []
    try:
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(admin + "/admin/tap?stage=nope", headers=headers) as resp:
                assert resp.status == 400 and "choose from" in (await resp.json())["message"]
            async with http.get(admin + "/admin/tap?stage=received") as resp:
                assert resp.status == 401
            url = admin + "/admin/tap?stage=received,quarantined,landed,scored&device=dev-2&rate=100"
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                assert resp.status == 200 and resp.content_type == "application/x-ndjson"
                await asyncio.sleep(0.3)  # the tap is reading from the WAL's end now
                for device_id in ("dev-1", "dev-2"):
                    body = ndjson(record(device_id, seq=7, temperature_c=20.5), record(device_id, seq=8) | {"metrics": {}})
                    async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(device_id), body)) as r:
                        assert r.status == 202
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    line = await asyncio.wait_for(resp.content.readline(), 20)
                    if line.strip():
                        events.append(orjson.loads(line))
                    stages = {(e["stage"], e.get("zone")) for e in events}
                    if {("received", None), ("quarantined", None), ("scored", None), ("landed", "raw"), ("landed", "curated"), ("landed", "quarantine")} <= stages:
                        break
    finally:
        await running.stop()
    by_stage = {(e["stage"], e.get("zone")): e for e in events}
    assert all(e["device_id"] == "dev-2" for e in events), events
    assert by_stage[("received", None)]["seq"] == 7 and by_stage[("received", None)]["record"]["metrics"] == {"temperature_c": 20.5}
    assert by_stage[("quarantined", None)]["reason"].startswith("invalid") or "metrics" in by_stage[("quarantined", None)]["reason"]
    assert by_stage[("scored", None)]["inference"]["status"] == "ok"
    assert by_stage[("landed", "raw")]["key"].startswith("raw/telemetry/dt=") and by_stage[("landed", "raw")]["seq"] == 7
    assert by_stage[("landed", "curated")]["key"].endswith(".parquet")


@pytest.mark.slow
async def test_tap_command_sees_every_worker(tmp_path, gateway_process):
    env, admin = admin_env(tmp_path, n_devices=4, listen={"workers": 2})
    gp = gateway_process(env)
    gp.start()
    async with aiohttp.ClientSession() as http:  # the first worker serves the admin listener; it may start last
        for _ in range(100):
            try:
                async with http.get(admin + "/status") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    out_file = open(tmp_path / "tap.out", "w")  # a pipe nobody reads yet would fill and stop the tap
    tap = subprocess.Popen(
        [sys.executable, "-m", "gateway", "tap", "--config", str(env.config), "--stage", "received,landed,scored", "--rate", "30", "--limit", "300"],
        stdout=out_file, stderr=subprocess.PIPE, text=True,
    )
    try:
        await asyncio.sleep(1.5)
        # A new connection per request, so that both workers take some (a kept-alive one stays on one).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            deadline = time.monotonic() + 20
            while tap.poll() is None and time.monotonic() < deadline:
                for device in env.devices.values():
                    body, headers = device.request(5)
                    async with http.post(gp.url + "/v1/telemetry", data=body, headers=headers) as resp:
                        assert resp.status == 202
                await asyncio.sleep(0.05)
            async with http.get(gp.ops_url + "/metrics") as resp:
                accepted = {line for line in (await resp.text()).splitlines() if line.startswith("edge_gateway_records_total")}
        _, err = tap.communicate(timeout=10)
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait()
        out_file.close()
    out = (tmp_path / "tap.out").read_text()
    assert tap.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 300 and {e["stage"] for e in events} == {"received", "landed", "scored"}, out[-2000:]
    # New connections land on either worker; the tap on worker 0's admin listener hears both.
    assert {e["worker"] for e in events if e["stage"] == "received"} == {0, 1}, (accepted, err)
    # The lake process lands and scores both workers' WALs: it answers for those stages.
    landed = [e for e in events if e["stage"] == "landed"]
    assert {e["zone"] for e in landed} == {"raw", "curated"} and {e["worker"] for e in landed} == {0, 1}
    assert all(f"-w{e['worker']}-" in e["key"] for e in landed)  # each matched in its own WAL's objects
    assert {e["worker"] for e in events if e["stage"] == "scored"} == {"lake"}


def test_status_snapshot_sums_workers_and_keeps_the_oldest_age():
    from gateway.ops.status.cluster import merge_expositions
    from gateway.ops.status.page import snapshot

    def worker(accepted: int, age: float) -> bytes:
        return (
            "# TYPE edge_gateway_records counter\n"
            f'edge_gateway_records_total{{outcome="accepted"}} {accepted}\n'
            "# TYPE edge_gateway_wal_oldest_unlanded_age_seconds gauge\n"
            f'edge_gateway_wal_oldest_unlanded_age_seconds{{consumer="raw"}} {age}\n'
            "# TYPE edge_gateway_wal_backlog_bytes gauge\n"
            'edge_gateway_wal_backlog_bytes{consumer="raw"} 100\n'
        ).encode()

    merged = merge_expositions({0: worker(5, 1.5), 1: worker(7, 9.0), 2: None})
    text = merged.decode()
    assert 'edge_gateway_records_total{outcome="accepted",worker="1"} 7.0' in text
    assert 'edge_gateway_worker_up{worker="2"} 0.0' in text
    snap = snapshot(merged)
    assert snap["records"] == {"accepted": 12.0}
    assert snap["zones"]["raw"] == {"backlog_bytes": 200.0, "oldest_age_secs": 9.0}
    assert snap["workers"] == {"up": 2, "total": 3}
    # The lake process (it lands every worker's WAL) is merged in too, and is no worker.
    snap = snapshot(merge_expositions({0: worker(5, 1.5), 1: worker(7, 9.0), "lake": worker(0, 20.0)}))
    assert snap["workers"] == {"up": 2, "total": 2} and snap["lake_up"] == 1
    assert snap["zones"]["raw"]["oldest_age_secs"] == 20.0


async def test_a_drain_never_waits_on_an_open_tap(tmp_path):
    env, admin = admin_env(tmp_path)
    running = await start_gateway(load_settings(env.config, environ={}))
    async with aiohttp.ClientSession() as http:
        async with http.get(admin + "/admin/tap?stage=received", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            started = time.monotonic()
            await asyncio.wait_for(running.stop(), 10)
            assert time.monotonic() - started < 5
            assert await asyncio.wait_for(resp.content.read(), 5) == b""  # the stream ended with the drain
