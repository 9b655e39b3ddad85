"""``AnnouncingSink``: an ``ObjectSink`` that tells the catalog and EventBridge about what landed.

It wraps any sink (S3 or the local lake), so the pipeline keeps one ``put_object`` call::

    sink = AnnouncingSink(
        S3Sink(...), catalog=GlueCatalog(...), events=EventBridgePublisher(...), outbox_dir=wal_dir / "outbox"
    )

Order: the object lands first; only then is its partition queued and its event recorded, so
nothing downstream ever hears of an object that is not there.

Catalog (never on the landing path): ``put_object`` only puts the object's partition in a small
in-memory queue (skipped when the partition is registered or queued already) and returns. A
background task starts the catalog (retrying until Glue answers) and registers queued partitions,
one at a time; a failed partition stays queued. After a failure the task waits an exponential
backoff with full jitter (``catalog_retry_initial_secs`` doubling up to ``catalog_retry_max_secs``)
before its next attempt, whichever partition that is for, so a Glue outage costs one call per
backoff period and the landing path nothing; a partition that keeps failing while others succeed
(a broken table) backs off on its own. The queue holds at most ``catalog_queue_max_partitions`` entries (a
partition is an hour of one dataset in one zone, so there are few); a partition that finds it full
is counted and left out. ``close()`` tries every queued partition once more within
``close_timeout_secs`` and logs what is left. A partition that is never registered is not data
loss: its objects are in the lake, and the next landing in that partition (this process or any
other gateway) or a Glue crawler registers it; until then Athena does not see it.

Events, at least once (with ``outbox_dir``): the object's event is appended to a durable outbox
(``connectors.aws.eventbridge.EventOutbox``: write, fdatasync, directory fsync on file creation) before
``put_object`` returns, so the landing zone moves past the object only once its event is on disk.
A crash before that makes the zone land the same key again and record the event again; a crash
after it leaves the event in the outbox, and the next start sends it. Events carry a stable
``event_id`` (from the object's URL and ETag) for consumers to deduplicate. If the append fails
(ENOSPC, EIO), ``put_object`` raises ``TransientError`` although the object is in the lake: the
lander retries the call, and that retry records the event without uploading the object again.

Events without ``outbox_dir``: queued in memory by ``EventBridgePublisher.object_landed`` (a crash
loses what is queued, and a long outage drops the oldest), as before.

Counters for the gateway's metrics: ``stats`` (a dataclass of monotonic counters, read like every
connector's), ``catalog_queued`` / ``outbox_pending_files`` / ``outbox_pending_bytes`` (gauges), and
``catalog_failures`` / ``catalog_registered`` (the counters, as plain attributes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Protocol

import msgspec
from msgspec import Meta

from connectors.aws.eventbridge import EventBridgePublisher, EventOutbox, OutboxSettings
from connectors.base import LakeObject, LandedObject, ObjectSink, Partition
from connectors.errors import ConnectorError, PermanentError, TransientError
from connectors.retry import RetryPolicy, RetrySettings

log = logging.getLogger(__name__)

# Partitions known to be registered, so a later object in one queues nothing (a year of hourly
# partitions for a few datasets and zones fits many times).
REGISTERED_MAX = 100_000
# Objects landed whose event could not be recorded yet (the lander retries them); a few at most.
UNRECORDED_MAX = 1024


class PartitionCatalog(Protocol):
    async def start(self) -> None: ...

    async def partition_landed(self, partition: Partition) -> bool: ...

    async def close(self) -> None: ...


class LandedEvents(Protocol):
    async def start(self) -> None: ...

    def object_landed(self, obj: LakeObject, landed: LandedObject) -> None: ...

    async def close(self) -> None: ...


class AnnouncingSinkSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the catalog queue and the event outbox behave."""

    catalog_queue_max_partitions: Annotated[int, Meta(ge=1)] = 10_000
    # Wait before trying a failed partition again: full jitter, doubling up to the maximum.
    catalog_retry_initial_secs: Annotated[float, Meta(gt=0)] = 1.0
    catalog_retry_max_secs: Annotated[float, Meta(gt=0)] = 30.0
    # At close: how long the catalog queue and the outbox each get to finish.
    close_timeout_secs: Annotated[float, Meta(ge=0)] = 5.0
    outbox: OutboxSettings = OutboxSettings()

    def __post_init__(self) -> None:
        if self.catalog_retry_initial_secs > self.catalog_retry_max_secs:
            raise ValueError("catalog_retry_initial_secs must not exceed catalog_retry_max_secs")


@dataclass(slots=True)
class AnnouncingSinkStats:
    """Counters (monotonic since start); ``EventOutbox.stats`` has the outbox's own."""

    catalog_partitions_queued: int = 0  # partitions put in the queue
    catalog_partitions_registered: int = 0  # queued partitions the catalog confirmed
    catalog_failures: int = 0  # failed attempts (start or registration)
    catalog_queue_full: int = 0  # partitions left out because the queue was full
    events_recorded: int = 0  # events appended to the outbox
    event_record_failures: int = 0  # appends that failed (ENOSPC, EIO): put_object raised
    uploads_skipped: int = 0  # retried put_object calls whose object had landed already


