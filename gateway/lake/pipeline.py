"""The path of a record, end to end (docs/architecture.md, steps 1-10), in one screen.

Each step lives in the subpackage named for its part of the path (modules under ``gateway/``):

    device --HTTPS--> ALB --HTTP--> gateway      (edge/: admission, limits, proxy, TLS, replay)
      1 receive       ingest/handler.py: the body as sent, spooled with bounded memory (ingest/spool.py)
      2 authenticate  auth/hmac.py: HMAC v1 over the body as sent, or auth/certificate.py;
                      auth/registry.py (or auth/secrets_source.py); replays refused by edge/replay.py
      3 validate      ingest/body.py decompresses and frames; ingest/validate.py decodes with the
                      msgspec schema (ingest/records.py), invalid records become quarantine frames
      4 enrich        ingest/enrich.py: received_at, gateway_id, AZ, ingest_id, device metadata,
                      clock skew
      5 persist       Pipeline.persist: one WAL write per request, group-commit fsync in the WAL's
                      writer thread (durable/wal.py); the retry ledger (durable/retry_ledger.py)
                      learns it before the ack
      6 ack           ingest/handler.py: 202 once persist returns
      7 land raw      ZoneLander("raw") consumes the WAL (lake/landing.py, lake/formats.py)
      8 infer         lake/curated.py: adaptive micro-batches to Triton or the embedded model
      9 land curated  ZoneLander("curated"): scored records as Parquet (lake/curated.py)
     10 commit        each lander releases WAL segments once it has landed them (lake/landing.py)

Steps 7-10 are independent WAL consumers: a slow zone never stalls acks until the WAL is full.
With several workers they run in the lake process (lake/lake_process.py), over every worker's WAL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import msgspec

from connectors.base import ObjectSink
from gateway.lake.landing import ZoneLander, recorded_floor
from gateway.durable.wal_board import ZONES
from gateway.lake.zones import Zones, consumers_dir, needs_scorer
from gateway.ops.metrics import GatewayMetrics
from gateway.durable.ledger_catch_up import RequestRecord, catch_up
from gateway.durable.retry_ledger import RetryLedger
from gateway.settings import Settings
from gateway.ingest.spool import Spool
from gateway.durable.wal import KIND_REQUEST, WriteAheadLog, encode_frame, fresh_log_origin
from gateway.durable.wal_board import ReleasedPositions, durable_board, released_board
from gateway.durable.wal_layout import WalSlot, wal_id

if TYPE_CHECKING:
    from gateway.lake.curated import CuratedScorer

log = logging.getLogger(__name__)


def recorded_floor_of(slot: WalSlot, ledger: RetryLedger | None) -> int:
    """The LSN past everything recorded of a WAL outside it: what its zones read and, when a retry
    ledger is kept, its mark. A log found to end before it (its newest segment removed) numbers new
    records from there: a zone would take them for records it landed, and a catch-up after a crash
    would start past them."""
    floor = recorded_floor(consumers_dir(slot.directory))
    if ledger is not None:
        floor = max(floor, ledger.mark(wal_id(slot.directory)))
    return floor


@dataclass(slots=True)
class Durable:
    """What one request adds to the retry ledger once its frames are durable."""

    seqs: list[tuple[str, int, int]] = field(default_factory=list)
    request: tuple[bytes, str, bytes] | None = None
    spans: list[bytes] = field(default_factory=list)  # its in-flight spans, ended once it is durable


class Pipeline:
    """Steps 5-10 in a worker: its WAL and retry ledger, and its zones unless the lake process lands them.

    ``landing_elsewhere``: the lake process (gateway/lake/lake_process.py) follows this WAL, and the
    worker deletes a segment once every zone's released position (wal_board.py) has passed it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        slot: WalSlot,
        sink: ObjectSink | None,
        metrics: GatewayMetrics,
        ledger: RetryLedger | None = None,
        landing_elsewhere: bool = False,
    ) -> None:
        wal_dir = slot.directory
        self.slot = slot
        self.spool_dir = wal_dir / "spool"
        self.ledger = ledger
        self.wal_id = ""
        self._metrics = metrics
        self.wal = WriteAheadLog(
            wal_dir / "segments",
            segment_bytes=settings.wal.segment_bytes,
            max_total_bytes=settings.wal.max_total_bytes,
            fsync=settings.wal.fsync,
            on_fsync=metrics.wal_fsync.observe,
            on_durable=self._record_durable,
            on_rollback=self._forget_beyond,
            board=durable_board(wal_dir) if landing_elsewhere else None,
            first_lsn=fresh_log_origin(),  # used only if the directory holds no log yet
            floor=lambda: recorded_floor_of(slot, ledger),
            before_delete=ledger.make_journal_durable if ledger is not None else None,
        )
        self.zones: Zones | None = None
        self.scorer: CuratedScorer | None = None
        self._released: ReleasedPositions | None = None
        self._follow_task: asyncio.Task[None] | None = None
        if landing_elsewhere:
            self._released = ReleasedPositions(released_board(wal_dir))
            return
        if needs_scorer(settings, [wal_dir]):
            # Imported only here: NumPy, Arrow and the batcher cost a worker 0.2 s of start-up and
            # tens of MiB that a gateway landing only the raw zone never uses.
            from gateway.lake.curated import CuratedScorer

            self.scorer = CuratedScorer(settings.inference, metrics)
        assert sink is not None, "a worker that lands its own WAL needs a sink"
        self.zones = Zones(settings, wal=self.wal, slot=slot, sink=sink, metrics=metrics, scorer=self.scorer)

    @property
    def landers(self) -> list[ZoneLander]:
        return self.zones.landers if self.zones is not None else []

    async def start(self, stop_requested: Callable[[], bool] = lambda: False) -> None:
        """``StoppedWhileStarting`` if ``stop_requested()`` while it catches the retry ledger up."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.spool_dir.glob("spool-*"):  # only left behind by a crash; never durable
            stale.unlink(missing_ok=True)
        await self.wal.start()
        try:
            if self.ledger is not None:
                self.wal_id = await asyncio.to_thread(wal_id, self.slot.directory)
                await asyncio.to_thread(self._catch_up_ledger, stop_requested)
            if self.zones is None:
                # The lake process publishes every zone: a position, or RETIRED for one that is off and owes nothing.
                self.wal.expect_consumers(ZONES)
                self._follow_task = asyncio.create_task(self._follow_releases(), name="wal-releases")
                return
            if self.scorer is not None:
                await self.scorer.start()
            await self.zones.start()
        except BaseException:
            await self.close()  # nothing keeps running half-started
            raise

    async def _follow_releases(self, interval: float = 0.1) -> None:
        """Delete the segments every zone of the lake process has landed (its released positions)."""
        failing = False
        while True:
            try:
                for zone, position in self._released.read().items():
                    self.wal.release(zone, position)
                failing = False
            except Exception:  # a damaged board only delays deletion: the WAL refuses when full
                if not failing:  # once, not ten times a second
                    log.exception("reading the lake process's released positions failed; no segment is deleted meanwhile")
                failing = True
            await asyncio.sleep(interval)

    def new_spool(self, memory_bytes: int) -> Spool:
        return Spool(self.spool_dir, memory_bytes)

    async def persist(
        self,
        spool: Spool,
        seqs: list[tuple[str, int, int]] = (),
        request: tuple[bytes, str, bytes] | None = None,
        spans: list[bytes] = (),
    ) -> None:
        """Step 5: append a request's frames to the WAL, all or none; returns once they are fsynced.

        ``seqs`` and ``request`` (retry key, body hash, answer) reach the retry ledger once durable,
        and the request's in-flight ``spans`` end there at the same moment.
        """
        if spool.empty:  # every record was a duplicate: nothing to make durable, only the answer to keep
            if request is not None and self.ledger is not None:
                self.ledger.record(self.wal_id, 0, [], [request], list(spans))
            return
        if request is not None and self.ledger is not None:
            spool.add(encode_frame(KIND_REQUEST, 0, 0, 0, 0, 0, msgspec.msgpack.encode(RequestRecord(*request))))
        note = Durable(list(seqs), request, list(spans)) if self.ledger is not None else None
        await self.wal.commit(spool.drain(), spool.bytes, spool.frame_count, note)

    # -- the retry ledger follows the WAL ----------------------------------------------------

    def _record_durable(self, lsn: int, done: list[Durable | None]) -> None:
        """In the WAL's writer thread: what is now durable goes into the ledger before anyone is answered."""
        done = [d for d in done if d is not None]
        if self.ledger is None or not done:
            return
        seqs = [s for d in done for s in d.seqs]
        requests = [d.request for d in done if d.request is not None]
        spans = [span for d in done for span in d.spans]
        try:
            self.ledger.record(self.wal_id, lsn, seqs, requests, spans)
        except Exception as exc:  # whatever it is, it must not stop the WAL's commits
            # The records are durable and will be acknowledged; only their retries may land twice.
            # The mark did not move, so the next start reads them from the WAL again.
            self._metrics.stage_errors.labels("ledger", type(exc).__name__).inc()
            log.error("retry ledger not updated; retries of these requests may land twice", extra={"error": str(exc)})

    def _forget_beyond(self, lsn: int) -> None:
        """The WAL was cut back to ``lsn`` after a failed fsync: what it held past that never happened."""
        if self.ledger is not None and self.wal_id:
            try:
                self.ledger.forget_mark_beyond(self.wal_id, lsn)
            except Exception as exc:
                log.error("retry ledger mark not moved back", extra={"error": str(exc)})

    def _catch_up_ledger(self, stop_requested: Callable[[], bool]) -> None:
        """Record what the WAL holds past the ledger's mark (a crash came between fsync and ledger)."""
        catch_up(self.wal, self.ledger, self.wal_id, self.slot.directory, stop_requested)
        self.ledger.writes(self.wal_id)

    async def drain(self, deadline_secs: float | None) -> bool:
        """Land what the WAL holds within the deadline; what does not land is replayed next start.

        With the lake process landing, it drains after the workers (the supervisor's order).
        """
        return await self.zones.drain(deadline_secs) if self.zones is not None else True

    async def close(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            await asyncio.gather(self._follow_task, return_exceptions=True)
        if self.zones is not None:
            await self.zones.close_landers()
        if self.scorer is not None:
            await self.scorer.close()
        await self.wal.close()
        if self.zones is not None:
            await self.zones.sink.close()
        if self._released is not None:
            self._released.close()
