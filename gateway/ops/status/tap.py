"""``edge-gateway tap``: a sample of the records passing a stage of a running gateway, as NDJSON.

Stages, in the words of the record's path (gateway/lake/pipeline.py):

    received     accepted records, as the raw zone will hold them (read back from the WAL once durable)
    quarantined  refused records with their reason (the quarantine zone's lines, from the WAL)
    landed       a sampled received or quarantined record when the object holding it lands (zone, key)
    scored       curated records with their inference result, once scored

A tap costs nothing while nobody listens. While one does, it reads the WAL from its durable end with
a reader of its own (it never holds a segment back: it registers as no consumer, and starts over at
the end should the log move past it), and it listens to the landing observer and the curated
scorer. Each stage is sampled to ``rate`` events a second (a token bucket); ``device`` keeps only
one device's records. Events that the client does not read in time are dropped, never buffered
without bound: the next event carries ``dropped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import deque
from dataclasses import dataclass

import msgspec

from connectors.base import object_lsns
from gateway.durable.wal import KIND_QUARANTINE, KIND_RECORDS, Frame

log = logging.getLogger(__name__)

STAGES = ("received", "quarantined", "landed", "scored")
READ_BYTES = 1024 * 1024
QUEUE_EVENTS = 1000
TRACKED_FOR_LANDING = 10_000
_PARTITION = re.compile(r"dt=(\d{4}-\d\d-\d\d)/hour=(\d\d)/[^/]+$")


class _Device(msgspec.Struct):
    device_id: str = ""


_device_of = msgspec.json.Decoder(_Device)


@dataclass(frozen=True)
class TapRequest:
    stages: frozenset[str]
    device: str | None = None
    rate: float = 10.0

    @classmethod
    def from_query(cls, query) -> TapRequest:
        stages = frozenset(s for s in query.get("stage", ",".join(STAGES)).split(",") if s)
        unknown = stages - set(STAGES)
        if unknown or not stages:
            raise ValueError(f"unknown stage {', '.join(sorted(unknown)) or '(none)'}; choose from {', '.join(STAGES)}")
        rate = float(query.get("rate", "10"))
        if not 0 < rate <= 10_000:
            raise ValueError("rate must be in (0, 10000] events a second")
        return cls(stages, query.get("device") or None, rate)

    def query(self) -> str:
        parts = [f"stage={','.join(sorted(self.stages))}", f"rate={self.rate:g}"]
        if self.device:
            parts.append(f"device={self.device}")
        return "&".join(parts)


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.updated = rate, max(1.0, rate), time.monotonic()

    def take(self, wanted: int) -> int:
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


@dataclass(slots=True)
class _Tracked:
    kind: int
    hour: int
    first_lsn: int
    last_lsn: int
    device_id: str
    seq: int | None
    zones: set[str]


class Tap:
    """One listener's sample of the stages it asked for; ``events()`` yields them as dicts."""

    def __init__(self, gateway, request: TapRequest) -> None:
        self.gw = gateway
        self.request = request
        self.queue: asyncio.Queue[dict] = asyncio.Queue(QUEUE_EVENTS)
        self.dropped = 0
        self._buckets = {stage: _Bucket(request.rate) for stage in STAGES}
        self._tracked: deque[_Tracked] = deque(maxlen=TRACKED_FOR_LANDING)
        self._tasks: list[asyncio.Task] = []
        self._undo: list = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        wanted = self.request.stages
        if wanted & {"received", "quarantined", "landed"}:
            self._tasks.append(asyncio.create_task(self._read_wal(), name="tap-wal"))
        if "landed" in wanted:
            self._undo.append(self.gw.metrics.on_landed(self._on_landed))
        scorer = self.gw.pipeline.scorer
        if "scored" in wanted and scorer is not None:
            scorer.listeners.append(self._on_scored)
            self._undo.append(lambda: scorer.listeners.remove(self._on_scored))

    async def close(self) -> None:
        for undo in self._undo:
            with contextlib.suppress(ValueError):
                undo()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def events(self):
        while True:
            event = await self.queue.get()
            if self.dropped:
                event["dropped"], self.dropped = self.dropped, 0
            yield event

    def _emit(self, event: dict) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    # -- received and quarantined: the WAL, read from its durable end ------------------------

    async def _read_wal(self) -> None:
        wal = self.gw.pipeline.wal
        kinds = frozenset({KIND_RECORDS, KIND_QUARANTINE})
        reader = wal.reader(wal.durable_lsn)
        try:
            while True:
                await wal.wait_for_data(reader.lsn, 1.0)
                try:
                    frames = await asyncio.to_thread(reader.read, READ_BYTES, kinds)
                except (OSError, ValueError, IndexError):  # the segment under us was released: start at the end
                    reader.close()
                    reader = wal.reader(wal.durable_lsn)
                    continue
                for frame in frames:
                    if frame.kind in kinds and frame.payload:
                        self._frame(frame)
                if not frames:
                    await asyncio.sleep(0.05)
        finally:
            reader.close()

    def _frame(self, frame: Frame) -> None:
        stage = "received" if frame.kind == KIND_RECORDS else "quarantined"
        device = self.request.device
        if device is not None and f'"device_id":"{device}"'.encode() not in frame.payload:
            return
        lines = [line for line in frame.payload.split(b"\n") if line]
        if device is not None:
            lines = [line for line in lines if _device_of.decode(line).device_id == device]
        wants_stage = stage in self.request.stages
        wants_landing = "landed" in self.request.stages
        bucket = self._buckets[stage if wants_stage else "landed"]
        taken = bucket.take(len(lines)) if lines else 0
        if not taken:
            return
        for line in random.sample(lines, taken) if taken < len(lines) else lines:
            entry = msgspec.json.decode(line)
            if wants_stage:
                self._emit(_received(entry) if stage == "received" else _quarantined(entry))
            if wants_landing:
                zones = {"raw", "curated"} if frame.kind == KIND_RECORDS and self.gw.pipeline.scorer is not None else (
                    {"raw"} if frame.kind == KIND_RECORDS else {"quarantine"}
                )
                self._tracked.append(
                    _Tracked(frame.kind, frame.hour, frame.lsn, frame.end_lsn - 1, entry.get("device_id", ""), entry.get("seq"), zones)
                )

    # -- landed: the landing observer --------------------------------------------------------

    def _on_landed(self, zone: str, landed) -> None:
        partition = _PARTITION.search(landed.key)
        lsns = object_lsns(landed.key.rsplit("/", 1)[-1], self.gw.gateway_id)
        if partition is None or lsns is None:
            return  # another WAL's object (the lake process lands several): its LSNs are not ours
        (dt, hh), (first, last) = partition.groups(), lsns
        for tracked in list(self._tracked):
            if zone not in tracked.zones or not (first <= tracked.first_lsn and tracked.last_lsn <= last):
                continue
            when = time.gmtime(tracked.hour * 3600)
            if (time.strftime("%Y-%m-%d", when), time.strftime("%H", when)) != (dt, hh):
                continue
            tracked.zones.discard(zone)
            if not tracked.zones:
                self._tracked.remove(tracked)
            self._emit({"stage": "landed", "zone": zone, "key": landed.key, "url": landed.url,
                        "device_id": tracked.device_id, "seq": tracked.seq, "at": _now()})

    # -- scored: the curated scorer ----------------------------------------------------------

    def _on_scored(self, frames) -> None:
        import pyarrow.compute as pc

        bucket = self._buckets["scored"]
        for frame in frames:
            table = frame.table
            if self.request.device is not None:
                table = table.filter(pc.equal(table["device_id"], self.request.device))
            taken = bucket.take(table.num_rows) if table.num_rows else 0
            if not taken:
                continue
            rows = table.select(["device_id", "seq", "event_time", "inference"])
            picks = sorted(random.sample(range(rows.num_rows), taken)) if taken < rows.num_rows else range(rows.num_rows)
            for row in rows.take(list(picks)).to_pylist():
                self._emit(
                    {"stage": "scored", "device_id": row["device_id"], "seq": row["seq"],
                     "event_time": row["event_time"].isoformat() if row["event_time"] else None,
                     "inference": row["inference"], "at": _now()}
                )


