"""One abusive device against well-behaved ones: do the others keep their throughput?

    python -m benchmarks.abuse [--seconds 8] [--devices 8] [--rate 20] [--records 50]

Starts the gateway in its own process (per-device rate limits on), then runs two phases of the same
open-loop load from the polite devices (each signs fresh requests at a fixed rate): alone, and
beside an abuser sending as fast as it can from many connections. Reports the polite devices'
acknowledged records/s in both phases, their ratio, their p99 ack latency, and what the abuser got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from benchmarks.processes import free_port
from gateway.registry import add_device
from gateway.signing import sign_request


def write_config(root: Path, port: int, records_per_sec: float) -> Path:
    config = root / "gateway.toml"
    config.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {port}
[gateway]
gateway_id = "gw-abuse"
availability_zone = "bench-1a"
[auth]
registry_path = "{root / 'devices.json'}"
[wal]
dir = "{root / 'wal'}"
[lake]
dir = "{root / 'lake'}"
[rate_limits]
records_per_sec = {records_per_sec}
burst_records = {int(records_per_sec)}
"""
    )
    return config


def body(device_id: str, records: int) -> bytes:
    now = int(time.time() * 1000)
    return b"".join(
        orjson.dumps({"device_id": device_id, "ts": now, "seq": time.time_ns() + i, "metrics": {"temperature_c": 21.5, "rssi_dbm": -60.0}})
        + b"\n"
        for i in range(records)
    )


async def post(session: aiohttp.ClientSession, url: str, device_id: str, key: str, records: int) -> int:
    data = body(device_id, records)
    headers = {"Content-Type": "application/x-ndjson", **sign_request(device_id, key, data)}
    async with session.post(url, data=data, headers=headers) as resp:
        await resp.read()
        return resp.status


async def polite(url: str, devices: dict[str, str], rate: float, records: int, seconds: float) -> tuple[float, float]:
    """Open loop: each device sends `rate` requests/s whatever happens. Returns (records/s acked, p99 s)."""
    acked, latencies = 0, []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(device_id: str, key: str, due: float) -> None:
            nonlocal acked
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            status = await post(session, url, device_id, key, records)
            latencies.append(time.monotonic() - due)
            if status == 202:
                acked += records

        start = time.monotonic() + 0.1
        n = int(seconds * rate)
        await asyncio.gather(*(one(d, k, start + i / rate + j / (rate * len(devices))) for i in range(n) for j, (d, k) in enumerate(devices.items())))
    latencies.sort()
    return acked / seconds, latencies[int(len(latencies) * 0.99) - 1]


async def abuser(url: str, device_id: str, key: str, records: int, stop: asyncio.Event, concurrency: int = 32) -> Counter:
    statuses: Counter = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def loop() -> None:
            while not stop.is_set():
                statuses[await post(session, url, device_id, key, records)] += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return statuses


async def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{log.read_text()[-2000:]}")
            try:
                async with session.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the gateway is not ready after {timeout} s:\n{log.read_text()[-2000:]}")


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        root = Path(tmp)
        keys = {f"dev-{i}": add_device(root / "devices.json", f"dev-{i}", {}) for i in range(args.devices + 1)}
        abuser_id, abuser_key = "dev-0", keys.pop("dev-0")
        port = free_port()
        config = write_config(root, port, args.limit)
        with open(root / "gateway.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=log, stderr=log)
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, proc, root / "gateway.log")
            url = base + "/v1/telemetry"
            alone, alone_p99 = await polite(url, keys, args.rate, args.records, args.seconds)
            # The abuser runs in its own process, so it competes for the gateway, not for this event loop.
            abuse = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.abuse", "--abuse", url, abuser_id, abuser_key,
                 "--seconds", str(args.seconds + 1), "--abuser-records", str(args.abuser_records)],
                stdout=subprocess.PIPE,
            )
            await asyncio.sleep(0.5)
            shared, shared_p99 = await polite(url, keys, args.rate, args.records, args.seconds)
            out, _ = abuse.communicate(timeout=60)
            statuses = json.loads(out)
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "polite_devices": args.devices,
        "polite_offered_records_per_s": args.devices * args.rate * args.records,
        "polite_records_per_s_alone": round(alone, 1),
        "polite_records_per_s_with_abuser": round(shared, 1),
        "throughput_ratio": round(shared / alone, 3) if alone else None,
        "polite_p99_ack_ms_alone": round(alone_p99 * 1000, 2),
        "polite_p99_ack_ms_with_abuser": round(shared_p99 * 1000, 2),
        "abuser_statuses": dict(statuses),
        "per_device_limit_records_per_s": args.limit,
    }


async def _abuse_for(args: argparse.Namespace) -> dict:
    url, device_id, key = args.abuse
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(args.seconds, stop.set)
    return dict(await abuser(url, device_id, key, args.abuser_records, stop))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--devices", type=int, default=8, help="polite devices")
    p.add_argument("--rate", type=float, default=20.0, help="requests/s per polite device")
    p.add_argument("--records", type=int, default=50, help="records per polite request")
    p.add_argument("--abuser-records", type=int, default=500, help="records per abusive request")
    p.add_argument("--limit", type=float, default=2000.0, help="per-device records/s limit")
    p.add_argument("--abuse", nargs=3, metavar=("URL", "DEVICE", "KEY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.abuse:
        print(json.dumps(asyncio.run(_abuse_for(args))))
        return 0
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
