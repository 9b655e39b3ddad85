"""Load generation that does not lie.

- Bodies are built before the clock starts and only made unique and signed as they go out (a few
  microseconds each), so the generator's own CPU stays small, and is reported: a saturated
  generator is visible in the results.
- ``open_loop`` sends on a schedule fixed in advance (evenly spaced, or Poisson arrivals from a
  seeded generator) and never waits for responses; latency is measured from the *intended* send
  time, so a stalled server (or a stalled generator) shows up as latency instead of silently
  lowering the offered load (no coordinated omission).
- ``closed_loop`` keeps N requests outstanding for a time or a number of requests; it finds the
  maximum sustained throughput (never used for latency figures), and it is the flood of the abuse
  benchmark and the sender of the fuzzing run, from any source of bodies with a ``next()``.

Both loops send through ``gateway.simulator``'s ``send`` (one request, its answer and latency), the
open loop paces its schedule with ``gateway.simulator.paced``: the demo's ``drive`` shares that core.
``poisson_arrivals`` is the one arrival process (the inference scenarios feed the batcher from it too).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import orjson

from benchmarks.stats import percentile
from gateway.auth.signing import SCHEME, signature
from gateway.simulator import SimulatedDevice, paced, send

REQUEST_TIMEOUT_S = 30.0


@dataclass
class _Template:
    device_id: str
    key: bytes | None
    prefix: bytes  # every record but the last, as NDJSON
    prefix_sha256: "hashlib._Hash"
    last: dict  # the last record, rendered anew for every request
    forwarded_for: str | None = None  # the device's address as a load balancer in front would pass it
    # With seqs: the body around each record's ``seq`` value, numbered anew for every request.
    around_seqs: list[bytes] | None = None


@dataclass
class Prepared:
    """Request bodies, each made unique and signed anew as it is sent.

    The gateway refuses a signature it has already seen (replay guard), so no two requests may carry
    the same body in the same second. Each body is a fixed prefix (its hash state computed once)
    plus a last record whose tags carry a request counter; sending one costs a small
    ``orjson.dumps``, a hash update of ~200 bytes and one HMAC, a few microseconds.
    """

    templates: list[_Template]
    records_per_request: int
    _sent: int = 0  # requests built or turns let pass: the next template is this one, cycled
    _next_seq: dict[str, int] = field(default_factory=dict)  # per device, with seqs

    @property
    def bytes_per_request(self) -> float:
        return sum(len(self._render(t, 0)[0]) for t in self.templates) / len(self.templates)

    def device_of_next(self) -> str:
        """The device whose request ``next()`` builds next (a fleet that backs off skips its turn)."""
        return self.templates[self._sent % len(self.templates)].device_id

    def skip(self) -> None:
        """Let the next device's turn pass without a request."""
        self._sent += 1

    def next(self) -> tuple[bytes, dict[str, str]]:
        n = self._sent
        self._sent += 1
        t = self.templates[n % len(self.templates)]
        body, digest = self._render(t, n)
        headers = {"Content-Type": "application/x-ndjson"}
        if t.forwarded_for is not None:
            headers["X-Forwarded-For"] = t.forwarded_for
        if t.key is not None:
            ts = str(int(time.time()))
            headers.update({
                "X-Device-Id": t.device_id,
                "X-Timestamp": ts,
                "X-Signature": f"{SCHEME}={signature(t.key, ts, 'POST', '/v1/telemetry', digest.hexdigest())}",
            })
        return body, headers

    def _render(self, t: _Template, n: int) -> tuple[bytes, "hashlib._Hash"]:
        """Request ``n``'s body from template ``t``, and its SHA-256 state."""
        if t.around_seqs is None:
            last = orjson.dumps({**t.last, "tags": {**t.last.get("tags", {}), "req": str(n)}}) + b"\n"
            digest = t.prefix_sha256.copy()
            digest.update(last)
            return t.prefix + last, digest
        first = self._next_seq.get(t.device_id, 0)
        self._next_seq[t.device_id] = first + self.records_per_request
        parts: list[bytes] = [b""] * (2 * self.records_per_request + 1)
        parts[0::2] = t.around_seqs
        parts[1::2] = [b"%d" % seq for seq in range(first, first + self.records_per_request)]
        body = b"".join(parts)
        return body, hashlib.sha256(body)