@dataclass(slots=True, eq=False)
class _Queued:
    failures: int = 0
    due: float = 0.0  # clock() time of the next attempt


class AnnouncingSink:
    """Lands through ``sink``, then queues the partition for the catalog and records the event."""

    def __init__(
        self,
        sink: ObjectSink,
        *,
        catalog: PartitionCatalog | None = None,
        events: LandedEvents | None = None,
        outbox_dir: str | os.PathLike[str] | None = None,
        settings: AnnouncingSinkSettings | None = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``outbox_dir``: where events wait durably until EventBridge took them (a directory of its
        own on the WAL's disk, e.g. ``<wal.dir>/outbox``); needs ``events`` to be an
        ``EventBridgePublisher``, and is ignored when ``events`` is None. Without it, events are
        queued in memory."""
        self.sink = sink
        self.catalog = catalog
        self.events = events
        self.name = sink.name
        self.settings = settings or AnnouncingSinkSettings()
        self.stats = AnnouncingSinkStats()
        self.outbox: EventOutbox | None = None
        if outbox_dir is not None and events is not None:
            if not isinstance(events, EventBridgePublisher):
                raise TypeError("outbox_dir needs events to be an EventBridgePublisher")
            self.outbox = EventOutbox(outbox_dir, events, self.settings.outbox, rng=rng)
        s = self.settings
        self._backoff = RetryPolicy(
            RetrySettings(initial_interval_secs=s.catalog_retry_initial_secs, max_interval_secs=s.catalog_retry_max_secs),
            rng=rng,
        )
        self._clock = clock
        self._queue: dict[Partition, _Queued] = {}
        self._registered: OrderedDict[Partition, None] = OrderedDict()
        self._catalog_started = False
        # Consecutive failed catalog calls, whichever partition: while Glue is away, the registrar
        # makes one attempt per backoff period in all, not one per queued partition.
        self._catalog_streak = 0
        self._catalog_not_before = 0.0
        self._catalog_wakeup = asyncio.Event()
        self._catalog_idle = asyncio.Event()
        self._catalog_idle.set()
        self._registrar: asyncio.Task[None] | None = None
        self._queue_full_logged = False
        self._unrecorded: OrderedDict[str, tuple[int, LandedObject]] = OrderedDict()

    # -- what the gateway's metrics read -----------------------------------------------------------

    @property
    def catalog_queued(self) -> int:
        """Partitions waiting to be registered (a gauge)."""
        return len(self._queue)

    @property
    def catalog_registered(self) -> int:
        return self.stats.catalog_partitions_registered

    @property
    def catalog_failures(self) -> int:
        return self.stats.catalog_failures

    @property
    def outbox_pending_files(self) -> int:
        return self.outbox.pending_files if self.outbox is not None else 0

    @property
    def outbox_pending_bytes(self) -> int:
        return self.outbox.pending_bytes if self.outbox is not None else 0

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sink and the event publisher (and outbox); the catalog starts in the background."""
        await self.sink.start()
        try:
            if self.events is not None:
                await self.events.start()
            if self.outbox is not None:
                await self.outbox.start()
        except BaseException:
            await self.close()
            raise
        if self.catalog is not None:
            self._registrar = asyncio.create_task(self._register_forever(), name="catalog-registrar")

    async def put_object(self, obj: LakeObject) -> LandedObject:
        landed = self._already_landed(obj)
        if landed is None:
            landed = await self.sink.put_object(obj)
        else:
            self.stats.uploads_skipped += 1
        if self.catalog is not None:
            self._queue_partition(obj.partition)
        if self.outbox is not None:
            await self._record_event(obj, landed)
        elif self.events is not None:
            self.events.object_landed(obj, landed)
        return landed

    async def flush(self, timeout_secs: float | None = None) -> bool:
        """Wait until the catalog queue and the outbox are empty; False if the timeout came first."""
        try:
            async with asyncio.timeout(timeout_secs):
                await self._catalog_idle.wait()
                if self.outbox is not None:
                    await self.outbox.flush()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        # Reverse order of start: announcements flush while the sink is still open.
        timeout = self.settings.close_timeout_secs
        if self.outbox is not None:
            await self.outbox.close(timeout)
        if self.events is not None:
            await self.events.close()
        if self.catalog is not None:
            await self._close_catalog(timeout)
        await self.sink.close()

    # -- events --------------------------------------------------------------------------------------

    def _already_landed(self, obj: LakeObject) -> LandedObject | None:
        """The result of an earlier call for this object whose event could not be recorded."""
        remembered = self._unrecorded.get(obj.key)
        if remembered is not None and remembered[0] == len(obj.body):
            return remembered[1]
        return None

    async def _record_event(self, obj: LakeObject, landed: LandedObject) -> None:
        assert self.outbox is not None and isinstance(self.events, EventBridgePublisher)
        event = self.events.landed_event(obj, landed)
        try:
            await self.outbox.record(event)
        except OSError as exc:
            self.stats.event_record_failures += 1
            self._unrecorded[obj.key] = (len(obj.body), landed)
            self._unrecorded.move_to_end(obj.key)
            while len(self._unrecorded) > UNRECORDED_MAX:
                self._unrecorded.popitem(last=False)
            log.error(
                "event outbox: cannot record the event of a landed object; the landing is retried",
                extra={"key": obj.key, "outbox_dir": self.outbox.directory, "error": str(exc)},
            )
            raise TransientError(f"event of {obj.key} not recorded: {exc}", endpoint="outbox") from exc
        self._unrecorded.pop(obj.key, None)
        self.stats.events_recorded += 1

    # -- catalog ---------------------------------------------------------------------------------

    def _queue_partition(self, partition: Partition) -> None:
        """Queue ``partition`` for registration unless it is registered or queued; never blocks."""
        if partition in self._registered:
            self._registered.move_to_end(partition)
            return
        if partition in self._queue:
            return
        if len(self._queue) >= self.settings.catalog_queue_max_partitions:
            self.stats.catalog_queue_full += 1
            if not self._queue_full_logged:
                self._queue_full_logged = True
                log.warning(
                    "catalog: registration queue full (%d partitions); %s is left out until a later landing in it",
                    len(self._queue),
                    partition.prefix,
                )
            return
        self._queue[partition] = _Queued(due=self._clock())
        self.stats.catalog_partitions_queued += 1
        self._catalog_idle.clear()
        self._catalog_wakeup.set()

    async def _register_forever(self) -> None:
        while True:
            self._catalog_wakeup.clear()
            now = self._clock()
            if now < self._catalog_not_before:
                await self._wait(self._catalog_not_before - now)
                continue
            if not self._catalog_started:
                await self._start_catalog()
                continue
            due = [p for p, q in self._queue.items() if q.due <= now]
            if not due:
                if not self._queue:
                    self._catalog_idle.set()
                    await self._catalog_wakeup.wait()
                else:
                    await self._wait(min(q.due for q in self._queue.values()) - now)
                continue
            for partition in due:
                if not await self._register_once(partition):
                    break  # back off before the next attempt, whichever partition it is for

    async def _wait(self, secs: float) -> None:
        """Sleep ``secs``, or less if a new partition is queued."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, secs)):
                await self._catalog_wakeup.wait()

    async def _start_catalog(self) -> bool:
        assert self.catalog is not None
        try:
            await self.catalog.start()
        except Exception as exc:
            self._failed()
            level = logging.ERROR if isinstance(exc, PermanentError) else logging.WARNING
            log.log(level, "catalog: cannot start yet, partitions wait in the queue: %s", exc, exc_info=not _expected(exc))
            return False
        self._catalog_started = True
        self._succeeded()
        return True

    def _failed(self, queued: _Queued | None = None) -> None:
        """Count a failed catalog call and schedule the next attempt (exponential, full jitter)."""
        self.stats.catalog_failures += 1
        self._catalog_streak += 1
        retry = self._catalog_streak
        if queued is not None:
            queued.failures += 1
            retry = max(retry, queued.failures)
        now = self._clock()
        delay = self._backoff.backoff_secs(retry - 1)
        self._catalog_not_before = now + delay
        if queued is not None:
            queued.due = now + delay

    def _succeeded(self) -> None:
        self._catalog_streak = 0
        self._catalog_not_before = 0.0

    async def _register_once(self, partition: Partition) -> bool:
        assert self.catalog is not None
        queued = self._queue.get(partition)
        if queued is None:
            return True
        try:
            await self.catalog.partition_landed(partition)
        except Exception as exc:
            self._failed(queued)
            level = logging.ERROR if isinstance(exc, PermanentError) else logging.WARNING
            log.log(
                level,
                "catalog: partition %s not registered yet (attempt %d): %s",
                partition.prefix,
                queued.failures,
                exc,
                exc_info=not _expected(exc),
            )
            return False
        self._succeeded()
        del self._queue[partition]
        self._registered[partition] = None
        if len(self._registered) > REGISTERED_MAX:
            self._registered.popitem(last=False)
        self.stats.catalog_partitions_registered += 1
        if self._queue_full_logged and len(self._queue) < self.settings.catalog_queue_max_partitions:
            self._queue_full_logged = False
        return True

    async def _close_catalog(self, timeout_secs: float) -> None:
        assert self.catalog is not None
        registrar, self._registrar = self._registrar, None
        if registrar is not None:
            registrar.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await registrar
            # One more try for every queued partition, whatever its backoff says, within the deadline.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_secs):
                    if self._queue and (self._catalog_started or await self._start_catalog()):
                        for partition in list(self._queue):
                            await self._register_once(partition)
        if self._queue:
            prefixes = sorted(p.prefix for p in self._queue)
            log.warning(
                "catalog: %d partition(s) not registered at close (their objects are in the lake; a later "
                "landing in them or a crawler registers them): %s",
                len(prefixes),
                ", ".join(prefixes[:20]) + (" ..." if len(prefixes) > 20 else ""),
            )
        await self.catalog.close()
        self._catalog_started = False


def _expected(exc: BaseException) -> bool:
    """Failures a connector reports (no traceback needed), as opposed to bugs."""
    return isinstance(exc, ConnectorError)
