"""The path of a record, end to end (DESIGN.md, steps 1-10), in one screen.

    device --HTTPS--> ALB --HTTP--> gateway
      1 receive       http_source: body decoded chunk by chunk (body.py), bounded memory (spool.py)
      2 authenticate  auth.py: HMAC v1 over the body as sent; registry.py
      3 validate      ingest.py: msgspec schema; invalid records become quarantine frames
      4 enrich        enrich.py: received_at, gateway_id, AZ, ingest_id, device metadata, clock skew
      5 persist       Pipeline.persist: WAL append, group-commit fsync (wal.py)
      6 ack           http_source: 202 once persist returns
      7 land raw      ZoneLander("raw") consumes the WAL (landing.py)
      8 infer         curated.py: adaptive micro-batches to Triton or the embedded model
      9 land curated  ZoneLander("curated"): scored records as Parquet
     10 commit        each lander releases WAL segments once it has landed them

Steps 7-10 are independent WAL consumers: a slow zone never stalls acks until the WAL is full.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from connectors.base import ObjectSink
from gateway.curated import CuratedScorer, ParquetBuilder, prepare_frames
from gateway.formats import ZstdNdjsonBuilder
from gateway.landing import LanderSettings, ZoneLander
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.wal import KIND_QUARANTINE, KIND_RECORDS, WriteAheadLog

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, settings: Settings, *, gateway_id: str, sink: ObjectSink, metrics: GatewayMetrics) -> None:
        wal_dir = Path(settings.wal.dir)
        self.spool_dir = wal_dir / "spool"
        self.wal = WriteAheadLog(
            wal_dir / "segments",
            segment_bytes=settings.wal.segment_bytes,
            max_total_bytes=settings.wal.max_total_bytes,
            fsync=settings.wal.fsync,
            on_fsync=metrics.wal_fsync.observe,
        )
        self.sink = sink
        lake = settings.lake

        def lander(zone: str, kind: int, builder=None, prepare=None) -> ZoneLander:
            return ZoneLander(
                LanderSettings(
                    zone=zone,
                    kind=kind,
                    dataset=settings.gateway.dataset,
                    gateway_id=gateway_id,
                    target_object_bytes=lake.target_object_bytes,
                    max_object_age_secs=lake.max_object_age_secs,
                    max_open_partitions=lake.max_open_partitions,
                ),
                wal=self.wal,
                sink=sink,
                builder_factory=builder or (lambda: ZstdNdjsonBuilder(lake.zstd_level)),
                state_dir=wal_dir / "consumers",
                observer=metrics,
                prepare=prepare,
            )

        # Steps 7 and the quarantine zone: each its own consumer of the WAL.
        self.landers = [lander("raw", KIND_RECORDS), lander("quarantine", KIND_QUARANTINE)]
        self.scorer: CuratedScorer | None = None
        if settings.inference.enabled:
            # Steps 8-9: a third consumer; a dead model endpoint delays only this zone.
            self.scorer = scorer = CuratedScorer(settings.inference, metrics)
            self.landers.append(
                lander("curated", KIND_RECORDS, lambda: ParquetBuilder(lake.zstd_level), lambda frames: prepare_frames(frames, scorer))
            )

    async def start(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.spool_dir.glob("spool-*"):  # only left behind by a crash; never durable
            stale.unlink(missing_ok=True)
        await self.wal.start()
        await self.sink.start()
        if self.scorer is not None:
            await self.scorer.start()
        for lander in self.landers:
            await lander.start()

    def new_spool(self, memory_bytes: int) -> Spool:
        return Spool(self.spool_dir, memory_bytes)

    async def persist(self, spool: Spool) -> None:
        """Step 5: append a request's frames to the WAL; returns once they are fsynced."""
        end = None
        for frames in spool.chunks():
            end = self.wal.write(frames)
        if end is not None:
            await self.wal.wait_durable(end)

    async def drain(self, deadline_secs: float) -> bool:
        """Land what the WAL holds within the deadline; what does not land is replayed next start."""
        results = await asyncio.gather(*(lander.drain(deadline_secs) for lander in self.landers))
        return all(results)

    async def close(self) -> None:
        for lander in self.landers:
            await lander.close()
        if self.scorer is not None:
            await self.scorer.close()
        await self.wal.close()
        await self.sink.close()
