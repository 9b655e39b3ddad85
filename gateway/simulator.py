"""Simulated devices: signed NDJSON batches of plausible telemetry, sent open-loop.

Used by ``edge-gateway demo`` and by the benchmarks. Open loop means requests go out on a fixed
schedule whatever the gateway does, and latency is measured from the *intended* send time, so a
slow gateway cannot hide its slowness by slowing the generator (no coordinated omission).

The sending core is here once: ``paced`` (each intended send time of a schedule fixed in advance)
and ``send`` (one batch posted, its answer and its latency from the intended time). ``drive`` (the
demo) is built on them, and so are ``benchmarks.loadgen``'s open and closed loops.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import math
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson
import zstandard

from gateway.auth.signing import sign_request

METRIC_RANGES = {
    "temperature_c": (18.0, 26.0),
    "humidity_pct": (30.0, 60.0),
    "pressure_hpa": (1000.0, 1025.0),
    "battery_v": (3.6, 4.2),
    "rssi_dbm": (-80.0, -50.0),
    "cpu_pct": (5.0, 40.0),
    "mem_pct": (20.0, 60.0),
    "uptime_s": (1_000.0, 1_000_000.0),
}
_zstd = zstandard.ZstdCompressor(level=1)


@dataclass
class SimulatedDevice:
    device_id: str
    key: str | None
    seq: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def records(self, count: int, now: float, invalid_ratio: float = 0.0, with_seq: bool = True) -> list[dict]:
        out = []
        ts_ms = int(now * 1000)
        for _ in range(count):
            self.seq += 1
            metrics = {name: round(self.rng.uniform(lo, hi), 3) for name, (lo, hi) in METRIC_RANGES.items()}
            record = {"device_id": self.device_id, "ts": ts_ms, "metrics": metrics, "tags": {"fw": "1.4.2"}}
            if with_seq:
                record["seq"] = self.seq
            if invalid_ratio and self.rng.random() < invalid_ratio:
                record["metrics"] = {}  # a firmware bug: an empty metrics object
            out.append(record)
        return out

    def request(
        self, count: int, *, encoding: str = "identity", invalid_ratio: float = 0.0, with_seq: bool = True, now: float | None = None
    ) -> tuple[bytes, dict[str, str]]:
        now = time.time() if now is None else now
        body = b"\n".join(orjson.dumps(r) for r in self.records(count, now, invalid_ratio, with_seq)) + b"\n"
        headers = {"Content-Type": "application/x-ndjson"}
        if encoding == "gzip":
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        elif encoding == "zstd":
            body = _zstd.compress(body)
            headers["Content-Encoding"] = "zstd"
        if self.key is not None:
            headers.update(sign_request(self.device_id, self.key, body, now=now))
        return body, headers


@dataclass(slots=True)
class Answer:
    """One request's outcome: its HTTP status, or ``"error"`` when no answer came."""

    status: int | str
    body: bytes
    latency_secs: float  # from the intended send time to the answer (or the failure)
    error: str | None = None  # the exception's class name when ``status`` is "error"
    retry_after_secs: float | None = None  # what a 429 or 503 asked the device to wait


async def send(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], intended: float
) -> Answer:
    """POST one batch to ``url``/v1/telemetry; a connection failure or timeout is an answer, never raised."""
    try:
        async with session.post(url + "/v1/telemetry", data=body, headers=headers) as resp:
            payload = await resp.read()
            status = resp.status
            retry_after = resp.headers.get("Retry-After", "")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Answer("error", b"", time.perf_counter() - intended, type(exc).__name__)
    wait = float(retry_after) if retry_after.isascii() and retry_after.isdigit() else None
    return Answer(status, payload, time.perf_counter() - intended, retry_after_secs=wait)


async def paced(offsets: Iterable[float], begin: float) -> AsyncIterator[tuple[float, float]]:
    """Each ``(offset, intended)`` of a schedule once its time has come (``intended`` = ``begin`` + offset,
    on the ``time.perf_counter`` clock). The caller starts each request without waiting for it: open loop."""
    for offset in offsets:
        intended = begin + offset
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield offset, intended


@dataclass
class LoadResult:
    sent_requests: int = 0
    sent_records: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    accepted_records: int = 0
    latencies_secs: list[float] = field(default_factory=list)  # from intended send time to response
    errors: int = 0
    elapsed_secs: float = 0.0
    generator_cpu_secs: float = 0.0


async def drive(
    url: str,
    devices: list[SimulatedDevice],
    *,
    requests_per_sec: float,
    duration_secs: float,
    records_per_request: int,
    encoding: str = "identity",
    invalid_ratio: float = 0.0,
    max_inflight: int = 512,
    timeout_secs: float = 30.0,
) -> LoadResult:
    """Send signed batches at a fixed rate for a bounded time; every request is bounded too."""
    result = LoadResult()
    interval = 1.0 / requests_per_sec
    inflight = asyncio.Semaphore(max_inflight)
    tasks: set[asyncio.Task] = set()
    cpu0 = time.process_time()
    connector = aiohttp.TCPConnector(limit=max_inflight)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_secs)) as session:

        async def one(device: SimulatedDevice, intended: float) -> None:
            body, headers = device.request(records_per_request, encoding=encoding, invalid_ratio=invalid_ratio)
            try:
                answer = await send(session, url, body, headers, intended)
                if answer.status == "error":
                    result.errors += 1
                else:
                    result.status_counts[answer.status] = result.status_counts.get(answer.status, 0) + 1
                    if answer.status == 202:
                        result.accepted_records += orjson.loads(answer.body)["accepted"]
                result.latencies_secs.append(answer.latency_secs)
            finally:
                inflight.release()

        start = time.perf_counter()
        offsets = itertools.takewhile(lambda offset: offset < duration_secs, (n * interval for n in itertools.count()))
        async for _, intended in paced(offsets, start):
            await inflight.acquire()
            device = devices[result.sent_requests % len(devices)]
            task = asyncio.create_task(one(device, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            result.sent_requests += 1
            result.sent_records += records_per_request
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_secs)
        result.elapsed_secs = time.perf_counter() - start
    result.generator_cpu_secs = time.process_time() - cpu0
    return result


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN for no samples.

    The one percentile of the project: ``edge-gateway demo`` reports with it, and the benchmarks
    (``benchmarks.stats``) use it for every latency figure.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])
