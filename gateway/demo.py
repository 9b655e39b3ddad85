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
from gateway.auth.registry import add_device
from gateway.server import start_gateway
from gateway.settings import load_settings


def demo_config(root: Path, s3_endpoint: str | None = None) -> str:
    return _LOCAL_CONFIG.format(root=root) + (_S3_CONFIG.format(endpoint=s3_endpoint) if s3_endpoint else "")


_LOCAL_CONFIG = """
[listen]
host = "127.0.0.1"
port = 0

[gateway]
gateway_id = "demo-gw"
availability_zone = "local-1a"

[auth]
mode = "hmac"
registry_path = "{root}/devices.json"

[wal]
dir = "{root}/wal"

[lake]
dir = "{root}/lake"
target_object_bytes = 1048576
max_object_age_secs = 2.0

[drain]
deadline_secs = 10.0
"""

# The same flow through the real S3 API: moto's server stands in for S3, Glue and EventBridge.
_S3_CONFIG = """
[s3]
bucket = "demo-lake"
endpoint_url = "{endpoint}"
region = "us-east-1"
addressing_style = "path"

[glue]
database = "edge_demo"
endpoint_url = "{endpoint}"
region = "us-east-1"

[eventbridge]
endpoint_url = "{endpoint}"
region = "us-east-1"
"""


async def run_demo(
    root: Path, *, seconds: float, devices: int, requests_per_sec: float, records_per_request: int, s3_endpoint: str | None = None, out=sys.stdout
) -> dict:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    fleet = []
    for i in range(devices):
        device_id = f"demo-{i:04d}"
        key = add_device(root / "devices.json", device_id, {"site": f"site-{i % 3}", "model": "th-200"})
        fleet.append(simulator.SimulatedDevice(device_id, key))
    (root / "gateway.toml").write_text(demo_config(root, s3_endpoint))
    if s3_endpoint:
        (root / "gateway.toml").write_text((root / "gateway.toml").read_text().replace('[lake]\n', '[lake]\nkind = "s3"\n'))
    settings = load_settings(root / "gateway.toml", environ={})
    running = await start_gateway(settings)
    print(f"gateway listening on {running.url}; {devices} devices sending for {seconds:.0f} s", file=out)
    result = await simulator.drive(
        running.url,
        fleet,
        requests_per_sec=requests_per_sec,
        duration_secs=seconds,
        records_per_request=records_per_request,
        encoding="zstd",
        invalid_ratio=0.002,
    )
    print("draining ...", file=out)
    await running.stop()
    summary = await summarize_bucket(settings) if s3_endpoint else summarize_lake(root / "lake")
    p50 = simulator.percentile(result.latencies_secs, 0.5) * 1000
    p99 = simulator.percentile(result.latencies_secs, 0.99) * 1000
    print(
        f"\nsent {result.sent_records} records in {result.sent_requests} requests; "
        f"responses {dict(sorted(result.status_counts.items()))}; ack latency p50 {p50:.1f} ms, p99 {p99:.1f} ms",
        file=out,
    )
    glue_partitions = summary.pop("glue_partitions", [])
    where = f"s3://{settings.s3.bucket} (moto at {s3_endpoint})" if s3_endpoint else str(root / "lake")
    print(f"\nlake at {where}:", file=out)
    for zone, info in summary.items():
        print(f"  {zone:<11} {info['objects']:>4} objects  {info['records']:>8} records  {info['bytes']:>10} bytes", file=out)
        for partition in sorted(info["partitions"]):
            print(f"      {partition}", file=out)
    if s3_endpoint:
        print("\nGlue partitions: " + ", ".join(glue_partitions), file=out)
    for zone in ("raw", "curated"):
        sample = summary.get(zone, {}).get("sample")
        if sample:
            print(f"\none {zone} record, as landed:\n  " + sample, file=out)
    return {"load": result, "lake": summary}


