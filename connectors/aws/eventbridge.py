"""``EventBridgePublisher``: one EventBridge event per landed lake object, for downstream jobs.

Two ways to deliver, chosen by whoever wires it (``connectors.announcing_sink.AnnouncingSink``):

- In memory (``object_landed()``, no outbox): the event is queued and the call returns at once. A
  background task sends what is queued in ``PutEvents`` calls of up to 10 entries (the API's
  limit), resending only the entries EventBridge reports as failed, under the shared retry policy.
  The queue is bounded: when EventBridge is away for long, the oldest events beyond
  ``max_pending_events`` are dropped and counted, and a crash loses what is queued.
- At least once (``EventOutbox``): the event is appended durably to an outbox file on the WAL's
  disk before the landing is reported done, and a background sender publishes the file's entries
  through ``put_entries()``; a file is deleted once every entry in it was accepted. After a crash
  the next start sends what the outbox still holds, so an event may arrive twice, never zero times.

Every event carries ``event_id``, stable for an object (a hash of its URL and ETag): a replayed
landing or a resent outbox entry carries the same id, so consumers deduplicate on it.

Event (``detail-type`` = ``detail_type``, ``source`` = ``source``)::

    {"event_id": "<32 hex>", "bucket": ..., "key": ..., "url": "s3://bucket/key", "zone": "raw",
     "dataset": "telemetry", "dt": "2024-05-01", "hour": "13", "records": 1000, "bytes": 123456,
     "etag": "...", "min_event_time": "2024-05-01T13:00:00.000Z", "max_event_time": "...",
     "min_event_ms": 1714568400000, "max_event_ms": 1714571999000, "first_lsn": 0, "last_lsn": 999}
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from connectors.aws.connector import AwsConnector
from connectors.aws.settings import AwsClientSettings, PositiveSecs
from connectors.base import LakeObject, LandedObject
from connectors.durable_files import ensure_directory, fsync_directory
from connectors.errors import ConnectorError, TransientError
from connectors.retry import RetryPolicy, RetrySettings, Sleep

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra, imported where a client is made (connectors/aws/client.py)
    from aiobotocore.session import AioSession

log = logging.getLogger(__name__)

MAX_ENTRIES_PER_CALL = 10
# Per-entry error codes worth resending; any other code means the entry itself is bad.
RETRYABLE_ENTRY_CODES = frozenset({"InternalFailure", "ThrottlingException", "ServiceUnavailable"})

# What became of one entry handed to ``put_entries``.
SENT = "sent"  # EventBridge accepted it
REJECTED = "rejected"  # EventBridge refused the entry itself (a code outside RETRYABLE_ENTRY_CODES)
UNSENT = "unsent"  # not accepted by the retry deadline (EventBridge away, throttling): send it again later

MiB = 1024 * 1024


def event_id(url: str, etag: str) -> str:
    """The id of the event for the object at ``url`` with ``etag``: the same for every landing of it."""
    return hashlib.sha256(f"{url}\n{etag}".encode()).hexdigest()[:32]


class EventBridgeSettings(AwsClientSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where landed-object events go."""

    event_bus_name: Annotated[str, Meta(min_length=1, max_length=1600)] = "default"
    source: Annotated[str, Meta(min_length=1, max_length=256)] = "edge-gateway"
    detail_type: Annotated[str, Meta(min_length=1, max_length=128)] = "Lake Object Landed"
    # In-memory queue only (no outbox): beyond this, the oldest events are dropped.
    max_pending_events: Annotated[int, Meta(ge=MAX_ENTRIES_PER_CALL)] = 10_000
    read_timeout_secs: PositiveSecs = 10.0


@dataclass(slots=True)
class EventBridgeStats:
    events_sent: int = 0
    events_failed: int = 0  # rejected for good, or (in-memory queue) still failing at the retry deadline
    events_dropped: int = 0  # the in-memory queue was full
    calls: int = 0