def _received(entry: dict) -> dict:
    return {
        "stage": "received",
        "device_id": entry.get("device_id"),
        "seq": entry.get("seq"),
        "ingest_id": entry.get("ingest_id"),
        "received_at": entry.get("received_at"),
        "partitioned_by": entry.get("partitioned_by"),
        "record": entry.get("record"),
        "at": _now(),
    }


def _quarantined(entry: dict) -> dict:
    return {
        "stage": "quarantined",
        "device_id": entry.get("device_id"),
        "reason": entry.get("reason"),
        "ingest_id": entry.get("ingest_id"),
        "index": entry.get("index"),
        "raw": entry.get("raw"),
        "at": _now(),
    }


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def run_client(url: str, token: str, request: TapRequest, limit: int | None, out) -> int:
    """``edge-gateway tap``: print the stream's events, one JSON object a line, until ``limit`` or Ctrl-C."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url.rstrip('/')}/admin/tap?{request.query()}", headers={"Authorization": f"Bearer {token}"})
    shown = 0
    try:
        with urllib.request.urlopen(req, timeout=None) as resp:
            pending = b""
            # read1: whatever has arrived (line iteration would wait for a buffer to fill).
            while data := resp.read1(65536):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue  # the stream's heartbeat
                    out.write(line.decode() + "\n")
                    out.flush()
                    shown += 1
                    if limit is not None and shown >= limit:
                        return 0
    except urllib.error.HTTPError as exc:
        raise TapError(f"{url} answered {exc.code}: {exc.read().decode(errors='replace').strip()}") from None
    except urllib.error.URLError as exc:
        raise TapError(f"cannot reach the admin listener at {url}: {exc.reason}") from None
    except KeyboardInterrupt:
        return 0
    return 0


class TapError(Exception):
    """The tap could not be opened (no admin listener, a wrong token, a bad stage)."""
