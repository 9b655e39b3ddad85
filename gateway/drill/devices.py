"""Simulated devices for the drill: signed requests at a steady rate, retried the way firmware does.

Each device sends a request of ``records_per_request`` records (increasing ``seq``) on its own
schedule. When the connection drops, the attempt times out, or the answer is 429/500/502/503/504,
it sends the *same body* again (freshly signed, same ``Idempotency-Key``), honouring
``Retry-After``, until it gets a 202 or gives the request up. Every attempt is logged with the
zone that answered it (HAProxy's ``X-Drill-Served-By``): the log is the ground truth the lake is
checked against, and the timeline is drawn from it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from gateway.drill.fleet import SERVED_BY
from gateway.drill.settings import LoadSettings
from gateway.auth.signing import sign_request

TELEMETRY_PATH = "/v1/telemetry"
RETRYABLE = frozenset({429, 500, 502, 503, 504})
# No decision came back from an instance: it may have persisted the request before it was lost.
AMBIGUOUS = frozenset({"timeout", "connection", 502, 504})

Key = tuple[str, int]  # (device_id, seq)


class Clock:
    """Drill time: seconds since the drill started (monotonic), convertible to wall-clock time."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wall(self, t: float) -> float:
        return self.t0_wall + t

    def from_wall(self, wall: float) -> float:
        return wall - self.t0_wall


@dataclass(slots=True)
class Attempt:
    started: float
    ended: float
    status: int | str  # an HTTP status, or "timeout" / "connection"
    served_by: str  # the zone that answered ("" unknown, "<NOSRV>" no instance available)
    retry_after: str | None = None
    error: str = ""  # why no HTTP answer came back


@dataclass(slots=True)
class Request:
    device_id: str
    first_seq: int
    count: int
    scheduled: float
    attempts: list[Attempt] = field(default_factory=list)
    acked_at: float | None = None
    acked_by: str = ""
    gave_up: bool = False
    accepted: int = 0
    duplicates: int = 0

    def keys(self) -> list[Key]:
        return [(self.device_id, s) for s in range(self.first_seq, self.first_seq + self.count)]

    @property
    def acked(self) -> bool:
        return self.acked_at is not None

    @property
    def ambiguous(self) -> bool:
        """An attempt ended without an instance's decision: it may have landed besides the ack."""
        return any(a.status in AMBIGUOUS for a in self.attempts)

    @property
    def refused(self) -> bool:
        """Never acknowledged, and every attempt got an explicit answer: none of it may land."""
        return not self.acked and bool(self.attempts) and not self.ambiguous


@dataclass
class Device:
    device_id: str
    key: str
    next_seq: int = 0
    requests: list[Request] = field(default_factory=list)

    def records(self, n: int, rng: random.Random) -> tuple[int, bytes]:
        first = self.next_seq
        now_ms = int(time.time() * 1000)
        lines = []
        for seq in range(first, first + n):
            lines.append(json.dumps({
                "device_id": self.device_id, "ts": now_ms, "seq": seq,
                "metrics": {
                    "temperature_c": round(rng.uniform(15, 30), 2), "humidity_pct": round(rng.uniform(20, 80), 1),
                    "pressure_hpa": round(rng.uniform(990, 1030), 1), "battery_v": round(rng.uniform(3.3, 4.2), 3),
                    "rssi_dbm": rng.randint(-90, -40), "cpu_pct": round(rng.uniform(0, 100), 1),
                    "mem_pct": round(rng.uniform(0, 100), 1), "uptime_s": rng.randint(0, 10**6),
                },
                "tags": {"source": "az-drill"},
            }, separators=(",", ":")))
        self.next_seq += n
        return first, ("\n".join(lines) + "\n").encode()