class EventBridgePublisher(AwsConnector):
    """Publishes one event per landed object, batched, off the landing path."""

    service = "events"

    def __init__(
        self,
        settings: EventBridgeSettings,
        *,
        session: AioSession | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings, session=session, sleep=sleep, rng=rng, clock=clock)
        self.settings = settings
        self.stats = EventBridgeStats()
        self._pending: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._open_client()
        self._sender = asyncio.create_task(self._send_forever(), name="eventbridge-publisher")

    def object_landed(self, obj: LakeObject, landed: LandedObject) -> None:
        """Queue the event for ``landed`` in memory; returns at once."""
        if len(self._pending) >= self.settings.max_pending_events:
            self._pending.popleft()
            self.stats.events_dropped += 1
        self._pending.append(self.entry(self.landed_event(obj, landed)))
        self._idle.clear()
        self._wakeup.set()

    async def flush(self, timeout_secs: float | None = None) -> bool:
        """Wait until every queued event was sent (or given up on); False if the timeout came first."""
        return await _wait_set(self._idle, timeout_secs)

    async def close(self, timeout_secs: float = 5.0) -> None:
        """Send what is queued within ``timeout_secs``, then stop."""
        if self._sender is not None:
            if not await self.flush(timeout_secs):
                log.warning("eventbridge: %d event(s) not sent at close", len(self._pending))
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        await super().close()

    def landed_event(self, obj: LakeObject, landed: LandedObject) -> dict[str, Any]:
        """The event for ``landed``, independent of where it is sent: ``{"id", "detail", "resources"}``.

        ``detail`` is the JSON text of the event's detail; ``id`` is also in it as ``event_id``.
        """
        bucket, key = _split_url(landed.url, landed.key)
        eid = event_id(landed.url, landed.etag)
        detail = {
            "event_id": eid,
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
        event: dict[str, Any] = {"id": eid, "detail": json.dumps(detail, separators=(",", ":"))}
        if bucket:
            event["resources"] = [f"arn:aws:s3:::{bucket}/{key}"]
        return event

    def entry(self, event: dict[str, Any]) -> dict[str, Any]:
        """The ``PutEvents`` entry for ``event``, addressed with the current settings (bus, source)."""
        entry: dict[str, Any] = {
            "Source": self.settings.source,
            "DetailType": self.settings.detail_type,
            "Detail": event["detail"],
            "EventBusName": self.settings.event_bus_name,
        }
        if event.get("resources"):
            entry["Resources"] = list(event["resources"])
        return entry

    async def put_entries(self, entries: Sequence[dict[str, Any]]) -> list[str]:
        """Send ``entries`` (``PutEvents`` calls of up to 10), resending failed ones under the retry policy.

        Returns one outcome per entry, in order: ``SENT``, ``REJECTED`` (EventBridge refused the
        entry itself; sending it again cannot help) or ``UNSENT`` (not accepted by the retry
        deadline, or the call failed for good, e.g. a missing bus: the caller keeps it).
        """
        if self._client is None:
            raise RuntimeError("EventBridgePublisher.put_entries called before start()")
        outcomes = [UNSENT] * len(entries)
        for first in range(0, len(entries), MAX_ENTRIES_PER_CALL):
            await self._put_batch(entries, list(range(first, min(first + MAX_ENTRIES_PER_CALL, len(entries)))), outcomes)
        return outcomes

    async def _send_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(MAX_ENTRIES_PER_CALL, len(self._pending)))]
                try:
                    outcomes = await self.put_entries(batch)
                except Exception:
                    # A bug must not silently stop every later event (and hang flush()).
                    self.stats.events_failed += len(batch)
                    log.exception("eventbridge: could not send %d event(s)", len(batch))
                    continue
                # Only what is still unsent counts as failed here; the rest was sent or counted already.
                self.stats.events_failed += outcomes.count(UNSENT)
            self._idle.set()

    async def _put_batch(self, entries: Sequence[dict[str, Any]], indices: list[int], outcomes: list[str]) -> None:
        """One ``PutEvents`` batch; only the failed entries are sent again."""
        remaining = indices

        async def send() -> None:
            nonlocal remaining
            self.stats.calls += 1
            response = await self._client.put_events(Entries=[entries[i] for i in remaining])
            results = response.get("Entries", [])
            retry: list[int] = []
            for n, i in enumerate(remaining):
                # A response shorter than the request says nothing about the rest: resend them.
                code = results[n].get("ErrorCode") if n < len(results) else "InternalFailure"
                if not code:
                    outcomes[i] = SENT
                    self.stats.events_sent += 1
                elif code in RETRYABLE_ENTRY_CODES:
                    retry.append(i)
                else:
                    outcomes[i] = REJECTED
                    self.stats.events_failed += 1
                    log.warning("eventbridge: entry rejected: %s %s", code, results[n].get("ErrorMessage", ""))
            remaining = retry
            if remaining:
                raise TransientError(f"{len(remaining)} PutEvents entries failed", endpoint=self._endpoint)

        try:
            await self._call("PutEvents", send)
        except ConnectorError as exc:
            log.warning("eventbridge: %d event(s) not sent: %s", len(remaining), exc)


# -- the durable outbox ------------------------------------------------------------------------

