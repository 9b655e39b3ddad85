"""A long fuzzing run against a real gateway: many generated requests, no 5xx, no crash, bounded RSS.

    python -m benchmarks.fuzz [--requests 100000] [--concurrency 16] [--seed 1]

Starts ``edge-gateway serve`` in its own process and sends it generated requests over loopback:
valid signed bodies and mutations of them (bit flips, truncations, splices, random bytes), every
body type and encoding, random and hostile headers (non-ASCII digits, huge values, wrong schemes,
other devices, disabled devices), broken compression, deep JSON, and a share of correct requests.
The hypothesis suites in tests/gateway/edge fuzz the decoders and the handler in-process; this run
checks the whole server for what only shows at volume. Prints the status counts, the gateway's
RSS at start, peak and end, and exits 1 on any 5xx, a dropped connection, or the process dying.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
import psutil
import zstandard

from benchmarks.abuse import wait_ready
from benchmarks.loadgen import closed_loop
from benchmarks.processes import free_port
from gateway.auth.registry import add_device, set_enabled
from gateway.auth.signing import sign_request

CONTENT_TYPES = ["application/x-ndjson", "application/json", "application/msgpack", "text/csv", "", "application/x-ndjson; charset=utf-8"]
ENCODINGS = ["", "gzip", "zstd", "br", "identity", "gzip, zstd"]


def config(root: Path, port: int) -> Path:
    path = root / "gateway.toml"
    path.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {port}
[gateway]
gateway_id = "gw-fuzz"
availability_zone = "fuzz-1a"
[auth]
registry_path = "{root / 'devices.json'}"
[wal]
dir = "{root / 'wal'}"
max_total_bytes = 536870912
[lake]
dir = "{root / 'lake'}"
[inference]
enabled = false
[rate_limits]
enabled = false
[log]
level = "WARNING"
"""
    )
    return path


