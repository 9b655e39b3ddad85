"""Load generation that does not lie.

- Bodies are built and signed before the clock starts, so the generator's own CPU stays small
  (and is reported: a saturated generator is visible in the results).
- ``open_loop`` sends on a fixed schedule and measures latency from the *intended* send time, so a
  stalled server shows up as latency instead of silently lowering the offered load.
- ``closed_loop`` keeps N requests outstanding; it finds the maximum sustained throughput.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from gateway.simulator import SimulatedDevice


@dataclass
class Prepared:
    bodies: list[tuple[bytes, dict[str, str]]]
    records_per_request: int

    @property
    def bytes_per_request(self) -> float:
        return sum(len(b) for b, _ in self.bodies) / len(self.bodies)


def prepare(devices: list[SimulatedDevice], *, records_per_request: int, distinct: int = 64, encoding: str = "identity") -> Prepared:
    """Signed bodies to cycle through. Records carry no ``seq`` so repeats are not deduplicated."""
    bodies = []
    for i in range(distinct):
        device = devices[i % len(devices)]
        body, headers = device.request(records_per_request, encoding=encoding, with_seq=False)
        bodies.append((body, headers))
    return Prepared(bodies, records_per_request)


@dataclass
class Run:
    offered_rps: float | None
    duration_s: float
    records_per_request: int
    requests: int = 0
    records: int = 0
    bytes: int = 0
    statuses: dict[int | str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    generator_cpu_s: float = 0.0

    @property
    def records_per_s(self) -> float:
        return self.records / self.duration_s

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.duration_s / 1e6

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _send(session, url, body, headers, run: Run, started: float) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            run.statuses[resp.status] = run.statuses.get(resp.status, 0) + 1
            if resp.status == 202:
                run.requests += 1
                run.records += run.records_per_request
                run.bytes += len(body)
    except (aiohttp.ClientError, TimeoutError):
        run.statuses["error"] = run.statuses.get("error", 0) + 1
    run.latencies_s.append(time.perf_counter() - started)


async def closed_loop(url: str, prepared: Prepared, *, concurrency: int, duration_s: float) -> Run:
    run = Run(None, duration_s, prepared.records_per_request)
    cycle = itertools.cycle(prepared.bodies)
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        stop_at = time.perf_counter() + duration_s

        async def worker():
            while time.perf_counter() < stop_at:
                body, headers = next(cycle)
                await _send(session, url + "/v1/telemetry", body, headers, run, time.perf_counter())

        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.duration_s = time.perf_counter() - begin
    run.generator_cpu_s = time.process_time() - cpu0
    return run


async def open_loop(url: str, prepared: Prepared, *, requests_per_s: float, duration_s: float, max_inflight: int = 1024) -> Run:
    run = Run(requests_per_s, duration_s, prepared.records_per_request)
    cycle = itertools.cycle(prepared.bodies)
    interval = 1.0 / requests_per_s
    tasks: set[asyncio.Task] = set()
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_inflight), timeout=aiohttp.ClientTimeout(total=30)) as session:
        begin = time.perf_counter()
        n = 0
        while (intended := begin + n * interval) < begin + duration_s:
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body, headers = next(cycle)
            task = asyncio.create_task(_send(session, url + "/v1/telemetry", body, headers, run, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        run.duration_s = time.perf_counter() - begin
    run.generator_cpu_s = time.process_time() - cpu0
    return run