OUTBOX_LOCK_NAME = "LOCK"
_OUTBOX_NAME = re.compile(r"^events-(\d{16})\.ndjson$")


class OutboxSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The durable outbox of landed-object events (at-least-once delivery)."""

    # A file takes this many events, then the next one starts; a file is deleted once all are sent.
    file_max_events: Annotated[int, Meta(ge=1)] = 1000
    # Past this size the outbox still keeps every event (it never drops one) but says so: a warning
    # and the ``over_limit`` counter. EventBridge has then been away for long.
    limit_bytes: Annotated[int, Meta(ge=1)] = 64 * MiB
    # Wait between send rounds while events stay unsent: full jitter, doubling up to the maximum.
    retry_initial_secs: Annotated[float, Meta(gt=0)] = 1.0
    retry_max_secs: Annotated[float, Meta(gt=0)] = 30.0

    def __post_init__(self) -> None:
        if self.retry_initial_secs > self.retry_max_secs:
            raise ValueError("retry_initial_secs must not exceed retry_max_secs")


@dataclass(slots=True)
class OutboxStats:
    """Counters (monotonic since start)."""

    events_recorded: int = 0  # appended and fdatasync'ed
    events_sent: int = 0  # accepted by PutEvents
    events_rejected: int = 0  # refused for good by EventBridge (a bad entry): logged and removed
    send_failures: int = 0  # send rounds that left entries unsent (EventBridge away, throttling)
    write_failures: int = 0  # appends that failed (ENOSPC, EIO): the landing is retried
    over_limit: int = 0  # appends made while the outbox held more than limit_bytes
    corrupt_entries: int = 0  # lines skipped when reading a file back (a torn tail after a crash)
    files_deleted: int = 0


@dataclass(slots=True, eq=False)
class _OutboxFile:
    seq: int
    path: str
    size: int = 0
    # Entries in the file; None until a file left by an earlier run is read back.
    count: int | None = None
    # In memory while the file is being appended to or sent; otherwise read back when its turn comes.
    entries: list[dict[str, Any]] | None = None
    sent: int = 0  # entries [0, sent) were accepted (or rejected for good)
    fd: int | None = None  # open for appending: the current file only
    sealed: bool = True


class EventOutbox:
    """Landed-object events, appended durably before the landing counts, sent to EventBridge later.

    ``record()`` appends one event to the current file (``events-<seq>.ndjson`` in ``directory``):
    write, ``fdatasync``, and the directory fsynced when a file is created. It raises ``OSError``
    when that fails (ENOSPC, EIO): the partial line is truncated away, the file is closed and the
    next append starts a new one, so one failure never blocks the next attempt.

    A background task sends the files oldest first through ``publisher.put_entries`` and deletes a
    file once every entry in it is sent (or rejected for good by EventBridge, which is logged and
    counted: resending such an entry cannot succeed). Entries EventBridge did not accept are sent
    again, with exponential backoff and full jitter between rounds, for as long as it takes; the
    outbox never drops an event. Sent entries are not marked on disk: after a crash, the next
    start sends each remaining file whole, so a consumer may see an event twice (deduplicate on
    ``event_id``). Memory holds the current file and the one being sent; the rest stay on disk.

    Line format: ``<crc32 of the JSON, 8 hex> <JSON of {"id", "detail", "resources"}>\\n``; a line
    whose checksum does not match (the torn tail of a crash) is skipped and counted. One owner per
    directory: ``start()`` takes an exclusive ``flock`` on ``directory/LOCK``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        publisher: EventBridgePublisher,
        settings: OutboxSettings | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.directory = os.fspath(directory)
        self.publisher = publisher
        self.settings = settings or OutboxSettings()
        self.stats = OutboxStats()
        s = self.settings
        self._backoff = RetryPolicy(
            RetrySettings(initial_interval_secs=s.retry_initial_secs, max_interval_secs=s.retry_max_secs), rng=rng
        )
        self._sleep = sleep
        self._files: deque[_OutboxFile] = deque()
        self._current: _OutboxFile | None = None
        self._next_seq = 0
        self._bytes = 0
        self._over_limit = False
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None

    @property
    def pending_files(self) -> int:
        """Outbox files not yet deleted: they hold the events not yet sent."""
        return len(self._files)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    async def start(self) -> None:
        """Lock the directory, find what an earlier run left unsent, and start sending it."""
        found, self._lock_fd = await asyncio.to_thread(self._open_directory)
        self._files.extend(found)
        self._bytes = sum(f.size for f in found)
        self._next_seq = found[-1].seq + 1 if found else 0
        if found:
            self._idle.clear()
            log.info(
                "eventbridge outbox: %d file(s), %d bytes left by an earlier run; sending them",
                len(found),
                self._bytes,
                extra={"outbox_dir": self.directory},
            )
        self._check_limit()
        self._sender = asyncio.create_task(self._send_forever(), name="eventbridge-outbox")

    async def record(self, event: dict[str, Any]) -> None:
        """Append ``event`` durably; returns once it is on disk. Raises ``OSError`` if it is not."""
        if self._sender is None:
            raise RuntimeError("EventOutbox.record called before start()")
        # Shielded: once the bytes may be written, the bookkeeping must follow, even if the caller
        # is cancelled meanwhile (the caller still sees the cancellation).
        task = asyncio.ensure_future(self._record(event))
        task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def flush(self, timeout_secs: float | None = None) -> bool:
        """Wait until every recorded event was sent; False if the timeout came first."""
        return await _wait_set(self._idle, timeout_secs)

    async def close(self, timeout_secs: float = 5.0) -> None:
        """Send what is recorded within ``timeout_secs``, then stop; unsent files stay for the next start."""
        if self._sender is not None:
            await self.flush(timeout_secs)
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        async with self._lock:
            if self._current is not None:
                self._seal(self._current)
        if self._files:
            log.warning(
                "eventbridge outbox: %d file(s), %d bytes not sent at close; the next start sends them",
                len(self._files),
                self._bytes,
                extra={"outbox_dir": self.directory},
            )
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- appending -----------------------------------------------------------------------------

    async def _record(self, event: dict[str, Any]) -> None:
        line = _encode_line(event)
        async with self._lock:
            current = self._current
            if current is None:
                try:
                    current = await asyncio.to_thread(self._create_file, self._next_seq)
                except OSError:
                    self.stats.write_failures += 1
                    raise
                self._next_seq += 1
                self._current = current
                self._files.append(current)
            assert current.fd is not None and current.entries is not None and current.count is not None
            try:
                await asyncio.to_thread(_append, current.fd, line, current.size)
            except OSError:
                # The partial line was truncated away (or, if even that failed, is a torn tail that
                # reading back skips). Either way this file takes no more appends: after a failed
                # fdatasync its pages are in doubt, so the retry writes the whole event to a new file.
                self.stats.write_failures += 1
                self._seal(current)
                self._wakeup.set()  # an empty sealed file is deleted by the sender
                raise
            current.size += len(line)
            current.count += 1
            current.entries.append(event)
            self._bytes += len(line)
            self.stats.events_recorded += 1
            if current.count >= self.settings.file_max_events:
                self._seal(current)
        self._check_limit(appended=True)
        self._idle.clear()
        self._wakeup.set()

    def _seal(self, file: _OutboxFile) -> None:
        """No more appends to ``file``; its entries leave memory unless it is being sent."""
        if file.fd is not None:
            with contextlib.suppress(OSError):
                os.close(file.fd)
            file.fd = None
        file.sealed = True
        if self._current is file:
            self._current = None
        if not self._files or self._files[0] is not file:
            file.entries = None

    def _create_file(self, seq: int) -> _OutboxFile:
        path = os.path.join(self.directory, f"events-{seq:016d}.ndjson")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return _OutboxFile(seq=seq, path=path, size=0, count=0, entries=[], fd=fd, sealed=False)

    def _check_limit(self, *, appended: bool = False) -> None:
        limit = self.settings.limit_bytes
        if self._bytes > limit:
            if appended:
                self.stats.over_limit += 1
            if not self._over_limit:
                self._over_limit = True
                log.warning(
                    "eventbridge outbox holds %d bytes, over its %d-byte limit: EventBridge is not taking "
                    "events; every event is kept until it does",
                    self._bytes,
                    limit,
                    extra={"outbox_dir": self.directory},
                )
        elif self._over_limit:
            self._over_limit = False
            log.info("eventbridge outbox back under its limit (%d bytes)", self._bytes)

    # -- sending -------------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        failures = 0
        while True:
            self._wakeup.clear()
            if not self._files:
                self._idle.set()
                await self._wakeup.wait()
                continue
            head = self._files[0]
            if head.entries is None:
                try:
                    head.entries, corrupt = await asyncio.to_thread(_read_file, head.path)
                except OSError as exc:
                    failures += 1
                    log.error("eventbridge outbox: cannot read %s: %s", head.path, exc)
                    await self._sleep(self._backoff.backoff_secs(failures - 1))
                    continue
                head.count = len(head.entries)
                if corrupt:
                    self.stats.corrupt_entries += corrupt
                    log.warning("eventbridge outbox: skipped %d damaged line(s) in %s", corrupt, head.path)
            assert head.count is not None
            if head.sent >= head.count:
                if head.sealed:
                    await self._delete(head)
                    continue
                # The current file, all sent: close and delete it, unless an append came meanwhile.
                async with self._lock:
                    if head.sent >= head.count and self._current is head:
                        self._seal(head)
                if not head.sealed:
                    continue
                await self._delete(head)
                continue
            failures = await self._send_some(head, failures)

    async def _send_some(self, head: _OutboxFile, failures: int) -> int:
        """Send the next batch of ``head`` until EventBridge took all of it; returns the failure streak."""
        assert head.entries is not None and head.count is not None
        end = min(head.sent + MAX_ENTRIES_PER_CALL, head.count)
        todo = list(range(head.sent, end))
        while todo:
            events = [head.entries[i] for i in todo]
            try:
                outcomes = await self.publisher.put_entries([self.publisher.entry(e) for e in events])
            except Exception:
                # A bug must not stop the outbox: the entries stay and are tried again.
                log.exception("eventbridge outbox: could not send %d event(s)", len(todo))
                outcomes = [UNSENT] * len(todo)
            left: list[int] = []
            for i, event, outcome in zip(todo, events, outcomes, strict=True):
                if outcome == SENT:
                    self.stats.events_sent += 1
                elif outcome == REJECTED:
                    self.stats.events_rejected += 1
                    log.error("eventbridge outbox: event %s rejected by EventBridge; dropped", event.get("id"))
                else:
                    left.append(i)
            todo = left
            if todo:
                failures += 1
                self.stats.send_failures += 1
                await self._sleep(self._backoff.backoff_secs(failures - 1))
            else:
                failures = 0
        head.sent = end
        return failures

    async def _delete(self, file: _OutboxFile) -> None:
        try:
            await asyncio.to_thread(os.unlink, file.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Left in place: a restart would send it again (duplicates, never a loss). Forget it now.
            log.error("eventbridge outbox: cannot delete sent file %s: %s", file.path, exc)
        else:
            self.stats.files_deleted += 1
        self._files.popleft()
        self._bytes -= file.size
        self._check_limit()

    def _open_directory(self) -> tuple[list[_OutboxFile], int]:
        ensure_directory(self.directory)
        lock_fd = os.open(os.path.join(self.directory, OUTBOX_LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RuntimeError(f"the event outbox {self.directory} is in use by another process") from exc
            raise
        found: list[_OutboxFile] = []
        for name in os.listdir(self.directory):
            match = _OUTBOX_NAME.match(name)
            if match is None:
                continue
            path = os.path.join(self.directory, name)
            found.append(_OutboxFile(seq=int(match.group(1)), path=path, size=os.stat(path).st_size))
        found.sort(key=lambda f: f.seq)
        return found, lock_fd


def _encode_line(event: dict[str, Any]) -> bytes:
    payload = json.dumps(event, separators=(",", ":"), ensure_ascii=True).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _decode_line(line: bytes) -> dict[str, Any] | None:
    crc, _, payload = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(payload):
            return None
        event = json.loads(payload)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("detail"), str) else None


def _read_file(path: str) -> tuple[list[dict[str, Any]], int]:
    """The entries of one outbox file and how many damaged lines were skipped."""
    with open(path, "rb") as f:
        data = f.read()
    entries: list[dict[str, Any]] = []
    corrupt = 0
    for line in data.split(b"\n"):
        if not line:
            continue
        event = _decode_line(line)
        if event is None:
            corrupt += 1
        else:
            entries.append(event)
    return entries, corrupt


def _append(fd: int, data: bytes, size_before: int) -> None:
    """Write ``data`` at the end of ``fd`` and ``fdatasync``; on failure, cut the file back."""
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fdatasync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size_before)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shielded task's outcome as seen (its caller may have been cancelled)."""
    if not task.cancelled():
        task.exception()


def _split_url(url: str, fallback_key: str) -> tuple[str, str]:
    if url.startswith("s3://"):
        bucket, _, key = url[len("s3://") :].partition("/")
        return bucket, key
    return "", fallback_key


def _iso_ms(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _wait_set(event: asyncio.Event, timeout_secs: float | None) -> bool:
    """Wait for ``event``; False if ``timeout_secs`` came first."""
    try:
        async with asyncio.timeout(timeout_secs):
            await event.wait()
    except TimeoutError:
        return False
    return True
