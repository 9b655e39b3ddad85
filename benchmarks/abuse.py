"""Abusive clients against well-behaved devices: do the others keep their throughput?

    python -m benchmarks.abuse [--seconds 8] [--devices 8] [--rate 20] [--records 50] [--attacks all]

Starts the gateway in its own process (per-device rate limits on) and runs the same open-loop load
from the polite devices (each signs fresh requests at a fixed rate, from 127.0.0.1): once alone,
then beside each attack, run from another process and a source address of its own (127.0.0.9 and up):

- ``flood``: a device with its own key sending as fast as it can from 32 connections;
- ``bomb``: unauthenticated zstd bombs (2 KiB that inflate to 64 MiB) signed with a wrong key for
  a known device, from 32 connections;
- ``slow-body``: 256 connections naming a known device, each sending one body byte and then one
  byte every 10 s (a slot grab);
- ``idle-sockets``: 512 sockets that connect and never send a byte, reopened as they are closed.

Reports, per attack, the polite devices' acknowledged records/s and p99 ack latency against a run
alone just before it (the targets: >= 95% of the throughput, p99 at most 2x), the cores the gateway
used in each, the attacker's own CPU seconds, and what the attacker got.
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
from statistics import median

import aiohttp
import psutil

from benchmarks.loadgen import closed_loop, open_loop, prepare
from benchmarks.processes import cpu_by_process, free_port
from benchmarks.stats import percentile
from gateway.auth.registry import add_device
from gateway.auth.signing import sign_request
from gateway.simulator import SimulatedDevice


def write_config(root: Path, port: int, records_per_sec: float) -> Path:
    config = root / "gateway.toml"
    config.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {port}
[ops]
port = 0
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


async def polite(url: str, devices: dict[str, str], rate: float, records: int, seconds: float) -> tuple[float, float]:
    """Open loop, evenly spaced: each device sends ``rate`` requests/s whatever happens. Returns
    (records/s acked, p99 ack latency in s, from the intended send time)."""
    fleet = prepare([SimulatedDevice(d, k) for d, k in devices.items()], records_per_request=records, distinct=len(devices))
    run = await open_loop(url, fleet, requests_per_sec=rate * len(devices), duration_secs=seconds, arrivals="fixed")
    return run.records / seconds, percentile(run.latencies_secs, 0.99)


ATTACKS = ("flood", "bomb", "slow-body", "idle-sockets")


def attacker_address(attack: str) -> str:
    """Each attack from an address of its own (127.0.0.9 and up): what one attack leaves behind on
    its source (failed authentications in deficit, refusals answered late) is not the next one's."""
    return f"127.0.0.{9 + ATTACKS.index(attack)}"


async def _repeat(concurrency: int, stop: asyncio.Event, step) -> None:
    """``concurrency`` loops, each awaiting ``step()`` again and again until ``stop``."""

    async def loop() -> None:
        while not stop.is_set():
            await step()

    await asyncio.gather(*(loop() for _ in range(concurrency)))


async def abuser(url: str, device_id: str, key: str, records: int, seconds: float, source: str, concurrency: int = 32) -> dict:
    """A device with its own key, sending signed requests as fast as ``concurrency`` connections go."""
    flood = prepare([SimulatedDevice(device_id, key)], records_per_request=records)
    run = await closed_loop(url, flood, concurrency=concurrency, duration_secs=seconds, local_addr=(source, 0))
    return run.statuses


class _Bombs:
    """Forged zstd bombs: 2 KiB that inflate to 64 MiB, signed anew with a key the device does not have."""

    records_per_request = 0

    def __init__(self, device_id: str) -> None:
        import zstandard

        self.device_id = device_id
        self.bomb = zstandard.ZstdCompressor().compress(b"\n" * (64 * 1024 * 1024))

    def next(self) -> tuple[bytes, dict[str, str]]:
        headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "zstd", **sign_request(self.device_id, "forged", self.bomb)}
        return self.bomb, headers


async def bomber(url: str, device_id: str, seconds: float, source: str, concurrency: int = 32) -> dict:
    """Forged zstd bombs: without the key, each should cost the gateway no more than hashing 2 KiB."""
    run = await closed_loop(url, _Bombs(device_id), concurrency=concurrency, duration_secs=seconds, local_addr=(source, 0))
    return run.statuses