class Generator:
    """Generated requests, one per ``next()``, for ``loadgen.closed_loop`` to send."""

    records_per_request = 0  # nothing to count per 202: the run reports statuses

    def __init__(self, rng: random.Random, keys: dict[str, str]) -> None:
        self.rng = rng
        self.keys = keys
        self.seq = 0

    def next(self) -> tuple[bytes, dict[str, str]]:
        device_id = self.rng.choice([*self.keys, "nobody"])
        data, ctype, encoding = self.body(device_id)
        return data, self.headers(device_id, data, ctype, encoding)

    def record(self, device_id: str) -> dict:
        r = self.rng
        self.seq += 1
        rec: dict = {"device_id": device_id, "ts": int(time.time() * 1000) + r.randint(-10**7, 10**7), "seq": self.seq,
                     "metrics": {r.choice(["t", "h", "p", "x" * r.randint(1, 200)]): r.choice([1.5, -2, 0, 1e308, 3])}}
        if r.random() < 0.2:
            rec[r.choice(["ts", "metrics", "seq", "device_id", "tags"])] = r.choice(
                [None, "", "2026-13-45T99:00:00Z", -1, 2**63 + 5, [], {}, "x" * 300, {"a": "b" * 2000}, "∞"]
            )
        return rec

    def body(self, device_id: str) -> tuple[bytes, str, str]:
        r = self.rng
        records = [self.record(device_id) for _ in range(r.randint(0, 20))]
        kind = r.choice(["ndjson", "json", "msgpack", "raw"])
        if kind == "ndjson":
            data, ctype = b"".join(orjson.dumps(x) + b"\n" for x in records), "application/x-ndjson"
        elif kind == "json":
            data, ctype = orjson.dumps(records if r.random() < 0.8 else (records[0] if records else 1)), "application/json"
        elif kind == "msgpack":
            import msgspec

            data, ctype = msgspec.msgpack.encode(records), "application/msgpack"
        else:
            data, ctype = r.randbytes(r.randint(0, 4096)), r.choice(CONTENT_TYPES)
        if r.random() < 0.05:
            data = b"[" * r.randint(1, 5000) + b"]" * r.randint(0, 5000)  # deep nesting
        data = self.mutate(data)
        encoding = r.choice(ENCODINGS)
        if encoding == "gzip":
            data = gzip.compress(data)
        elif encoding == "zstd":
            data = zstandard.ZstdCompressor().compress(data)
        if r.random() < 0.15:
            data = self.mutate(data)  # broken compression
        if r.random() < 0.05:
            ctype = r.choice(CONTENT_TYPES)
        return data, ctype, encoding

    def mutate(self, data: bytes) -> bytes:
        r = self.rng
        if not data or r.random() < 0.6:
            return data
        b = bytearray(data)
        for _ in range(r.randint(1, 8)):
            op = r.random()
            at = r.randrange(len(b)) if b else 0
            if op < 0.4 and b:
                b[at] ^= 1 << r.randrange(8)
            elif op < 0.6:
                del b[at:]
            elif op < 0.8:
                b[at:at] = r.randbytes(r.randint(1, 64))
            else:
                b[at:at] = b[: r.randint(0, len(b))]
        return bytes(b)

    def headers(self, device_id: str, data: bytes, ctype: str, encoding: str) -> dict[str, str]:
        r = self.rng
        key = self.keys.get(device_id, "unknown-key") if r.random() < 0.8 else "a-wrong-key"
        headers = {"Content-Type": ctype, **sign_request(device_id, key, data)}
        if encoding:
            headers["Content-Encoding"] = encoding
        choice = r.random()
        if choice < 0.03:
            headers["X-Timestamp"] = r.choice(["¹", "1e9", "-1", "", "9" * 40, " 1700000000", "0x10"])
        elif choice < 0.06:
            headers["X-Signature"] = r.choice(["v2=00", "v1=", "v1=zz", "=" * 100, "v1=" + "a" * 5000])
        elif choice < 0.08:
            headers.pop(r.choice(list(headers)))
        elif choice < 0.1:
            headers["X-Device-Id"] = r.choice(["", "a" * 300, "dév", "../etc", "dev-1"])
        if r.random() < 0.05:
            headers["Idempotency-Key"] = r.choice(["k", "k" * 1000, "ключ", "same"])
        return headers


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        keys = {f"dev-{i}": add_device(root / "devices.json", f"dev-{i}", {}) for i in range(4)}
        set_enabled(root / "devices.json", "dev-3", False)
        port = free_port()
        with open(root / "gateway.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config(root, port))], stdout=log, stderr=log)
        statuses: Counter = Counter()
        rss = []
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, proc, root / "gateway.log")
            process = psutil.Process(proc.pid)
            rss.append(process.memory_info().rss)
            gen = Generator(rng, keys)
            started = time.monotonic()

            async def sample() -> None:
                while proc.poll() is None:
                    rss.append(process.memory_info().rss)
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            sent = await closed_loop(base, gen, concurrency=args.concurrency, requests=args.requests)
            sampler.cancel()
            statuses.update({status: n for status, n in sent.statuses.items() if status != "error"})
            statuses.update({f"client_error:{name}": n for name, n in sent.errors.items()})
            elapsed = time.monotonic() - started
            alive = proc.poll() is None
            if alive:
                rss.append(process.memory_info().rss)
        finally:
            proc.terminate()
            proc.wait(60)
    server_errors = sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500 and s != 503)
    return {
        "requests": args.requests,
        "seconds": round(elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "server_errors": server_errors,
        "gateway_alive_at_end": alive,
        "rss_mib_start": round(rss[0] / 2**20, 1),
        "rss_mib_peak": round(max(rss) / 2**20, 1),
        "rss_mib_end": round(rss[-1] / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    failed = report["server_errors"] or not report["gateway_alive_at_end"] or any(k.startswith("client_error") for k in report["statuses"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