def prepare(devices: list[SimulatedDevice], *, records_per_request: int, distinct: int = 64,
            behind_proxy: bool = False, with_seq: bool = False) -> Prepared:
    """Body templates to cycle through. Records carry no ``seq`` unless ``with_seq``: then each
    device numbers its records without gaps across its requests, as devices do, and the gateway
    remembers every one in its retry ledger (the body is numbered and hashed whole as it goes out,
    about 70 us more per request of 300 records).
    ``behind_proxy``: each device has an address of its own, sent as ``X-Forwarded-For`` (what an ALB
    in front adds), so per-source limits see devices rather than the one loopback address."""
    templates = []
    now = time.time()
    for i in range(distinct):
        index = i % len(devices)
        device = devices[index]
        records = device.records(records_per_request, now, with_seq=False)
        prefix = b"".join(orjson.dumps(r) + b"\n" for r in records[:-1])
        address = f"10.{index // 62500}.{index // 250 % 250}.{index % 250 + 1}" if behind_proxy else None
        around_seqs = _around_seqs(records) if with_seq else None
        templates.append(_Template(device.device_id, device.key.encode() if device.key else None, prefix,
                                   hashlib.sha256(prefix), records[-1], address, around_seqs))
    return Prepared(templates, records_per_request)


def _around_seqs(records: list[dict]) -> list[bytes]:
    """The NDJSON of ``records`` cut where each one's ``seq`` value goes: one part more than records."""
    parts = [b""]
    for record in records:
        line = orjson.dumps({**record, "seq": 0})
        cut = line.rindex(b'"seq":0') + len(b'"seq":')
        parts[-1] += line[:cut]
        parts.append(line[cut + 1:] + b"\n")
    return parts


class Bodies(Protocol):
    """What a loop sends: ``next()`` gives one request's body and headers."""

    records_per_request: int

    def next(self) -> tuple[bytes, dict[str, str]]: ...


@dataclass
class Run:
    offered_rps: float | None
    duration_secs: float
    records_per_request: int
    sent: int = 0
    requests: int = 0  # answered 202
    records: int = 0  # accepted records (202 only)
    bytes: int = 0
    statuses: dict[int | str, int] = field(default_factory=dict)
    latencies_secs: list[float] = field(default_factory=list)
    latencies_by_status: dict[int | str, list[float]] = field(default_factory=dict)  # the same, by answer
    # (intended send time relative to the start, latency, status) of each measured request.
    timeline: list[tuple[float, float, int | str]] | None = None
    send_lag_secs: list[float] = field(default_factory=list)  # actual send - intended send
    # Turns a device let pass because a 429/503 asked it to wait (``honor_retry_after``): not sent.
    deferred: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # what the "error" answers were, by exception name
    generator_cpu_secs: float = 0.0

    @property
    def records_per_sec(self) -> float:
        return self.records / self.duration_secs if self.duration_secs else float("nan")

    @property
    def mb_per_sec(self) -> float:
        return self.bytes / self.duration_secs / 1e6 if self.duration_secs else float("nan")

    @property
    def generator_cpu_share(self) -> float:
        """The generator's CPU time per second of wall time: near 1.0 means it was saturated."""
        return self.generator_cpu_secs / self.duration_secs if self.duration_secs else float("nan")

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies_secs, q) * 1000

    def latencies_of(self, *statuses: int | str) -> list[float]:
        return [latency for s in statuses for latency in self.latencies_by_status.get(s, ())]

    def share(self, *statuses: int | str) -> float:
        total = sum(self.statuses.values())
        return sum(self.statuses.get(s, 0) for s in statuses) / total if total else float("nan")


async def _send(session, url, body, headers, run: Run, intended: float, begin: float, measured: bool,
                not_before: dict[str, float] | None = None) -> None:
    """One request through the simulator's ``send``, its answer counted into ``run``; with
    ``not_before``, a refusal's Retry-After is noted for the device as the time it may send again."""
    answer = await send(session, url, body, headers, intended)
    status, latency = answer.status, answer.latency_secs
    if not_before is not None and answer.retry_after_secs is not None:
        device = headers.get("X-Device-Id", "")
        not_before[device] = max(not_before.get(device, 0.0), time.perf_counter() + answer.retry_after_secs)
    if answer.error is not None:
        run.errors[answer.error] = run.errors.get(answer.error, 0) + 1
    run.statuses[status] = run.statuses.get(status, 0) + 1
    if status == 202:
        run.requests += 1
        run.records += run.records_per_request
        run.bytes += len(body)
    if measured:
        run.latencies_secs.append(latency)
        run.latencies_by_status.setdefault(status, []).append(latency)
        if run.timeline is not None:
            run.timeline.append((intended - begin, latency, status))


