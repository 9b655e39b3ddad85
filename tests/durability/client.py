"""An independent device client, written from the device API contract (docs/device-api.md) alone.

Nothing here imports the gateway: the signature, the body format and the retry behaviour are
re-implemented from the contract, so a bug shared by the gateway's own signing helper and its
verifier cannot hide here.

    X-Device-Id: <device_id>
    X-Timestamp: <unix seconds>
    X-Signature: v1=<hex HMAC-SHA256(key, "<ts>\\n<METHOD>\\n<path>\\n<sha256 hex of the body as sent>")>

A device behaves like real firmware: it sends requests with increasing ``seq``; when the connection
drops, the request times out, or the answer is 500/502/503/504 (or 429), it sends the *same body*
again, freshly signed (and with the same ``Idempotency-Key`` if it used one), until it gets 202 or
its deadline passes. Every outcome is written to a :class:`Ledger`, the ground truth the lake is
checked against.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import io
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TELEMETRY_PATH = "/v1/telemetry"
NDJSON = "application/x-ndjson"

# Statuses a device answers by sending the same body again.
RETRYABLE = frozenset({429, 500, 502, 503, 504})

FEATURES = ("temperature_c", "humidity_pct", "pressure_hpa", "battery_v", "rssi_dbm", "cpu_pct", "mem_pct", "uptime_s")

RecordKey = tuple[str, Any]  # (device_id, seq), or (device_id, probe tag) for records without a seq


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign(device_id: str, key: str, body: bytes, *, timestamp: int, method: str = "POST", path: str = TELEMETRY_PATH) -> dict[str, str]:
    """The HMAC ``v1`` headers for ``body`` (exactly the bytes sent)."""
    string_to_sign = f"{timestamp}\n{method.upper()}\n{path}\n{body_digest(body)}".encode()
    mac = hmac.new(key.encode(), string_to_sign, hashlib.sha256).hexdigest()
    return {"X-Device-Id": device_id, "X-Timestamp": str(timestamp), "X-Signature": f"v1={mac}"}


def ndjson(records: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def record_key(record: dict) -> RecordKey:
    """How the ledger and the lake readers name a record: its seq, else its ``probe`` tag."""
    if record.get("seq") is not None:
        return (record.get("device_id"), record["seq"])
    return (record.get("device_id"), (record.get("tags") or {}).get("probe"))


@dataclass
class Device:
    """One device: its identity, its key and its sequence counter (kept across gateway restarts)."""

    device_id: str
    key: str
    next_seq: int = 0
    # The device's wall clock (signatures and event times): the machine's, or one a test steps.
    clock: Callable[[], float] = field(default=time.time, repr=False)
    # Timestamps already used to sign each recent body: the gateway's replay guard refuses a
    # signature it has seen, and two attempts of one body signed in the same second would carry the
    # same one. Each attempt gets a timestamp no earlier attempt of that body used (a second or a few
    # back, well inside the +-300 s window).
    _signed: collections.OrderedDict[str, set[int]] = field(default_factory=collections.OrderedDict, repr=False)

    def records(
        self,
        n: int,
        *,
        ts_ms: int | None = None,
        hours_spread: int = 0,
        with_seq: bool = True,
        probe_prefix: str | None = None,
        rng: random.Random | None = None,
    ) -> list[dict]:
        """``n`` valid schema-v1 records; with ``hours_spread`` their event times span that many hours back."""
        rng = rng or random
        now_ms = int(self.clock() * 1000) if ts_ms is None else ts_ms
        out = []
        for i in range(n):
            ts = now_ms - (i % (hours_spread + 1)) * 3_600_000 if hours_spread else now_ms
            rec: dict[str, Any] = {
                "device_id": self.device_id,
                "ts": ts,
                "metrics": {
                    "temperature_c": round(rng.uniform(15, 30), 2),
                    "humidity_pct": round(rng.uniform(20, 80), 1),
                    "pressure_hpa": round(rng.uniform(990, 1030), 1),
                    "battery_v": round(rng.uniform(3.3, 4.2), 3),
                    "rssi_dbm": rng.randint(-90, -40),
                    "cpu_pct": round(rng.uniform(0, 100), 1),
                    "mem_pct": round(rng.uniform(0, 100), 1),
                    "uptime_s": rng.randint(0, 10**6),
                },
                "tags": {"fw": "2.4.1"},
            }
            if with_seq:
                rec["seq"] = self.next_seq
                self.next_seq += 1
            if probe_prefix is not None:
                rec["tags"]["probe"] = f"{probe_prefix}-{i}"
            out.append(rec)
        return out

    def headers_for(self, body: bytes, extra: dict[str, str] | None = None) -> dict[str, str]:
        digest = body_digest(body)
        used = self._signed.setdefault(digest, set())
        self._signed.move_to_end(digest)
        while len(self._signed) > 256:
            self._signed.popitem(last=False)
        ts = int(self.clock())
        while ts in used:
            ts -= 1
        used.add(ts)
        headers = {"Content-Type": NDJSON, **sign(self.device_id, self.key, body, timestamp=ts)}
        headers.update(extra or {})
        return headers


@dataclass
class Attempt:
    device_id: str
    started: float  # time.monotonic()
    latency: float
    status: int | str  # an HTTP status, or "timeout" / "connection"
    retry_after: str | None = None
    error: str = ""
    body_bytes: int = 0


@dataclass
class Answer:
    """The last answer to one request (after retries)."""

    status: int | str
    headers: dict[str, str]
    body: bytes
    attempts: int

    @property
    def ok(self) -> bool:
        return self.status == 202

    def json(self) -> Any:
        return json.loads(self.body)


class Ledger:
    """What the devices know: which records were acknowledged, which refused, and every attempt."""

    def __init__(self) -> None:
        self.sent: set[RecordKey] = set()
        self.acked: set[RecordKey] = set()
        # Records of requests whose every attempt got an explicit answer other than 202: by the
        # contract none of them may land. (An attempt that timed out or lost its connection may or
        # may not have been persisted, so such records are only "uncertain".)
        self.refused: set[RecordKey] = set()
        self.statuses: collections.Counter = collections.Counter()
        self.attempts: list[Attempt] = []
        self.acked_bytes = 0
        self.acked_requests = 0
        self.problems: list[str] = []

    @property
    def uncertain(self) -> set[RecordKey]:
        return self.sent - self.acked - self.refused

    def attempts_since(self, t: float) -> list[Attempt]:
        return [a for a in self.attempts if a.started >= t]

    def summary(self) -> str:
        statuses = dict(sorted(self.statuses.items(), key=lambda kv: str(kv[0])))
        slowest = max((a.latency for a in self.attempts), default=0.0)
        return (
            f"{len(self.sent)} records sent, {len(self.acked)} acked in {self.acked_requests} requests "
            f"({self.acked_bytes / 2**20:.1f} MiB), {len(self.refused)} refused, {len(self.uncertain)} uncertain; "
            f"attempt statuses {statuses}; slowest attempt {slowest:.2f} s"
        )


class DeviceClient:
    """Sends one device's requests to a gateway over HTTP/1.1, retrying like firmware does."""

    def __init__(
        self,
        base_url: str,
        device: Device,
        ledger: Ledger,
        *,
        timeout_secs: float = 10.0,
        fresh_connections: bool = False,
        max_retry_wait_secs: float = 0.5,
        retry_deadline_secs: float = 30.0,
    ) -> None:
        self.url = base_url.rstrip("/") + TELEMETRY_PATH
        self.device = device
        self.ledger = ledger
        self.timeout_secs = timeout_secs
        self.fresh_connections = fresh_connections
        self.max_retry_wait_secs = max_retry_wait_secs
        self.retry_deadline_secs = retry_deadline_secs
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DeviceClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=self.fresh_connections, limit=4),
            timeout=aiohttp.ClientTimeout(total=self.timeout_secs),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post_once(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[Attempt, Answer | None]:
        """One signed attempt; the answer is None when no HTTP answer came back."""
        assert self._session is not None, "use `async with DeviceClient(...)`"
        signed = self.device.headers_for(body, headers)
        started = time.monotonic()
        try:
            # Large bodies stream from a buffer (aiohttp warns that raw bytes would block its loop).
            data = io.BytesIO(body) if len(body) > 1024 * 1024 else body
            async with self._session.post(self.url, data=data, headers=signed) as resp:
                payload = await resp.read()
                attempt = Attempt(self.device.device_id, started, time.monotonic() - started, resp.status, resp.headers.get("Retry-After"))
                answer = Answer(resp.status, dict(resp.headers), payload, 1)
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutError subclasses
            attempt, answer = Attempt(self.device.device_id, started, time.monotonic() - started, "timeout", error=repr(exc)), None
        except (aiohttp.ClientError, ConnectionError) as exc:
            attempt, answer = Attempt(self.device.device_id, started, time.monotonic() - started, "connection", error=repr(exc)), None
        attempt.body_bytes = len(body)
        self.ledger.attempts.append(attempt)
        self.ledger.statuses[attempt.status] += 1
        if attempt.status == 503 and attempt.retry_after is None:
            self.ledger.problems.append(f"a 503 for {self.device.device_id} came without Retry-After")
        return attempt, answer

    async def send(
        self,
        records: Sequence[dict],
        *,
        body: bytes | None = None,
        idempotency_key: str | None = None,
        retry: bool = True,
        deadline_secs: float | None = None,
    ) -> Answer:
        """Send ``records`` (or exactly ``body``, which must encode them) until 202 or the deadline."""
        body = ndjson(records) if body is None else body
        keys = [record_key(r) for r in records]
        self.ledger.sent.update(keys)
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        deadline = time.monotonic() + (self.retry_deadline_secs if deadline_secs is None else deadline_secs)
        all_explicit = True
        attempts = 0
        answer: Answer | None = None
        last: Attempt | None = None
        while True:
            attempts += 1
            last, answer = await self.post_once(body, extra)
            if answer is None:
                all_explicit = False
            if last.status == 202:
                self.ledger.acked.update(keys)
                self.ledger.acked_bytes += len(body)
                self.ledger.acked_requests += 1
                answer.attempts = attempts
                return answer
            retryable = answer is None or last.status in RETRYABLE
            if not retry or not retryable or time.monotonic() >= deadline:
                break
            await asyncio.sleep(self._retry_wait(last.retry_after, attempts))
        if all_explicit:
            # A resend of records another request already got acknowledged refuses nothing of theirs.
            self.ledger.refused.update(k for k in keys if k not in self.ledger.acked)
        if answer is None:
            return Answer(last.status, {}, last.error.encode(), attempts)
        answer.attempts = attempts
        return answer

    def _retry_wait(self, retry_after: str | None, attempts: int) -> float:
        # Firmware honours Retry-After; the tests cap it so that a run stays short.
        backoff = min(self.max_retry_wait_secs, 0.02 * 2 ** min(attempts, 8))
        try:
            wanted = float(retry_after) if retry_after is not None else backoff
        except ValueError:
            wanted = backoff
        return min(self.max_retry_wait_secs, max(wanted, 0.0)) * random.uniform(0.5, 1.0)


async def run_devices(
    base_url: str,
    devices: Sequence[Device],
    ledger: Ledger,
    stop: asyncio.Event,
    *,
    records_per_request: int = 50,
    pause_secs: float = 0.0,
    hours_spread: int = 0,
    **client_options: Any,
) -> None:
    """Closed-loop load: each device sends request after request until ``stop`` is set.

    A device finishes the request it is sending (retries included) before it stops, so a restart of
    the gateway in between is ridden out the way real devices ride it out.
    """

    async def one(device: Device) -> None:
        rng = random.Random(device.device_id)
        async with DeviceClient(base_url, device, ledger, **client_options) as client:
            while not stop.is_set():
                await client.send(device.records(records_per_request, hours_spread=hours_spread, rng=rng))
                if pause_secs:
                    try:
                        await asyncio.wait_for(stop.wait(), pause_secs * rng.uniform(0.5, 1.5))
                    except TimeoutError:
                        pass

    await asyncio.gather(*(one(d) for d in devices))


class ReadinessProbe:
    """Polls ``GET /readyz`` in the background and remembers every answer (or failure to answer)."""

    def __init__(self, base_url: str, interval_secs: float = 0.1, timeout_secs: float = 10.0) -> None:
        self.url = base_url.rstrip("/") + "/readyz"
        self.interval = interval_secs
        self.timeout = timeout_secs
        self.answers: list[tuple[float, int | str, float]] = []  # (started, status, latency)
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> ReadinessProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    async with http.get(self.url) as resp:
                        await resp.read()
                        status: int | str = resp.status
                except TimeoutError:
                    status = "timeout"
                except (aiohttp.ClientError, ConnectionError):
                    status = "connection"
                self.answers.append((started, status, time.monotonic() - started))
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval)
                except TimeoutError:
                    pass

    def statuses(self) -> collections.Counter:
        return collections.Counter(s for _, s, _ in self.answers)