async def _raw_connections(url: str, stop: asyncio.Event, connections: int, outcome: Counter, use, source: str) -> None:
    """``connections`` raw sockets from ``source``, each reopened once ``use(reader, writer)`` is done."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")

    async def step() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
        except OSError:
            outcome["connect_failed"] += 1
            await asyncio.sleep(0.25)
            return
        try:
            await use(reader, writer)
        except (ConnectionError, OSError):
            outcome["reset"] += 1
        writer.close()

    await _repeat(connections, stop, step)


async def slow_bodies(url: str, device_id: str, stop: asyncio.Event, source: str, connections: int = 256) -> Counter:
    """Requests that name a known device and then drip their body, one byte every 10 s."""
    outcome: Counter = Counter()

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: 100000\r\n"
            f"X-Device-Id: {device_id}\r\nX-Timestamp: {int(time.time())}\r\nX-Signature: v1=00\r\n\r\n{{".encode()
        )
        while not stop.is_set() and not reader.at_eof():
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), 10.0)
            except TimeoutError:
                writer.write(b" ")
                continue
            if line:
                outcome[line.split(b" ")[1].decode() if line.startswith(b"HTTP") else "closed"] += 1
            break

    await _raw_connections(url, stop, connections, outcome, drip, source)
    return outcome


async def idle_sockets(url: str, stop: asyncio.Event, source: str, sockets: int = 512) -> Counter:
    """Connections that never send a byte, reopened as soon as the gateway closes them."""
    outcome: Counter = Counter()

    async def sit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcome["opened"] += 1
        while not stop.is_set() and not reader.at_eof():
            try:
                await asyncio.wait_for(reader.read(1024), 0.5)
            except TimeoutError:
                continue

    await _raw_connections(url, stop, sockets, outcome, sit, source)
    return outcome


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
        report: dict = {"polite_devices": args.devices, "polite_offered_records_per_sec": args.devices * args.rate * args.records,
                        "per_device_limit_records_per_sec": args.limit}
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, proc, root / "gateway.log")
            gateway = psutil.Process(proc.pid)
            alone_runs: list[tuple[float, float]] = []
            for attack in args.attacks:
                # Paired: the polite load runs alone right before each attack, so drift in the machine
                # (disk, page cache, other tenants) lands in both sides of the ratio.
                cpu_before = sum(cpu_by_process(gateway).values())
                alone, alone_p99 = await polite(base, keys, args.rate, args.records, args.seconds)
                alone_cpu = sum(cpu_by_process(gateway).values()) - cpu_before
                alone_runs.append((alone, alone_p99))
                # The attacker runs in its own process, so it competes for the gateway, not for this event loop.
                attacker = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.abuse", "--abuse", attack, base, abuser_id, abuser_key,
                     "--seconds", str(args.seconds + 1.5), "--abuser-records", str(args.abuser_records)],
                    stdout=subprocess.PIPE,
                )
                await asyncio.sleep(1.0)  # let it reach full strength
                cpu_before = sum(cpu_by_process(gateway).values())
                shared, shared_p99 = await polite(base, keys, args.rate, args.records, args.seconds)
                shared_cpu = sum(cpu_by_process(gateway).values()) - cpu_before
                out, _ = attacker.communicate(timeout=120)
                got = json.loads(out)
                report[attack] = {
                    "polite_records_per_sec_alone": round(alone, 1),
                    "polite_p99_ack_ms_alone": round(alone_p99 * 1000, 2),
                    "polite_records_per_sec": round(shared, 1),
                    "throughput_ratio": round(shared / alone, 3) if alone else None,
                    "polite_p99_ack_ms": round(shared_p99 * 1000, 2),
                    "p99_ratio": round(shared_p99 / alone_p99, 2) if alone_p99 else None,
                    # Cores the gateway used: what the attack costs it, apart from the attacker's own CPU.
                    "gateway_cores_alone": round(alone_cpu / args.seconds, 3),
                    "gateway_cores_attacked": round(shared_cpu / args.seconds, 3),
                    "attacker_cpu_secs": got.pop("cpu_secs", None),
                    "attacker_got": got,
                }
                await asyncio.sleep(1.0)  # the gateway closes what the attacker left behind
            report["polite_records_per_sec_alone"] = round(median(r for r, _ in alone_runs), 1)
            report["polite_p99_ack_ms_alone"] = round(median(p for _, p in alone_runs) * 1000, 2)
        finally:
            proc.terminate()
            proc.wait(30)
    return report


async def _abuse_for(args: argparse.Namespace) -> dict:
    attack, url, device_id, key = args.abuse
    source = attacker_address(attack)
    if attack == "flood":
        return await abuser(url, device_id, key, args.abuser_records, args.seconds, source)
    if attack == "bomb":
        return await bomber(url, device_id, args.seconds, source)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(args.seconds, stop.set)
    if attack == "slow-body":
        return dict(await slow_bodies(url, device_id, stop, source))
    return dict(await idle_sockets(url, stop, source))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--devices", type=int, default=8, help="polite devices")
    p.add_argument("--rate", type=float, default=20.0, help="requests/s per polite device")
    p.add_argument("--records", type=int, default=50, help="records per polite request")
    p.add_argument("--abuser-records", type=int, default=500, help="records per abusive request")
    p.add_argument("--limit", type=float, default=2000.0, help="per-device records/s limit")
    p.add_argument("--attacks", default="all", help=f"comma-separated, from {', '.join(ATTACKS)} (default all)")
    p.add_argument("--abuse", nargs=4, metavar=("ATTACK", "URL", "DEVICE", "KEY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.attacks = ATTACKS if args.attacks == "all" else tuple(a for a in args.attacks.split(",") if a)
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    if args.abuse:
        got = asyncio.run(_abuse_for(args))
        print(json.dumps({**got, "cpu_secs": round(time.process_time(), 2)}))
        return 0
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
