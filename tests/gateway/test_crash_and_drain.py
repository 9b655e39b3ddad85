"""SIGKILL during load loses no acknowledged record and lands none twice; SIGTERM drains cleanly."""

from __future__ import annotations

import asyncio
import collections
import signal
import time

import aiohttp
import orjson
import pytest

from connectors.durable_files import ReservedStateFile
from tests.gateway.conftest import make_env, read_zone

pytestmark = pytest.mark.slow


async def load(url: str, devices, seconds: float, acked: set, statuses: collections.Counter, records_per_request: int = 20):
    """Closed-loop writers, one per device, recording exactly which (device, seq) were acknowledged."""
    stop_at = time.monotonic() + seconds

    async def writer(device):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while time.monotonic() < stop_at:
                body, headers = device.request(records_per_request)
                seqs = [orjson.loads(line)["seq"] for line in body.splitlines()]
                try:
                    async with http.post(url + "/v1/telemetry", data=body, headers=headers) as resp:
                        statuses[resp.status] += 1
                        if resp.status == 202:
                            acked.update((device.device_id, s) for s in seqs)
                except (aiohttp.ClientError, TimeoutError, ConnectionError):
                    statuses["error"] += 1
                    await asyncio.sleep(0.02)

    await asyncio.gather(*(writer(d) for d in devices))


def lake_counts(env) -> collections.Counter:
    return collections.Counter((line["device_id"], line["seq"]) for line in read_zone(env.lake, "raw"))


async def test_sigkill_during_load_loses_nothing_and_duplicates_nothing(tmp_path, gateway_process):
    env = make_env(
        tmp_path,
        n_devices=12,
        lake={"target_object_bytes": 48 * 1024, "max_object_age_secs": 0.2},
        wal={"segment_bytes": 256 * 1024},
    )
    gp = gateway_process(env)
    acked: set = set()
    statuses: collections.Counter = collections.Counter()
    devices = list(env.devices.values())
    for kill_after in (1.5, 1.0):
        gp.start()
        writers = asyncio.create_task(load(gp.url, devices, kill_after + 1.0, acked, statuses))
        await asyncio.sleep(kill_after)
        gp.signal(signal.SIGKILL)  # mid-load: requests in flight, objects half built, uploads running
        gp.wait(10)
        await writers
    gp.start()  # replays the WAL from each zone's committed position
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0
    counts = lake_counts(env)
    assert statuses[202] > 50, statuses
    missing = acked - set(counts)
    assert not missing, f"{len(missing)} acknowledged records never landed, e.g. {sorted(missing)[:5]}"
    twice = {k: v for k, v in counts.items() if v > 1}
    assert not twice, f"{len(twice)} records landed more than once, e.g. {list(twice.items())[:5]}"


async def test_sigterm_drains_inflight_requests_and_lands_everything(tmp_path, gateway_process):
    env = make_env(tmp_path, n_devices=6, lake={"target_object_bytes": 8 * 1024 * 1024, "max_object_age_secs": 3600.0})
    gp = gateway_process(env)
    gp.start()
    acked: set = set()
    statuses: collections.Counter = collections.Counter()
    writers = asyncio.create_task(load(gp.url, list(env.devices.values()), 3.0, acked, statuses))
    await asyncio.sleep(1.0)
    gp.signal(signal.SIGTERM)
    # While draining, the load balancer's health check sees 503 (until the listener closes).
    readiness = []
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            try:
                async with http.get(gp.url + "/readyz") as resp:
                    readiness.append(resp.status)
            except aiohttp.ClientError:
                break
            await asyncio.sleep(0.01)
    assert gp.wait(30) == 0
    await writers
    assert 200 not in readiness[1:], readiness
    counts = lake_counts(env)
    # Objects were open (an hour's age limit) at SIGTERM: the drain flushed them.
    assert acked and acked <= set(counts)
    assert max(counts.values()) == 1
    assert statuses[202] > 0 and statuses["error"] + statuses[503] > 0, statuses
    state_file = ReservedStateFile(env.root / "wal" / "consumers" / "raw.state")
    state = orjson.loads(state_file.open())
    state_file.close()
    assert state["sealed"] == [] and state["landed"] == {}


async def test_sighup_reloads_limits_without_dropping_connections(tmp_path, gateway_process):
    from tests.gateway.conftest import record, signed, write_config

    env = make_env(tmp_path, limits={"max_records_per_request": 5})
    gp = gateway_process(env)
    gp.start()
    body = b"".join(orjson.dumps(record(seq=i)) + b"\n" for i in range(8))
    async with aiohttp.ClientSession() as http:
        async with http.post(gp.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
            assert resp.status == 413
        write_config(env.root, limits={"max_records_per_request": 10})
        gp.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        status = 413
        while status == 413 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            async with http.post(gp.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                status = resp.status
        assert status == 202
    gp.signal(signal.SIGTERM)
    assert gp.wait(30) == 0
    assert "configuration reloaded" in gp.log_path.read_text()


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has installed a handler for ``sig`` (Linux: SigCgt in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


async def test_sigterm_while_starting_still_drains_and_exits_cleanly(tmp_path, gateway_process):
    """A supervisor may stop a worker it just restarted: the young worker must drain, not die."""
    import subprocess
    import sys

    env = make_env(tmp_path)
    log = open(tmp_path / "young.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(env.config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        proc.send_signal(signal.SIGHUP)  # would kill it with the default action
        proc.send_signal(signal.SIGTERM)  # while it is still importing and starting
        log.flush()
        assert "gateway started" not in (tmp_path / "young.log").read_text(), "the signals came too late to test this"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "young.log").read_text()
    assert '"msg":"gateway started"' in text and '"msg":"drained"' in text


async def test_a_start_that_fails_late_closes_what_it_started(tmp_path):
    """The ops port taken: start-up fails after the WAL, ledger and device listener started; all are closed again."""
    import socket

    from gateway.server import start_gateway
    from gateway.settings import load_settings
    from tests.gateway.conftest import make_env

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        env = make_env(tmp_path, ops={"host": "127.0.0.1", "port": taken.getsockname()[1]})
        with pytest.raises(OSError):
            await start_gateway(load_settings(env.config, environ={}))
    finally:
        taken.close()
    # Nothing is left holding the WAL directory's locks, the ledger or a port: the same start now works.
    running = await start_gateway(load_settings(env.config, environ={}))
    assert running.gateway.pipeline.wal.refusal() is None
    await running.stop()


async def test_the_curated_decoder_dies_with_a_gateway_killed_while_it_starts(tmp_path, gateway_process):
    """The decoder process imports for about a second; a gateway SIGKILLed meanwhile left it running
    (its parent-death signal was asked for too late), holding the resource tracker with it."""
    import psutil

    gp = gateway_process(make_env(tmp_path))
    gp.start()
    gateway = psutil.Process(gp.proc.pid)
    deadline = time.monotonic() + 10
    decoders: list[psutil.Process] = []
    while not decoders and time.monotonic() < deadline:
        decoders = [c for c in gateway.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
        await asyncio.sleep(0.01)
    assert decoders, "the gateway started no decoder process"
    gp.proc.send_signal(signal.SIGKILL)
    gp.proc.wait(10)
    _, alive = psutil.wait_procs(decoders, timeout=15)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"decoder processes outlived the gateway: {[p.pid for p in alive]}"