class Devices:
    """The simulated fleet of devices and the log of everything they sent."""

    def __init__(self, settings: LoadSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.devices: list[Device] = []

    def register(self, registry: Path, prefix: str = "drill-dev") -> None:
        from gateway.auth.registry import add_device

        for i in range(self.settings.devices):
            device_id = f"{prefix}-{i:03d}"
            key = add_device(registry, device_id, {"site": "az-drill", "model": "th-200"}, replace=True)
            self.devices.append(Device(device_id, key))

    # -- the log ----------------------------------------------------------------------------------

    def requests(self) -> Iterator[Request]:
        for device in self.devices:
            yield from tuple(device.requests)

    def attempts(self) -> Iterator[tuple[Request, Attempt]]:
        for request in self.requests():
            for attempt in tuple(request.attempts):
                yield request, attempt

    def acked_keys(self, *, by: str | None = None, before: float | None = None) -> set[Key]:
        out: set[Key] = set()
        for request in self.requests():
            if not request.acked or (by is not None and request.acked_by != by):
                continue
            if before is not None and request.acked_at >= before:
                continue
            out.update(request.keys())
        return out

    # -- the load -----------------------------------------------------------------------------------

    async def run(self, url: str, stop: asyncio.Event) -> None:
        """Every device sends on its schedule until ``stop``; each finishes the request it has begun."""
        connector = aiohttp.TCPConnector(limit=max(8, 2 * len(self.devices)))
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(*(self._device(http, url, d, stop) for d in self.devices))

    async def _device(self, http: aiohttp.ClientSession, url: str, device: Device, stop: asyncio.Event) -> None:
        s = self.settings
        rng = random.Random(device.device_id)
        period = len(self.devices) / s.requests_per_sec
        next_at = self.clock.now() + rng.uniform(0, period)
        while not stop.is_set():
            delay = next_at - self.clock.now()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            first, body = device.records(s.records_per_request, rng)
            request = Request(device.device_id, first, s.records_per_request, next_at)
            device.requests.append(request)
            await self._send(http, url, device, request, body, rng)
            # A device that fell behind (long retries) does not burst to catch up.
            next_at = max(next_at + period, self.clock.now())

    async def _send(self, http: aiohttp.ClientSession, url: str, device: Device, request: Request, body: bytes,
                    rng: random.Random) -> None:
        s = self.settings
        deadline = self.clock.now() + s.retry_deadline_secs
        used: set[int] = set()
        timeout = aiohttp.ClientTimeout(total=s.request_timeout_secs)
        idempotency_key = f"{device.device_id}-{request.first_seq}"
        while True:
            # The gateway accepts each signature once: every attempt is signed with a timestamp no
            # earlier attempt of this body used (a second or a few back, inside the +-300 s window).
            ts = int(time.time())
            while ts in used:
                ts -= 1
            used.add(ts)
            headers = sign_request(device.device_id, device.key, body, now=ts) | {
                "Content-Type": "application/x-ndjson", "Idempotency-Key": idempotency_key}
            started = self.clock.now()
            retry_after = None
            served_by = error = ""
            try:
                async with http.post(url + TELEMETRY_PATH, data=body, headers=headers, timeout=timeout) as resp:
                    payload = await resp.read()
                    status: int | str = resp.status
                    served_by = resp.headers.get(SERVED_BY, "")
                    retry_after = resp.headers.get("Retry-After")
            except TimeoutError:
                status, error = "timeout", f"no answer within {s.request_timeout_secs:g} s"
            except (aiohttp.ClientError, ConnectionError) as exc:
                status, error = "connection", f"{type(exc).__name__}: {exc}"
            ended = self.clock.now()
            request.attempts.append(Attempt(started, ended, status, served_by, retry_after, error))
            if status == 202:
                request.acked_at, request.acked_by = ended, served_by
                try:
                    answer = json.loads(payload)
                    request.accepted, request.duplicates = int(answer.get("accepted", 0)), int(answer.get("duplicates", 0))
                except (ValueError, TypeError, AttributeError):
                    pass
                return
            if (isinstance(status, int) and status not in RETRYABLE) or ended >= deadline:
                request.gave_up = True
                return
            await asyncio.sleep(self._retry_wait(retry_after, len(request.attempts), rng))

    def _retry_wait(self, retry_after: str | None, attempts: int, rng: random.Random) -> float:
        cap = self.settings.max_retry_wait_secs
        backoff = min(cap, 0.05 * 2 ** min(attempts, 6))
        try:
            wanted = float(retry_after) if retry_after is not None else backoff
        except ValueError:
            wanted = backoff
        return min(cap, max(wanted, 0.05)) * rng.uniform(0.5, 1.0)