def summarize_lake(lake: Path) -> dict:
    summary: dict[str, dict] = {}
    for path in sorted([*lake.rglob("*.ndjson.zst"), *lake.rglob("*.parquet")]):
        zone = path.relative_to(lake).parts[0]
        info = summary.setdefault(zone, {"objects": 0, "records": 0, "bytes": 0, "partitions": Counter()})
        lines = parquet_rows(path.read_bytes()) if path.suffix == ".parquet" else read_ndjson_zst(path)
        info["objects"] += 1
        info["records"] += len(lines)
        info["bytes"] += path.stat().st_size
        info["partitions"]["/".join(path.relative_to(lake).parts[:-1])] += 1
        if "sample" not in info and lines:
            info["sample"] = lines[0].decode()
    return summary


def read_ndjson_zst(path: Path) -> list[bytes]:
    return split_ndjson_zst(path.read_bytes())


def parquet_rows(body: bytes) -> list[bytes]:
    """Curated rows as JSON lines, so every zone prints the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(pa.BufferReader(body)).to_pylist()
    return [msgspec.json.encode(row) for row in rows]


def split_ndjson_zst(body: bytes) -> list[bytes]:
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True).read()
    return [line for line in data.split(b"\n") if line]


async def summarize_bucket(settings) -> dict:
    from aiobotocore.session import get_session

    summary: dict[str, dict] = {}
    s3cfg = settings.s3
    session = get_session()
    async with session.create_client("s3", endpoint_url=s3cfg.endpoint_url, region_name=s3cfg.region) as s3:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=s3cfg.bucket):
            for item in page.get("Contents", []):
                key = item["Key"]
                zone = key.split("/", 1)[0]
                info = summary.setdefault(zone, {"objects": 0, "records": 0, "bytes": 0, "partitions": Counter()})
                body = await (await s3.get_object(Bucket=s3cfg.bucket, Key=key))["Body"].read()
                lines = parquet_rows(body) if key.endswith(".parquet") else split_ndjson_zst(body)
                info["objects"] += 1
                info["records"] += len(lines)
                info["bytes"] += item["Size"]
                info["partitions"][f"s3://{s3cfg.bucket}/" + key.rsplit("/", 1)[0]] += 1
                if "sample" not in info and lines:
                    info["sample"] = lines[0].decode()
    if settings.glue:
        async with session.create_client("glue", endpoint_url=settings.glue.endpoint_url, region_name=settings.glue.region) as glue:
            found = []
            for table in ("raw_telemetry", "quarantine_telemetry"):
                parts = await glue.get_partitions(DatabaseName=settings.glue.database, TableName=table)
                found += [f"{settings.glue.database}.{table}/dt={p['Values'][0]}/hour={p['Values'][1]}" for p in parts["Partitions"]]
            summary["glue_partitions"] = found
    return summary


class MotoServer:
    """A local S3-compatible server (moto) on a free loopback port, stopped by PID."""

    def __init__(self, log_path: Path) -> None:
        import os
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log, stderr=self._log
        )
        # Dummy credentials: moto accepts any; the gateway reads them through the standard AWS chain.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        import aiohttp

        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as http:
            while asyncio.get_running_loop().time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto_server exited; is moto[server] installed?")
                try:
                    async with http.get(self.url + "/moto-api/") as resp:
                        if resp.status < 500:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    async def create_bucket(self, name: str) -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client("s3", endpoint_url=self.url, region_name="us-east-1") as s3:
            await s3.create_bucket(Bucket=name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
        self._log.close()


def decode_lines(lines: list[bytes]) -> list[dict]:
    return [msgspec.json.decode(line) for line in lines]


def main(root: Path, seconds: float, devices: int, rate: float, records: int, s3: bool = False) -> int:
    async def run() -> None:
        if not s3:
            await run_demo(root, seconds=seconds, devices=devices, requests_per_sec=rate, records_per_request=records)
            return
        root.mkdir(parents=True, exist_ok=True)
        moto = MotoServer(root.parent / "moto.log")
        try:
            await moto.wait_ready()
            await moto.create_bucket("demo-lake")
            await run_demo(root, seconds=seconds, devices=devices, requests_per_sec=rate, records_per_request=records, s3_endpoint=moto.url)
        finally:
            moto.stop()

    asyncio.run(run())
    return 0
