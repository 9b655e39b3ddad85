"""The servers the HTTP scenarios drive, and the two measurements they all use.

``measure_max`` (closed loop) finds a server's maximum sustained throughput; ``measure_open`` (open
loop, Poisson arrivals, latency from the intended send time) measures it at a given offered load.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import urllib.request
from pathlib import Path

from benchmarks.gateway_metrics import samples, scrape
from benchmarks.loadgen import Prepared, Run, closed_loop, open_loop
from benchmarks.processes import Server, free_port, python
from benchmarks.stats import percentile, percentiles
from gateway.auth.registry import add_device
from gateway.simulator import SimulatedDevice

LATENCY_QUANTILES = (0.5, 0.9, 0.99, 0.999)

GATEWAY_CONFIG = """
[listen]
host = "127.0.0.1"
port = {port}
[ops]
host = "127.0.0.1"
port = {ops_port}
[gateway]
gateway_id = "bench"
availability_zone = "bench-1a"
[auth]
registry_path = "{root}/devices.json"
[wal]
dir = "{root}/wal"
max_total_bytes = {wal_bytes}
[lake]
dir = "{root}/lake"
max_object_age_secs = {object_age_secs}
[drain]
deadline_secs = 30.0
[log]
level = "WARNING"
"""


# The gateway as deployed: one ingest worker per vCPU (the edge_gateway role's default). The
# harness's and benchmarks.ingest's ``--workers`` set another count for every gateway they start.
workers_per_gateway = os.cpu_count() or 1


def make_devices(root: Path, n: int) -> list[SimulatedDevice]:
    devices = []
    for i in range(n):
        device_id = f"bench-{i:05d}"
        devices.append(SimulatedDevice(device_id, add_device(root / "devices.json", device_id, {"site": "bench"})))
    return devices


def write_gateway_config(root: Path, *, wal_bytes: int = 1 << 30, object_age_secs: float = 5.0, extra: str = "",
                         lake_kind: str = "local", workers: int | None = None) -> tuple[Path, int, int]:
    """The benchmark's gateway configuration: defaults everywhere except paths, ports and log level.

    ``extra`` is appended TOML (e.g. an ``[s3]`` section or ``[inference]`` endpoints). Returns the
    configuration and the ports of the device and ops (``/metrics``) listeners.
    """
    workers = workers_per_gateway if workers is None else workers
    port, ops_port = free_port(), free_port()
    config = root / "gateway.toml"
    text = GATEWAY_CONFIG.format(port=port, ops_port=ops_port, root=root, wal_bytes=wal_bytes, object_age_secs=object_age_secs)
    text = text.replace("[listen]\n", f"[listen]\nworkers = {workers}\n", 1)
    if lake_kind != "local":
        text = text.replace("[lake]\n", f'[lake]\nkind = "{lake_kind}"\n', 1)
    config.write_text(text + extra)
    return config, port, ops_port


def start_gateway(root: Path, wal_bytes: int = 1 << 30, *, extra: str = "", lake_kind: str = "local",
                  env: dict[str, str] | None = None, timeout: float = 30.0, workers: int | None = None) -> Server:
    """``edge-gateway serve`` with its WAL (and local lake) under ``root``; returns once ``/readyz`` answers."""
    config, port, ops_port = write_gateway_config(root, wal_bytes=wal_bytes, extra=extra, lake_kind=lake_kind, workers=workers)
    server = Server([python(), "-m", "gateway", "serve", "--config", str(config)], port, root / "gateway.log", env=env)
    server.ops_url = f"http://127.0.0.1:{ops_port}"  # where /metrics is served
    try:
        server.wait_ready(timeout)
        wait_for_every_worker(server.ops_url, workers_per_gateway if workers is None else workers, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_for_every_worker(ops_url: str, workers: int, timeout: float) -> None:
    """Until every worker (and the lake process) answers: ``/readyz`` answers once the first worker
    is up, and connections a run opens before the others are up would all stay with that one."""
    if workers <= 1:
        return
    deadline = time.monotonic() + timeout
    up: list = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(ops_url + "/metrics", timeout=2) as resp:
                up = samples(resp.read().decode(), "edge_gateway_worker_up")
        except OSError:
            up = []
        if len(up) >= workers and all(value == 1.0 for _, value in up):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not every worker was up after {timeout} s: {up}")


def start_ceiling(root: Path) -> Server:
    port = free_port()
    server = Server([python(), "-m", "benchmarks.ceiling_server", "--port", str(port)], port, root / "ceiling.log")
    server.wait_ready()
    return server


# How long a gateway may take, after a run, to land what it acknowledged before its CPU is read.
LANDED_TIMEOUT_SECS = 120.0


async def measure_max(server: Server, prepared: Prepared, seconds: float, concurrency: int,
                      landed_timeout_secs: float = LANDED_TIMEOUT_SECS) -> dict:
    """Closed-loop maximum: acked records/s over the run; records per CPU-second over the CPU every
    process spent from the start until every zone has landed what was acked (a gateway's landing
    may run behind its acks, and what it spends after the run is part of the records' cost)."""
    by_process0 = server.cpu_by_process()
    server.start_sampling()
    run = await closed_loop(server.url, prepared, concurrency=concurrency, duration_secs=seconds)
    peak = server.stop_sampling()
    during = {role: cpu_secs - by_process0.get(role, 0.0) for role, cpu_secs in server.cpu_by_process().items()}
    landed_in = await wait_until_landed(server, landed_timeout_secs)
    by_process = {role: cpu_secs - by_process0.get(role, 0.0) for role, cpu_secs in server.cpu_by_process().items()}
    cpu = sum(by_process.values())
    return {
        "records_per_sec": run.records_per_sec,
        "mb_per_sec": run.mb_per_sec,
        "requests_per_sec": run.requests / run.duration_secs,
        "server_cpu_secs": cpu,
        "cpu_secs_by_process": by_process,
        "server_cpu_share": sum(during.values()) / run.duration_secs,
        "landed_after_secs": landed_in,
        "records_per_cpu_secs": run.records / cpu if cpu else float("nan"),
        "peak_rss_mb": peak / 2**20,
        "p50_ms": run.percentile_ms(0.5),
        "p99_ms": run.percentile_ms(0.99),
        "generator_cpu_secs": run.generator_cpu_secs,
        "generator_cpu_share": run.generator_cpu_share,
        "statuses": {str(k): v for k, v in run.statuses.items()},
    }


async def wait_until_landed(server: Server, timeout_secs: float = LANDED_TIMEOUT_SECS) -> float:
    """Seconds until no zone of the gateway has a WAL backlog (0 for a server without one, NaN if
    the timeout passed first)."""
    ops_url = getattr(server, "ops_url", None)
    if ops_url is None:
        return 0.0
    started = time.monotonic()
    while time.monotonic() - started < timeout_secs:
        backlog = [value for _, value in samples(await scrape(ops_url), "edge_gateway_wal_backlog_bytes")]
        if backlog and not any(backlog):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    return math.nan


async def measure_sustained(server: Server, prepared: Prepared, seconds: float, concurrency: int, drain_timeout_secs: float = 600.0) -> dict:
    """The rate every zone keeps up with: records acked in a closed-loop run over the time until the
    last zone (scoring and Parquet included) has landed them. ``measure_max`` alone measures acks,
    which the WAL absorbs for a while even when a zone lands slower: an open loop at a share of that
    fills the WAL and is refused."""
    started = time.monotonic()
    result = await measure_max(server, prepared, seconds, concurrency, landed_timeout_secs=drain_timeout_secs)
    acked = result["records_per_sec"] * seconds
    elapsed = time.monotonic() - started
    return {**result, "ack_records_per_sec": result["records_per_sec"], "records_per_sec": acked / elapsed,
            "requests_per_sec": result["requests_per_sec"] * seconds / elapsed, "drained_in_secs": elapsed - seconds}


def open_result(run: Run, peak_rss: int, server_cpu_secs: float) -> dict:
    lat = percentiles(run.latencies_secs, LATENCY_QUANTILES, scale=1000.0)
    return {
        "offered_requests_per_sec": run.offered_rps,
        "offered_records_per_sec": (run.offered_rps or 0) * run.records_per_request,
        "goodput_records_per_sec": run.records_per_sec,
        **{f"{k}_ms": v for k, v in lat.items()},
        "peak_rss_mb": peak_rss / 2**20,
        "server_cpu_share": server_cpu_secs / run.duration_secs if run.duration_secs else math.nan,
        "shed_share": run.share(429, 503),
        # Turns devices let pass on a Retry-After (honor_retry_after), over every turn scheduled.
        "deferred_share": run.deferred / (run.deferred + run.sent) if run.deferred + run.sent else math.nan,
        # What an overload target asks of each answer: refusals fast, accepted requests never kept long.
        "refused_p99_ms": percentile(run.latencies_of(429, 503), 0.99) * 1000,
        "accepted_p99_ms": percentile(run.latencies_of(202), 0.99) * 1000,
        "accepted_max_ms": max(run.latencies_of(202), default=math.nan) * 1000,
        "error_share": run.share("error"),
        "unfinished_share": run.share("unfinished"),
        "other_status_share": 1.0 - run.share(202, 429, 503, "error", "unfinished") if run.statuses else math.nan,
        "generator_cpu_share": run.generator_cpu_share,
        "send_lag_p99_secs": percentile(run.send_lag_secs, 0.99),
        "statuses": {str(k): v for k, v in run.statuses.items()},
    }


async def measure_open(server: Server, prepared: Prepared, rps: float, seconds: float, *, warmup_secs: float = 0.0, seed: int = 0,
                       honor_retry_after: bool = False) -> dict:
    cpu0 = server.cpu_seconds()
    server.start_sampling()
    run = await open_loop(server.url, prepared, requests_per_sec=rps, duration_secs=seconds, warmup_secs=warmup_secs, seed=seed,
                          honor_retry_after=honor_retry_after)
    peak = server.stop_sampling()
    return open_result(run, peak, server.cpu_seconds() - cpu0)
