"""``edge-gateway demo``: the whole flow on the embedded default, in a few seconds.

Creates devices, starts the gateway on a free loopback port with a local lake directory, drives it
with simulated devices for a bounded time (a few records are deliberately invalid), drains, and
prints what landed where.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sys
from collections import Counter
from pathlib import Path

import msgspec
import zstandard

from gateway import simulator
from gateway.registry import add_device
from gateway.server import start_gateway
from gateway.settings import load_settings


def demo_config(root: Path) -> str:
    return f"""
[listen]
host = "127.0.0.1"
port = 0

[gateway]
gateway_id = "demo-gw"
availability_zone = "local-1a"

[auth]
mode = "hmac"
registry_path = "{root / 'devices.json'}"

[wal]
dir = "{root / 'wal'}"

[lake]
kind = "local"
dir = "{root / 'lake'}"
target_object_bytes = 1048576
max_object_age_secs = 2.0

[drain]
deadline_secs = 10.0
"""


async def run_demo(root: Path, *, seconds: float, devices: int, requests_per_s: float, records_per_request: int, out=sys.stdout) -> dict:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    fleet = []
    for i in range(devices):
        device_id = f"demo-{i:04d}"
        key = add_device(root / "devices.json", device_id, {"site": f"site-{i % 3}", "model": "th-200"})
        fleet.append(simulator.SimulatedDevice(device_id, key))
    (root / "gateway.toml").write_text(demo_config(root))
    settings = load_settings(root / "gateway.toml", environ={})
    running = await start_gateway(settings)
    print(f"gateway listening on {running.url}; {devices} devices sending for {seconds:.0f} s", file=out)
    result = await simulator.drive(
        running.url,
        fleet,
        requests_per_s=requests_per_s,
        duration_s=seconds,
        records_per_request=records_per_request,
        encoding="zstd",
        invalid_ratio=0.002,
    )
    print("draining ...", file=out)
    await running.stop()
    summary = summarize_lake(root / "lake")
    p50 = simulator.percentile(result.latencies_s, 0.5) * 1000
    p99 = simulator.percentile(result.latencies_s, 0.99) * 1000
    print(
        f"\nsent {result.sent_records} records in {result.sent_requests} requests; "
        f"responses {dict(sorted(result.status_counts.items()))}; ack latency p50 {p50:.1f} ms, p99 {p99:.1f} ms",
        file=out,
    )
    print(f"\nlake at {root / 'lake'}:", file=out)
    for zone, info in summary.items():
        print(f"  {zone:<11} {info['objects']:>4} objects  {info['records']:>8} records  {info['bytes']:>10} bytes", file=out)
        for partition in sorted(info["partitions"]):
            print(f"      {partition}", file=out)
    sample = summary.get("raw", {}).get("sample")
    if sample:
        print("\none raw record, as landed:\n  " + sample, file=out)
    return {"load": result, "lake": summary}


def summarize_lake(lake: Path) -> dict:
    summary: dict[str, dict] = {}
    for path in sorted(lake.rglob("*.ndjson.zst")):
        zone = path.relative_to(lake).parts[0]
        info = summary.setdefault(zone, {"objects": 0, "records": 0, "bytes": 0, "partitions": Counter()})
        lines = read_ndjson_zst(path)
        info["objects"] += 1
        info["records"] += len(lines)
        info["bytes"] += path.stat().st_size
        info["partitions"]["/".join(path.relative_to(lake).parts[:-1])] += 1
        if "sample" not in info and lines:
            info["sample"] = lines[0].decode()
    return summary


def read_ndjson_zst(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [line for line in io.BytesIO(data).read().split(b"\n") if line]


def decode_lines(lines: list[bytes]) -> list[dict]:
    return [msgspec.json.decode(line) for line in lines]


def main(root: Path, seconds: float, devices: int, rate: float, records: int) -> int:
    asyncio.run(run_demo(root, seconds=seconds, devices=devices, requests_per_s=rate, records_per_request=records))
    return 0