async def closed_loop(
    url: str,
    prepared: Bodies,
    *,
    concurrency: int,
    duration_secs: float = math.inf,
    requests: int | None = None,
    local_addr: tuple[str, int] | None = None,
) -> Run:
    """``concurrency`` requests outstanding until ``duration_secs`` has passed or ``requests`` were sent,
    whichever comes first; ``local_addr`` sends from another source address."""
    run = Run(None, duration_secs, prepared.records_per_request)
    cpu0 = time.process_time()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency, local_addr=local_addr)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        begin = time.perf_counter()
        stop_at = begin + duration_secs

        async def worker():
            while time.perf_counter() < stop_at and (requests is None or run.sent < requests):
                body, headers = prepared.next()
                run.sent += 1
                await _send(session, url, body, headers, run, time.perf_counter(), begin, True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.duration_secs = time.perf_counter() - begin
    run.generator_cpu_secs = time.process_time() - cpu0
    return run


def schedule(requests_per_sec: float, duration_secs: float, *, arrivals: str = "poisson", seed: int = 0) -> list[float]:
    """Intended send offsets (seconds from the start), fixed before the first request goes out."""
    if requests_per_sec <= 0:
        raise ValueError("requests_per_sec must be > 0")
    if arrivals == "fixed":
        n = int(duration_secs * requests_per_sec)
        return [i / requests_per_sec for i in range(n)]
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be 'poisson' or 'fixed', not {arrivals!r}")
    return poisson_arrivals(requests_per_sec, duration_secs, seed=seed)


def poisson_arrivals(peak_per_sec: float, duration_secs: float, *, seed: int, rate: Callable[[float], float] | None = None) -> list[float]:
    """Poisson arrival offsets at ``peak_per_sec``; with ``rate(t)`` (at most the peak) a time-varying
    rate, by thinning the process at the peak."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak_per_sec)
        if t >= duration_secs:
            return out
        if rate is None or rng.random() * peak_per_sec <= rate(t):
            out.append(t)


async def open_loop(
    url: str,
    prepared: Prepared,
    *,
    requests_per_sec: float,
    duration_secs: float,
    arrivals: str = "poisson",
    seed: int = 0,
    warmup_secs: float = 0.0,
    max_inflight: int = 1024,
    keep_timeline: bool = False,
    drain_secs: float = 10.0,
    honor_retry_after: bool = False,
) -> Run:
    """Send on a precomputed schedule for ``duration_secs``; requests intended before ``warmup_secs`` are
    sent but not measured. After the schedule, outstanding requests get ``drain_secs`` to finish.
    ``honor_retry_after``: like devices that follow the API, one refused with Retry-After lets its
    turns pass until then (counted in ``Run.deferred``); otherwise every turn is sent."""
    run = Run(requests_per_sec, duration_secs, prepared.records_per_request, timeline=[] if keep_timeline else None)
    offsets = schedule(requests_per_sec, duration_secs, arrivals=arrivals, seed=seed)
    tasks: dict[asyncio.Task, tuple[float, bool]] = {}
    cpu0 = time.process_time()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_inflight), timeout=timeout) as session:
        begin = time.perf_counter()
        not_before: dict[str, float] | None = {} if honor_retry_after else None
        async for offset, intended in paced(offsets, begin):
            run.send_lag_secs.append(time.perf_counter() - intended)
            if not_before and not_before.get(prepared.device_of_next(), 0.0) > time.perf_counter():
                prepared.skip()
                run.deferred += 1
                continue
            body, headers = prepared.next()
            run.sent += 1
            task = asyncio.create_task(
                _send(session, url, body, headers, run, intended, begin, offset >= warmup_secs, not_before))
            tasks[task] = (intended, offset >= warmup_secs)
            task.add_done_callback(lambda t: tasks.pop(t, None))
        if tasks:
            await asyncio.wait(set(tasks), timeout=drain_secs)
        run.duration_secs = time.perf_counter() - begin
        # Requests still unanswered are abandoned, never dropped from the figures: each counts as
        # "unfinished" with its latency so far (a lower bound), so a stall cannot hide in the tail.
        now = time.perf_counter()
        for task, (intended, measured) in list(tasks.items()):
            task.cancel()
            run.statuses["unfinished"] = run.statuses.get("unfinished", 0) + 1
            if measured:
                run.latencies_secs.append(now - intended)
                if run.timeline is not None:
                    run.timeline.append((intended - begin, now - intended, "unfinished"))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    run.generator_cpu_secs = time.process_time() - cpu0
    return run
