"""``EventBridgePublisher``: one EventBridge event per landed lake object, for downstream jobs.

``object_landed()`` never blocks the landing path: it queues the event and returns. A background
task sends what is queued in ``PutEvents`` calls of up to 10 entries (the API's limit), resending
only the entries EventBridge reports as failed, under the shared retry policy. The queue is bounded:
when EventBridge is away for long, the oldest events beyond ``max_pending_events`` are dropped and
counted, because the objects themselves are safe in the lake and a notification must never hold
back the WAL.

Event (``detail-type`` = ``detail_type``, ``source`` = ``source``)::

    {"bucket": ..., "key": ..., "url": "s3://bucket/key", "zone": "raw", "dataset": "telemetry",
     "dt": "2024-05-01", "hour": "13", "records": 1000, "bytes": 123456, "etag": "...",
     "min_event_time": "2024-05-01T13:00:00.000Z", "max_event_time": "...",
     "min_event_ms": 1714568400000, "max_event_ms": 1714571999000, "first_lsn": 0, "last_lsn": 999}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from aiobotocore.session import AioSession
from msgspec import Meta

from connectors import aws
from connectors.base import LakeObject, LandedObject
from connectors.errors import ConnectorError, TransientError
from connectors.retry import RetryPolicy, RetrySettings, Sleep

log = logging.getLogger(__name__)

MAX_ENTRIES_PER_CALL = 10
# Per-entry error codes worth resending; any other code means the entry itself is bad.
RETRYABLE_ENTRY_CODES = frozenset({"InternalFailure", "ThrottlingException", "ServiceUnavailable"})


class EventBridgeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where landed-object events go."""

    event_bus_name: Annotated[str, Meta(min_length=1, max_length=1600)] = "default"
    source: Annotated[str, Meta(min_length=1, max_length=256)] = "edge-gateway"
    detail_type: Annotated[str, Meta(min_length=1, max_length=128)] = "Lake Object Landed"
    max_pending_events: Annotated[int, Meta(ge=MAX_ENTRIES_PER_CALL)] = 10_000
    region: str = ""
    endpoint_url: str = ""
    connect_timeout_secs: Annotated[float, Meta(gt=0)] = 5.0
    read_timeout_secs: Annotated[float, Meta(gt=0)] = 10.0
    retry: RetrySettings = RetrySettings()


@dataclass(slots=True)
class EventBridgeStats:
    events_sent: int = 0
    events_failed: int = 0  # rejected for good, or still failing at the retry deadline
    events_dropped: int = 0  # the queue was full
    calls: int = 0


class EventBridgePublisher:
    """Publishes one event per landed object, batched, off the landing path."""

    def __init__(
        self,
        settings: EventBridgeSettings,
        *,
        session: AioSession | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.stats = EventBridgeStats()
        self._session = session or aws.build_session()
        self._retry = RetryPolicy(settings.retry, sleep=sleep, rng=rng, clock=clock)
        self._endpoint = settings.endpoint_url or "events"
        self._pending: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        stack = contextlib.AsyncExitStack()
        config = aws.client_config(connect_timeout_secs=s.connect_timeout_secs, read_timeout_secs=s.read_timeout_secs)
        self._client = await stack.enter_async_context(
            aws.create_client(self._session, "events", config, region=s.region, endpoint_url=s.endpoint_url)
        )
        self._stack = stack
        self._sender = asyncio.create_task(self._send_forever(), name="eventbridge-publisher")

    def object_landed(self, obj: LakeObject, landed: LandedObject) -> None:
        """Queue the event for ``landed``; returns at once."""
        if len(self._pending) >= self.settings.max_pending_events:
            self._pending.popleft()
            self.stats.events_dropped += 1
        self._pending.append(self._entry(obj, landed))
        self._idle.clear()
        self._wakeup.set()

    async def flush(self, timeout_secs: float | None = None) -> bool:
        """Wait until every queued event was sent (or given up on); False if the timeout came first."""
        try:
            async with asyncio.timeout(timeout_secs):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_secs: float = 5.0) -> None:
        """Send what is queued within ``timeout_secs``, then stop."""
        if self._sender is not None:
            if not await self.flush(timeout_secs):
                log.warning("eventbridge: %d event(s) not sent at close", len(self._pending))
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def _entry(self, obj: LakeObject, landed: LandedObject) -> dict[str, Any]:
        bucket, key = _split_url(landed.url, landed.key)
        detail = {
            "bucket": bucket,
            "key": key,
            "url": landed.url,
            "zone": landed.zone,
            "dataset": obj.partition.dataset,
            "dt": obj.partition.dt,
            "hour": obj.partition.hour,
            "records": landed.records,
            "bytes": landed.bytes,
            "etag": landed.etag,
            "min_event_time": _iso_ms(obj.min_event_ms),
            "max_event_time": _iso_ms(obj.max_event_ms),
            "min_event_ms": obj.min_event_ms,
            "max_event_ms": obj.max_event_ms,
            "first_lsn": obj.first_lsn,
            "last_lsn": obj.last_lsn,
        }
        entry: dict[str, Any] = {
            "Source": self.settings.source,
            "DetailType": self.settings.detail_type,
            "Detail": json.dumps(detail, separators=(",", ":")),
            "EventBusName": self.settings.event_bus_name,
        }
        if bucket:
            entry["Resources"] = [f"arn:aws:s3:::{bucket}/{key}"]
        return entry

    async def _send_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(MAX_ENTRIES_PER_CALL, len(self._pending)))]
                try:
                    await self._send(batch)
                except Exception:
                    # A bug must not silently stop every later event (and hang flush()).
                    self.stats.events_failed += len(batch)
                    log.exception("eventbridge: could not send %d event(s)", len(batch))
            self._idle.set()

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        """One batch; only the failed entries are sent again."""
        remaining = batch

        async def attempt() -> None:
            nonlocal remaining
            self.stats.calls += 1
            try:
                response = await self._client.put_events(Entries=remaining)
            except Exception as exc:
                if not aws.is_vendor_error(exc):
                    raise
                raise aws.translate(exc, endpoint=self._endpoint) from exc
            retry: list[dict[str, Any]] = []
            for entry, result in zip(remaining, response.get("Entries", []), strict=False):
                code = result.get("ErrorCode")
                if not code:
                    self.stats.events_sent += 1
                elif code in RETRYABLE_ENTRY_CODES:
                    retry.append(entry)
                else:
                    self.stats.events_failed += 1
                    log.warning("eventbridge: entry rejected: %s %s", code, result.get("ErrorMessage", ""))
            remaining = retry
            if remaining:
                raise TransientError(f"{len(remaining)} PutEvents entries failed", endpoint=self._endpoint)

        try:
            await self._retry.run(attempt)
        except ConnectorError:
            # Only what is still unsent counts as failed here; the rest was sent or counted already.
            self.stats.events_failed += len(remaining)
            log.warning("eventbridge: gave up on %d event(s)", len(remaining))


def _split_url(url: str, fallback_key: str) -> tuple[str, str]:
    if url.startswith("s3://"):
        bucket, _, key = url[len("s3://") :].partition("/")
        return bucket, key
    return "", fallback_key


def _iso_ms(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
