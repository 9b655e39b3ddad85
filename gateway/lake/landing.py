"""Landing one zone of the lake: a WAL consumer that rolls partitioned objects and lands them.

Each zone (raw, quarantine, curated) runs one ``ZoneLander``, independent of the others and of
the device API: a slow sink stalls only its own zone, and the WAL absorbs the backlog.

Exactly once across crashes. Object keys are ``<gateway_id>-<first_lsn>-<last_lsn>-<tag>``, the tag
drawn at random when the object is sealed (two writers numbering records alike never share a key),
and the lander keeps a small state file per zone, written atomically:

- ``position``: every frame below it is landed or not this zone's, so replay starts there;
- ``landed``: per partition, the last LSN landed, for partitions still open across ``position``;
- ``sealed``: objects whose boundaries were decided (by age, size, drain or the open-partition cap)
  but which may not have landed yet, with the names and tag of their keys. The decision is written
  *before* the upload starts, so a replay after a crash cuts the same objects, at the same LSNs,
  under the same keys.

The position never passes a frame that is in no landed object. A zone with nothing of its own
pending moves its position as it reads (an idle zone never pins the WAL). The state lives in space
reserved when the zone first starts, so a full disk cannot stop the write that frees WAL space.
An object that cannot be built, or that the sink refuses for good, is written with its reason
under ``deadletter/<zone>/...`` after bounded retries (rebuilt from the WAL as plain NDJSON), so
it never blocks the zone and none of its records is skipped; a sink that refuses the dead-letter
object too refuses everything, so the object is retried instead. Frames the zone's prepare step (the
curated zone's scoring) keeps failing on are retried, then prepared one by one: only the frames
that still fail alone while others prepare go to the dead-letter prefix (a step that fails on every
frame is broken, not the frames: they wait in the WAL).

A zone turned off (the curated zone, with ``inference.enabled = false``) still owes what was
acknowledged while it was on. It starts *retiring*: ``until`` (in its state) is the WAL's durable
end at the first start without it, and it lands every record below that, then publishes
``RETIRED`` so it pins no segment. Turned on again, it carries on from its position: what the WAL
still holds of the time it was off lands too; what was released meanwhile is never in it (logged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import operator
import os
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from connectors.base import LakeObject, LandedObject, ObjectSink, Partition, object_name
from connectors.errors import ConnectorError, PermanentError
from connectors.durable_files import ReservedStateFile, ensure_directory
from gateway.lake.formats import ZstdNdjsonBuilder
from gateway.durable.wal import KIND_RECORDS_SHARED, Frame, WriteAheadLog

log = logging.getLogger(__name__)

TAG_LETTERS = 8
# WAL bytes read per step (about 8,000 records): each zone of each WAL holds a read in memory, with
# what it becomes (columns, scores) in the curated zone; 8 MiB cost 60 MiB more at peak and no less CPU.
READ_BATCH_BYTES = 2 * 1024 * 1024
GATHER_RECORDS = 20_000  # frames waiting past this many records are read at once
DEAD_LETTER_PREFIX = "deadletter"
# The position a retired zone publishes: past every LSN, so it never holds a segment back.
RETIRED = 2**63 - 1
_HOUR = operator.attrgetter("hour")
ROLLED_EARLY_LOG_SECS = 60.0  # at most one warning a minute per zone about objects rolled early


class ObjectBuilder(Protocol):
    """Accumulates frames into the bytes of one lake object."""

    extension: str
    content_type: str
    size: int  # bytes of input added so far, the measure ``target_object_bytes`` applies to
    held: int  # bytes it holds in memory after the last ``settle``, the measure ``max_open_bytes`` applies to

    def add(self, frame: Frame) -> None: ...

    def settle(self) -> None: ...  # every frame of a read is added: hold them compactly until more come

    def finish(self) -> bytes: ...


class LandingObserver(Protocol):
    def landed(self, zone: str, obj: LandedObject, seconds: float) -> None: ...

    def landing_failed(self, zone: str, error: Exception) -> None: ...

    def backlog(self, zone: str, backlog_bytes: int, oldest_age_secs: float) -> None: ...

    def dead_lettered(self, zone: str, records: int, reason: str) -> None: ...

    def damaged(self, zone: str, records: int) -> None: ...

    def rolled_early(self, zone: str, objects: int) -> None: ...


class LanderState(msgspec.Struct):
    position: int = 0
    landed: dict[str, int] = {}
    sealed: list[tuple[int, int, int]] = []  # (hour, first_lsn, last_lsn)
    # "hour:first_lsn" of a sealed object -> (gateway_id, dataset) it is named with: a replay after a
    # restart that renamed either must land it under the key it may already have.
    names: dict[str, tuple[str, str]] = {}
    # "hour:first_lsn" -> the tag drawn when it was sealed, last in its key (none: sealed untagged,
    # by an earlier version, and replayed under that key).
    tags: dict[str, str] = {}
    until: int | None = None  # retiring (the zone is turned off): it owes the records below this LSN


def state_path(state_dir: str | os.PathLike[str], zone: str) -> Path:
    return Path(state_dir) / f"{zone}.state"


def owes_records(state_dir: str | os.PathLike[str], zone: str) -> bool:
    """Whether a zone that is turned off may still owe records acknowledged while it was on.

    Only its state file can say: none means it never ran here; a retirement finished says no.
    """
    path = state_path(state_dir, zone)
    if not path.exists():
        return False
    state_file = ReservedStateFile(path)
    try:
        payload = state_file.open()
    finally:
        state_file.close()
    if payload is None:
        return False
    state = msgspec.json.decode(payload, type=LanderState)
    return state.until is None or state.position < state.until or bool(state.sealed)


def recorded_floor(state_dir: str | os.PathLike[str]) -> int:
    """The LSN past every record a zone here recorded as read: its position, the objects it sealed,
    and the last record it landed of each hour (an hour can land past the position)."""
    floor = 0
    for path in Path(state_dir).glob("*.state"):
        state_file = ReservedStateFile(path)
        try:
            payload = state_file.open()
        finally:
            state_file.close()
        if payload is not None:
            state = msgspec.json.decode(payload, type=LanderState)
            floor = max(floor, state.position, *(last + 1 for _, _, last in state.sealed), *(last + 1 for last in state.landed.values()))
    return floor


@dataclass(slots=True)
class _Pending:
    """An object being filled (open) or decided and waiting to land (sealed)."""

    hour: int
    builder: ObjectBuilder
    first_lsn: int
    last_lsn: int
    opened_at: float
    oldest_received_ms: int
    records: int = 0
    min_event_ms: int = 0
    max_event_ms: int = 0
    touched: float = 0.0
    cut_at: int | None = None  # from a sealed intent found on replay
    named: tuple[str, str, str] | None = None  # (gateway_id, dataset, tag) it is named with, once sealed
    dead_letter_reason: str | None = None  # frames that could not be prepared: straight to dead-letter

    def add(self, frame: Frame, now: float) -> None:
        if self.records == 0:
            self.min_event_ms, self.max_event_ms = frame.min_event_ms, frame.max_event_ms
        else:
            self.min_event_ms = min(self.min_event_ms, frame.min_event_ms)
            self.max_event_ms = max(self.max_event_ms, frame.max_event_ms)
        self.builder.add(frame)
        self.records += frame.count
        self.last_lsn = frame.end_lsn - 1
        self.touched = now


@dataclass
class LanderSettings:
    zone: str
    kind: int
    dataset: str
    gateway_id: str
    target_object_bytes: int
    max_object_age_secs: float
    max_open_partitions: int
    # Memory the open objects may hold together: beyond it the largest are rolled (a backfill writing
    # many hours at once would otherwise hold everything it read until the objects' age ran out).
    max_open_bytes: int = 2**62
    max_uploads_in_flight: int = 4
    retry_initial_secs: float = 0.2
    retry_max_secs: float = 30.0
    # Attempts before an object that cannot be built, or that the sink refuses for good, is dead-lettered.
    max_object_attempts: int = 5
    # A zone reads new frames at most this often while less than a full read waits: each read has a
    # fixed cost (a thread hop, the curated zone's decode and scoring calls), so small reads at
    # moderate load cost many times more CPU per record. Acknowledgements never wait for landing.
    read_interval_secs: float = 0.1
    # The zone is turned off: land what it owes (state ``until``), then stop and release everything.
    retiring: bool = False
    # It takes KIND_RECORDS_SHARED frames as stored (formats.ZstdNdjsonBuilder expands them a slice at
    # a time, the curated zone decodes them as they are); otherwise the WAL's reader expands them.
    shared_frames: bool = False
    extra: dict[str, str] = field(default_factory=dict)


class ZoneLander:
    def __init__(
        self,
        settings: LanderSettings,
        *,
        wal: WriteAheadLog,
        sink: ObjectSink,
        builder_factory: Callable[[], ObjectBuilder],
        state_dir: str | os.PathLike[str],
        observer: LandingObserver,
        prepare: Callable[[list[Frame]], Awaitable[list]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.zone = settings.zone
        self._wal = wal
        self._sink = sink
        self._new_builder = builder_factory
        self._state_dir = Path(state_dir)
        self._state_file = ReservedStateFile(state_path(self._state_dir, settings.zone))
        self._observer = observer
        self._prepare = prepare  # e.g. scoring for the curated zone, before frames join objects
        self._kinds = frozenset({settings.kind, KIND_RECORDS_SHARED} if settings.shared_frames else {settings.kind})
        self._clock = clock
        self._state = LanderState()
        self._open: dict[int, _Pending] = {}
        self._sealed: list[_Pending] = []
        self._intents: dict[tuple[int, int], int] = {}  # (hour, first_lsn) -> last_lsn, replay only
        self._chains: dict[int, asyncio.Task[None]] = {}  # last upload per partition, to keep order
        self._uploads: set[asyncio.Task[None]] = set()
        self._upload_slots = asyncio.Semaphore(settings.max_uploads_in_flight)
        self._state_lock = asyncio.Lock()
        # Writes of the state asked for, and how many of those asks the last write covered: asks
        # waiting together share one write (objects landing at once each ask for one).
        self._state_asked = 0
        self._state_covered = 0
        self._rolled_early = 0  # objects an eviction rolled in the read being absorbed
        self._next_rolled_early_log = 0.0
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._reader = None
        self._reading_from: int | None = None
        self._last_read = 0.0
        self._persisted_segment = -1  # first LSN of the segment the persisted position is in
        self._retired = False
        self._retirement_changed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the zone's state and tell the WAL what this zone still needs (before any zone runs)."""
        if self._reader is not None:
            return
        self._state = await asyncio.to_thread(self._load_state)
        self._retirement_changed = self._settle_retirement()
        for hour, first, last in self._state.sealed:
            self._intents[(hour, first)] = last
        self._persisted_segment = self._wal.segment_start(self._state.position)
        self._wal.register_consumer(self.zone, self._state.position)
        self._reader = self._wal.reader(self._state.position)

    async def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        """Run the zone; ``on_death`` is told if it ever stops on an error (its records wait in the WAL)."""
        await self.load()
        if self._retirement_changed:
            # Where it stops owing (or that it owes again), written before anything else is acknowledged.
            await self._persist_state()
        self._task = asyncio.create_task(self._run(), name=f"lander-{self.zone}")
        self._task.add_done_callback(self._report_death)
        if on_death is not None:
            self._task.add_done_callback(lambda task: _if_failed(task, on_death))

    def _settle_retirement(self) -> bool:
        """Fix where a retiring zone stops, or say what a zone turned on again missed while off;
        True when the state changed."""
        state = self._state
        if self.settings.retiring:
            changed = state.until is None
            if changed:
                # Everything durable now was acknowledged while the zone was on (or before this start).
                state.until = max(state.position, self._wal.durable_lsn)
            log.warning(
                "zone turned off; landing what it owes first",
                extra={"zone": self.zone, "gateway_id": self.settings.gateway_id, "from_lsn": state.position, "until_lsn": state.until},
            )
            return changed
        if state.until is None:
            return False
        first = self._wal.first_lsn
        if state.position < first:
            log.warning(
                "zone turned on again; records acknowledged while it was off and already released from the WAL are not in it",
                extra={"zone": self.zone, "gateway_id": self.settings.gateway_id, "missing_from_lsn": state.position, "missing_to_lsn": first - 1},
            )
        else:
            log.info("zone turned on again; it lands what the WAL still holds from while it was off", extra={"zone": self.zone, "from_lsn": state.position})
        state.until = None
        return True

    def _report_death(self, task: asyncio.Task[None]) -> None:
        # Records stay safe in the WAL, but nothing lands until a restart: that must be loud.
        if not task.cancelled() and task.exception() is not None:
            self._observer.landing_failed(self.zone, task.exception())
            log.critical("a zone stopped landing; restart the gateway", exc_info=task.exception(), extra={"zone": self.zone})

    async def drain(self, deadline_secs: float | None) -> bool:
        """Land everything durable in the WAL within the deadline (None: however long it takes); True when nothing is left."""
        self._draining = True
        await self._wal.wake_consumers()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), deadline_secs)
            return True
        except TimeoutError:
            log.warning(
                "drain deadline reached; the rest stays in the WAL for the next start",
                extra={"zone": self.zone, "unlanded_objects": len(self._open) + len(self._sealed)},
            )
            return False
        finally:
            await self.close()

    async def close(self) -> None:
        for task in [self._task, *self._uploads]:
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._uploads] if t is not None), return_exceptions=True)
        if self._reader is not None:
            self._reader.close()
        self._state_file.close()

    @property
    def position(self) -> int:
        return self._state.position

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.settings.retry_initial_secs
        failures = 0  # consecutive failures to prepare the frames at the reader's position
        while True:
            reader = self._reader
            if self.settings.retiring and reader.lsn >= self._state.until:
                await self._retire()
                return
            timeout = self._seconds_to_next_roll()
            has_data = await self._wal.wait_for_data(reader.lsn, timeout, stop=lambda: self._draining)
            if has_data:
                await self._gather(reader.lsn)
            if has_data and len(self._sealed) < 2 * self.settings.max_uploads_in_flight:
                # Frames read but not yet in an object hold the committed position back, and so do
                # the open objects they may fill: those leave the open set (in _absorb's thread)
                # before _seal lists them as sealed, while an upload finishing may persist state.
                read_from = reader.lsn
                self._reading_from = self._current_position()
                unpreparable: dict[int, str] = {}
                try:
                    frames = await asyncio.to_thread(reader.read, READ_BATCH_BYTES, self._kinds)
                    if reader.lost_records:  # in frames damaged on disk, passed over (the reader logged them)
                        self._observer.damaged(self.zone, reader.lost_records)
                        reader.lost_records = 0
                    if self.settings.retiring:  # what was acknowledged after the zone was turned off is not its own
                        frames = [f for f in frames if f.lsn < self._state.until]
                    if frames and self._prepare is not None:
                        wanted = [f for f in frames if self._wanted(f)]
                        if failures < self.settings.max_object_attempts:
                            frames = await self._prepare(wanted)
                        else:  # the same frames kept failing: one at a time, to set aside only the bad ones
                            frames, unpreparable = await self._prepare_each(wanted)
                except Exception as exc:  # e.g. a scoring bug, a frame of unknown kind: retry, never skip them
                    failures += 1
                    self._observer.landing_failed(self.zone, exc)
                    log.exception("reading or preparing frames failed; will read them again", extra={"zone": self.zone, "attempt": failures})
                    reader.close()
                    self._reader = self._wal.reader(read_from)
                    self._reading_from = None
                    await self._seal(self._due_by_age())  # what was read before them still lands
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.retry_max_secs)
                    continue
                delay = self.settings.retry_initial_secs
                failures = 0
                if frames:
                    due = await asyncio.to_thread(self._absorb, frames, unpreparable)
                    self._report_rolled_early()
                    # Every due object is sealed before any state is written, so none is counted nowhere.
                    await self._seal(due)
                    self._reading_from = None
                    await self._record_progress()
                else:
                    moved = reader.lsn > read_from  # frames read, none of them this zone's
                    self._reading_from = None
                    if moved:
                        await self._record_progress()
                    else:
                        await asyncio.sleep(0.01)  # durable data not yet visible in the file; never spin
            await self._seal(self._due_by_age())
            if self._draining and self._reader.lsn >= self._wal.durable_lsn:
                await self._seal(list(self._open.values()), reason="drain")
                await asyncio.gather(*list(self._uploads), return_exceptions=True)
                await self._persist_state()
                return
            if len(self._sealed) >= 2 * self.settings.max_uploads_in_flight:
                # Back-pressure: stop reading until an upload finishes; the WAL holds the rest.
                if self._uploads:
                    await asyncio.wait(set(self._uploads), return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(delay)
            self._report_backlog()

    async def _retire(self) -> None:
        """Land the last objects, keep the position at ``until`` (where a zone turned on again resumes),
        then release every segment."""
        await self._seal(list(self._open.values()), reason="retire")
        while self._uploads:
            await asyncio.gather(*list(self._uploads), return_exceptions=True)
        await self._persist_state()
        self._retired = True
        self._wal.release(self.zone, RETIRED)
        log.warning("zone retired: everything it owed has landed", extra={"zone": self.zone, "gateway_id": self.settings.gateway_id, "until_lsn": self._state.until})

    async def _gather(self, lsn: int) -> None:
        """Let frames gather until ``read_interval_secs`` after the last read, unless a full read waits."""
        wait = self._last_read + self.settings.read_interval_secs - time.monotonic()
        if wait > 0 and not self._draining and self._wal.durable_lsn - lsn < GATHER_RECORDS:
            await asyncio.sleep(wait)
        self._last_read = time.monotonic()

    async def _record_progress(self) -> None:
        """Persist the position once it has moved into a later segment, so that segment can go."""
        if self._wal.segment_start(self._current_position()) > self._persisted_segment:
            await self._persist_state()

    async def _prepare_each(self, frames: list[Frame]) -> tuple[list[Frame], dict[int, str]]:
        """Prepare frames one by one: those that still fail come back by LSN with the reason, in place.

        Raises when every frame fails: the step is broken (a scorer that stopped), not the frames,
        and they are read again later rather than dead-lettered. A frame is set aside only if it
        fails again after a frame read with it prepared (the step may have come back between them).
        """
        prepared: dict[int, list] = {}
        failed: dict[int, str] = {}
        for _ in range(2):
            error: Exception | None = None
            for frame in [f for f in frames if f.lsn not in prepared]:
                try:
                    prepared[frame.lsn] = await self._prepare([frame])
                    failed.pop(frame.lsn, None)
                except Exception as exc:
                    failed[frame.lsn] = f"prepare failed: {type(exc).__name__}: {exc}"
                    error = exc
            if error is None:
                break
            if not prepared:
                raise RuntimeError(f"every one of {len(frames)} frames failed to prepare alone") from error
        return [f for frame in frames for f in prepared.get(frame.lsn, [frame])], failed

    def _absorb(self, frames: list[Frame], unpreparable: dict[int, str] | None = None) -> list[_Pending]:
        """Add frames to open objects (off the event loop: compression is the cost here).

        A frame in ``unpreparable`` becomes a dead-letter object of its own, after the open object
        of its hour (sealed first, so the hour's objects still land in LSN order).
        """
        now = self._clock()
        due: list[_Pending] = []
        # Hour by hour, each hour's frames in LSN order: a read whose records span more hours than
        # max_open_partitions (a device uploading a week of hourly readings) then fills one object
        # per hour, where frame by frame nearly every frame rolled another hour's object early.
        for frame in sorted(frames, key=_HOUR):
            if not self._wanted(frame):
                continue
            if unpreparable and frame.lsn in unpreparable:
                if frame.hour in self._open:
                    due.append(self._open.pop(frame.hour))
                bad = _Pending(frame.hour, self._new_builder(), frame.lsn, frame.lsn, now, frame.received_ms)
                bad.records, bad.last_lsn = frame.count, frame.end_lsn - 1
                bad.dead_letter_reason = unpreparable[frame.lsn]
                due.append(bad)
                continue
            pending = self._open.get(frame.hour)
            if pending is not None and pending.cut_at is not None and frame.lsn > pending.cut_at:
                # Frames of an object written down before a crash are missing (a damaged block, mended
                # at start): it still ends, and is named, as written down, so it replaces the object
                # that may have landed then instead of landing its records a second time.
                pending.last_lsn = pending.cut_at
                del self._open[frame.hour]
                due.append(pending)
                pending = None
            if pending is None:
                evictable = [p for p in self._open.values() if p.cut_at is None]
                if len(self._open) >= self.settings.max_open_partitions and evictable:
                    # The least recently written partition makes room: rolled early, never dropped.
                    # One being rebuilt to a boundary written down before a crash is never cut elsewhere.
                    victim = min(evictable, key=lambda p: p.touched)
                    del self._open[victim.hour]
                    due.append(victim)
                    self._rolled_early += 1
                first = self._intent_holding(frame)
                pending = _Pending(frame.hour, self._new_builder(), first, frame.lsn, now, frame.received_ms)
                pending.cut_at = self._intents.pop((frame.hour, first), None)
                if pending.cut_at is not None:
                    intent = _intent_id(frame.hour, first)
                    gateway_id, dataset = self._state.names.get(intent, (self.settings.gateway_id, self.settings.dataset))
                    pending.named = (gateway_id, dataset, self._state.tags.get(intent, ""))
                self._open[frame.hour] = pending
            pending.add(frame, now)
            full = pending.builder.size >= self.settings.target_object_bytes
            if (pending.cut_at is not None and pending.last_lsn >= pending.cut_at) or (
                pending.cut_at is None and full
            ):
                del self._open[frame.hour]
                due.append(pending)
        for pending in self._open.values():
            if pending.touched == now:  # written by this read
                pending.builder.settle()
        return due + self._over_budget()

    def _intent_holding(self, frame: Frame) -> int:
        """The first LSN of the object written down before a crash whose range holds ``frame`` (its
        first frames lost to a damaged block), else the frame's own."""
        for (hour, first), last in self._intents.items():
            if hour == frame.hour and first < frame.lsn <= last:
                return first
        return frame.lsn

    def _over_budget(self) -> list[_Pending]:
        """The largest open objects, rolled early, while the open objects hold more memory than
        ``max_open_bytes``: down to half of it, so the next read does not roll another at once."""
        held = sum(p.builder.held for p in self._open.values())
        if held <= self.settings.max_open_bytes:
            return []
        due = []
        for pending in sorted(self._open.values(), key=lambda p: p.builder.held, reverse=True):
            if held <= self.settings.max_open_bytes // 2:
                break
            if pending.cut_at is None:  # one rebuilt to a boundary written down before a crash keeps it
                del self._open[pending.hour]
                due.append(pending)
                held -= pending.builder.held
                self._rolled_early += 1
        return due

    def _report_rolled_early(self) -> None:
        """Count the objects the last read's evictions rolled, and say so at most once a minute."""
        rolled, self._rolled_early = self._rolled_early, 0
        if not rolled:
            return
        self._observer.rolled_early(self.zone, rolled)
        now = time.monotonic()
        if now >= self._next_rolled_early_log:
            self._next_rolled_early_log = now + ROLLED_EARLY_LOG_SECS
            log.warning(
                "more hour partitions are being written than lake.max_open_partitions or lake.max_open_bytes "
                "hold: objects are rolled early and land smaller (a backfill spanning many hours?)",
                extra={"zone": self.zone, "objects_rolled_early": rolled, "max_open_partitions": self.settings.max_open_partitions,
                       "max_open_bytes": self.settings.max_open_bytes},
            )

    def _wanted(self, frame: Frame) -> bool:
        """This zone's kind, and not landed before a crash (replay must not land it twice)."""
        return frame.kind in self._kinds and frame.end_lsn - 1 > self._state.landed.get(str(frame.hour), -1)

    def _due_by_age(self) -> list[_Pending]:
        limit = self.settings.max_object_age_secs
        now = self._clock()
        due = [p for p in self._open.values() if p.cut_at is None and now - p.opened_at >= limit]
        # One rebuilt to a boundary written down before a crash, whose range the reader has passed
        # (called between reads): the frames it lacks were lost to damage, and no later frame of its
        # hour may come to end it. It ends at its boundary now, rather than hold the position back.
        for pending in self._open.values():
            if pending.cut_at is not None and self._reader.lsn > pending.cut_at:
                pending.last_lsn = pending.cut_at
                due.append(pending)
        return due

    def _seconds_to_next_roll(self) -> float | None:
        ages = [p.opened_at for p in self._open.values() if p.cut_at is None]
        if not ages:
            return None
        return max(0.0, min(ages) + self.settings.max_object_age_secs - self._clock())

    # -- sealing and landing -----------------------------------------------------------------

    async def _seal(self, due: list[_Pending], reason: str = "") -> None:
        """Fix the objects' boundaries durably (one state write for all), then start their uploads."""
        if not due:
            return
        for pending in due:
            if self._open.get(pending.hour) is pending:
                del self._open[pending.hour]
            self._sealed.append(pending)
            intent = (pending.hour, pending.first_lsn, pending.last_lsn)
            if intent not in self._state.sealed:
                self._state.sealed.append(intent)
            if pending.named is None:
                pending.named = (self.settings.gateway_id, self.settings.dataset, _draw_tag())
            gateway_id, dataset, tag = pending.named
            self._state.names[_intent_id(pending.hour, pending.first_lsn)] = (gateway_id, dataset)
            if tag:
                self._state.tags[_intent_id(pending.hour, pending.first_lsn)] = tag
        await self._persist_state()
        for pending in due:
            previous = self._chains.get(pending.hour)
            task = asyncio.create_task(self._land(pending, previous), name=f"land-{self.zone}-{pending.first_lsn}")
            self._chains[pending.hour] = task
            self._uploads.add(task)
            task.add_done_callback(self._uploads.discard)

    async def _land(self, pending: _Pending, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # Objects of one partition land in order, so its "landed" watermark never skips one.
            await asyncio.gather(previous, return_exceptions=True)
        if pending.dead_letter_reason is not None:
            log.critical(
                "a frame could not be prepared for this zone; its records go to the dead-letter prefix",
                extra={"zone": self.zone, "first_lsn": pending.first_lsn, "last_lsn": pending.last_lsn, "error": pending.dead_letter_reason},
            )
            await self._dead_letter(pending, pending.dead_letter_reason)
        else:
            await self._build_and_upload(pending)
        self._sealed.remove(pending)
        self._state.sealed.remove((pending.hour, pending.first_lsn, pending.last_lsn))
        self._state.names.pop(_intent_id(pending.hour, pending.first_lsn), None)
        self._state.tags.pop(_intent_id(pending.hour, pending.first_lsn), None)
        self._state.landed[str(pending.hour)] = pending.last_lsn
        await self._persist_state()
        if self._chains.get(pending.hour) is asyncio.current_task():
            del self._chains[pending.hour]

    async def _build_and_upload(self, pending: _Pending) -> None:
        try:
            body = await asyncio.to_thread(pending.builder.finish)
        except Exception as exc:
            self._observer.landing_failed(self.zone, exc)
            log.critical(
                "building an object failed; its records go to the dead-letter prefix",
                exc_info=True,
                extra={"zone": self.zone, "first_lsn": pending.first_lsn, "last_lsn": pending.last_lsn},
            )
            await self._dead_letter(pending, f"build failed: {type(exc).__name__}: {exc}")
        else:
            await self._upload(pending, self._lake_object(pending, body))

    async def _upload(self, pending: _Pending, obj: LakeObject) -> LandedObject:
        """Land ``obj``, retrying while the sink may recover; dead-letter it if the sink refuses it for good."""
        delay = self.settings.retry_initial_secs
        refusals = 0
        while True:
            started = time.perf_counter()
            try:
                async with self._upload_slots:
                    landed = await self._sink.put_object(obj)
                self._observer.landed(self.zone, landed, time.perf_counter() - started)
                return landed
            except Exception as exc:
                # Never give up on a sink that may come back: the records are acknowledged and wait in the WAL.
                self._observer.landing_failed(self.zone, exc)
                if isinstance(exc, PermanentError):
                    refusals += 1
                    if refusals >= self.settings.max_object_attempts:
                        # Dead-lettered only if the sink takes another object: one that refuses that
                        # too (access denied, no such bucket) refuses everything, and when it is mended
                        # the records belong in their zone, not under the dead-letter prefix.
                        landed = await self._dead_letter(pending, f"refused by the sink: {exc}", attempts=1)
                        if landed is not None:
                            return landed
                        refusals = 0
                if isinstance(exc, ConnectorError):
                    level = logging.ERROR if isinstance(exc, PermanentError) else logging.WARNING
                    log.log(level, "landing failed; will retry", extra={"zone": self.zone, "key": obj.key, "error": str(exc)})
                else:  # a sink that did not translate its error: still retried, and loudly
                    log.exception("landing failed with an unexpected error; will retry", extra={"zone": self.zone, "key": obj.key})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_secs)

    async def _dead_letter(self, pending: _Pending, reason: str, attempts: int | None = None) -> LandedObject | None:
        """Land the object's records as they are in the WAL, with the reason, under the dead-letter prefix.

        Retried until it lands, or given up (None) after ``attempts`` refusals for good.
        """
        body, records = await asyncio.to_thread(self._rebuild_plain, pending)
        obj = self._lake_object(pending, body, prefix=f"{DEAD_LETTER_PREFIX}/", extension=ZstdNdjsonBuilder.extension)
        obj = dataclasses.replace(obj, records=records, metadata={**obj.metadata, "deadletter-reason": reason[:512]})
        delay = self.settings.retry_initial_secs
        while True:
            try:
                async with self._upload_slots:
                    landed = await self._sink.put_object(obj)
            except Exception as exc:
                self._observer.landing_failed(self.zone, exc)
                if attempts is not None and isinstance(exc, PermanentError):
                    attempts -= 1
                    if attempts <= 0:
                        log.error(
                            "the sink refuses the dead-letter object too: it refuses everything, not this object; retrying it",
                            extra={"zone": self.zone, "key": obj.key, "error": str(exc)},
                        )
                        return None
                log.error("dead-lettering failed; will retry", extra={"zone": self.zone, "key": obj.key, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_secs)
                continue
            log.critical("object dead-lettered", extra={"zone": self.zone, "key": obj.key, "records": records, "reason": reason})
            self._observer.dead_lettered(self.zone, records, reason.split(":", 1)[0])
            self._observer.landed(self.zone, landed, 0.0)
            return landed

    def _rebuild_plain(self, pending: _Pending) -> tuple[bytes, int]:
        """The pending object's records, read again from the WAL, as zstd NDJSON."""
        builder = ZstdNdjsonBuilder()
        records = 0
        reader = self._wal.reader(pending.first_lsn)
        try:
            while reader.lsn <= pending.last_lsn:
                frames = reader.read(READ_BATCH_BYTES, self._kinds)
                if not frames:
                    break
                for frame in frames:
                    if frame.lsn > pending.last_lsn:
                        break
                    if frame.hour == pending.hour and self._wanted(frame):
                        builder.add(frame)
                        records += frame.count
        finally:
            reader.close()
        return builder.finish(), records

    def _lake_object(self, pending: _Pending, body: bytes, prefix: str = "", extension: str = "") -> LakeObject:
        s = self.settings
        gateway_id, dataset, tag = pending.named or (s.gateway_id, s.dataset, "")
        dt = time.strftime("%Y-%m-%d", time.gmtime(pending.hour * 3600))
        hh = time.strftime("%H", time.gmtime(pending.hour * 3600))
        partition = Partition(zone=s.zone, dataset=dataset, dt=dt, hour=hh)
        name = object_name(gateway_id, pending.first_lsn, pending.last_lsn, tag)
        return LakeObject(
            partition=partition,
            key=f"{prefix}{partition.prefix}/{name}.{extension or pending.builder.extension}",
            body=body,
            content_type=pending.builder.content_type,
            records=pending.records,
            first_lsn=pending.first_lsn,
            last_lsn=pending.last_lsn,
            min_event_ms=pending.min_event_ms,
            max_event_ms=pending.max_event_ms,
            metadata=dict(s.extra),
        )

    # -- state -------------------------------------------------------------------------------

    def _current_position(self) -> int:
        # Copies (one C call each): a scrape reads this while _absorb may run in its thread.
        firsts = [p.first_lsn for p in (*tuple(self._open.values()), *tuple(self._sealed))]
        if self._reading_from is not None:
            firsts.append(self._reading_from)
        if self.settings.retiring:  # a zone turned on again resumes exactly where it stopped owing
            firsts.append(self._state.until)
        return min([self._reader.lsn, *firsts])

    async def _persist_state(self) -> None:
        """Write the state (retrying until it is written), then release segments. Returns once a write
        that began after this call is durable, its own or one it waited for: that write holds every
        change made before the call, so a call finding one already done writes nothing more."""
        self._state_asked += 1
        asked = self._state_asked
        delay = self.settings.retry_initial_secs
        async with self._state_lock:
            if self._state_covered >= asked:  # written while this call waited for the lock
                return
            while True:
                covered = self._state_asked
                position = self._current_position()
                state = self._state
                state.position = position
                # A partition's watermark matters only while its frames may still be replayed.
                state.landed = {h: lsn for h, lsn in state.landed.items() if lsn >= position}
                try:
                    await asyncio.to_thread(self._state_file.write, msgspec.json.encode(state))
                    break
                except OSError as exc:
                    self._observer.landing_failed(self.zone, exc)
                    log.error("cannot write the zone's state; will retry", extra={"zone": self.zone, "error": str(exc)})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.retry_max_secs)
            self._state_covered = covered
            self._persisted_segment = self._wal.segment_start(position)
            self._wal.release(self.zone, position)

    def _load_state(self) -> LanderState:
        ensure_directory(self._state_dir)
        payload = self._state_file.open()
        if payload is None and self._state_file.damaged:
            log.error(
                "the zone's state file is damaged: landing again from the oldest record the WAL holds, "
                "so objects already landed from those records may land twice",
                extra={"zone": self.zone, "state_file": str(self._state_file.path), "from_lsn": self._wal.first_lsn},
            )
        if payload is None:
            legacy = self._state_dir / f"{self.zone}.json"  # written by earlier versions
            try:
                payload = legacy.read_bytes()
            except FileNotFoundError:
                return LanderState()
        state = msgspec.json.decode(payload, type=LanderState)
        # Intents whose frames are all gone from the WAL were landed before their state was written.
        floor = self._wal.first_lsn
        state.sealed = [intent for intent in state.sealed if intent[2] >= floor]
        kept = {_intent_id(hour, first) for hour, first, _ in state.sealed}
        state.names = {key: names for key, names in state.names.items() if key in kept}
        state.tags = {key: tag for key, tag in state.tags.items() if key in kept}
        return state

    def unlanded(self) -> tuple[int, float]:
        """Now: WAL bytes this zone has not landed, and how long its oldest unlanded record has waited."""
        if self._reader is None or self._retired:
            return 0, 0.0
        pending = (*tuple(self._open.values()), *tuple(self._sealed))  # copies: _absorb runs in a thread
        oldest_ms = min((p.oldest_received_ms for p in pending), default=None)
        age = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms else 0.0
        return self._wal.backlog_bytes(self._current_position()), age

    def _report_backlog(self) -> None:
        self._observer.backlog(self.zone, *self.unlanded())


def _draw_tag() -> str:
    """The last part of a new object's key: 8 random letters (37 bits), so that two writers numbering
    their records alike (two gateways given one gateway_id, a disk cloned with its WAL) never share a
    key. Letters only: a key still reads unambiguously as ``<gateway_id>-<digits>-<digits>-<letters>``."""
    return "".join(string.ascii_lowercase[byte % 26] for byte in os.urandom(TAG_LETTERS))


def _intent_id(hour: int, first_lsn: int) -> str:
    return f"{hour}:{first_lsn}"


def _if_failed(task: asyncio.Task[None], call: Callable[[BaseException], None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        call(task.exception())
