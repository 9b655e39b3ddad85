"""Steps 7-10 for one WAL: a zone lander per zone of the lake, the sink they land in, and the
curated zone's scorer. A worker runs them on its own WAL (``lake.landing = "worker"``, or a single
worker); the lake process runs one set per worker's WAL, over a ``WalFollower``."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from connectors.base import ObjectSink
from gateway.durable.wal import KIND_QUARANTINE, KIND_RECORDS, WriteAheadLog
from gateway.durable.wal_board import ZONES
from gateway.durable.wal_layout import LANDING_LOCK, DirectoryLock, WalSlot
from gateway.lake.formats import ZstdNdjsonBuilder
from gateway.lake.landing import RETIRED, LanderSettings, ZoneLander, owes_records
from gateway.ops.metrics import GatewayMetrics
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.durable.wal_follower import WalFollower
    from gateway.lake.curated import CuratedScorer

log = logging.getLogger(__name__)

STATE_SPACE_RETRY_SECS = 1.0  # how often a WAL's zones try again to allocate their state on a full disk


def zone_names(settings: Settings) -> list[str]:
    """The zones a WAL is landed into: each one a consumer that must release a segment before it goes."""
    return ["raw", "quarantine", *(["curated"] if settings.inference.enabled else [])]


def owing_zones(settings: Settings, slot_directory) -> list[str]:
    """Zones turned off that may still owe this WAL's records acknowledged while they were on."""
    on = zone_names(settings)
    return [zone for zone in ZONES if zone not in on and owes_records(consumers_dir(slot_directory), zone)]


def consumers_dir(slot_directory):
    return slot_directory / "consumers"


def needs_scorer(settings: Settings, slot_directories) -> bool:
    """The curated zone is on, or is off but still owes one of these WALs records."""
    return settings.inference.enabled or any("curated" in owing_zones(settings, d) for d in slot_directories)


class Zones:
    def __init__(
        self,
        settings: Settings,
        *,
        wal: WriteAheadLog | WalFollower,
        slot: WalSlot,
        sink: ObjectSink,
        metrics: GatewayMetrics,
        scorer: CuratedScorer | None,
    ) -> None:
        self.wal = wal
        self.slot = slot
        self.sink = sink
        self._lock = DirectoryLock(slot.directory, LANDING_LOCK, "the landing of the WAL directory")
        self.scorer = scorer  # its owner starts and closes it: the lake process shares one between WALs
        lake = settings.lake

        configured = zone_names(settings)
        owing = owing_zones(settings, slot.directory)

        def lander(zone: str, kind: int, builder=None, prepare=None) -> ZoneLander:
            return ZoneLander(
                LanderSettings(
                    zone=zone,
                    kind=kind,
                    dataset=settings.gateway.dataset,
                    gateway_id=slot.gateway_id,
                    target_object_bytes=lake.target_object_bytes,
                    max_object_age_secs=lake.max_object_age_secs,
                    max_open_partitions=lake.max_open_partitions,
                    max_open_bytes=lake.max_open_bytes,
                    retiring=zone in owing,
                    shared_frames=kind == KIND_RECORDS,  # raw and curated read them as stored (formats.py, curated.py)
                ),
                wal=wal,  # type: ignore[arg-type]  # a follower offers what a lander uses of a log
                sink=sink,
                builder_factory=builder or (lambda: ZstdNdjsonBuilder(lake.zstd_level)),
                state_dir=consumers_dir(slot.directory),
                observer=metrics,
                prepare=prepare,
            )

        # Step 7 and the quarantine zone: each its own consumer of the WAL.
        self.landers = [lander("raw", KIND_RECORDS), lander("quarantine", KIND_QUARANTINE)]
        if "curated" in owing and scorer is None:
            raise ValueError("the curated zone is off but still owes records: it needs a scorer (see needs_scorer)")
        if scorer is not None and ("curated" in configured or "curated" in owing):
            # Imported only here: NumPy, Arrow and the batcher cost a process 0.2 s of start-up and
            # tens of MiB that landing only the raw zone never uses.
            from gateway.lake.curated import ParquetBuilder, prepare_frames

            # Steps 8-9: a third consumer; a dead model endpoint delays only this zone.
            self.landers.append(
                lander("curated", KIND_RECORDS, lambda: ParquetBuilder(lake.zstd_level), lambda frames: prepare_frames(frames, scorer))
            )

    async def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        """Start every zone; ``on_death`` is told if one stops on an error."""
        # One lander per zone and WAL, whichever process runs it: a second would land objects twice.
        await asyncio.to_thread(self._lock.acquire)
        await self.sink.start()
        # Every zone says what it still needs before any zone can release a segment.
        await self._when_there_is_space("the released board", self._expect_consumers)
        for lander in self.landers:
            await self._when_there_is_space(f"the {lander.zone} zone's state", lander.load)
        for lander in self.landers:
            await lander.start(on_death)

    async def _expect_consumers(self) -> None:
        self.wal.expect_consumers([lander.zone for lander in self.landers])
        landed = {lander.zone for lander in self.landers}
        for zone in ZONES:
            if zone not in landed:  # off and owing nothing: an owner waiting for every zone hears it needs nothing
                self.wal.release(zone, RETIRED)

    async def _when_there_is_space(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """A new WAL directory's shared files are allocated whole when its zones first start (a worker
        added): on a full disk this WAL's zones wait for space, while every other WAL's land and free some."""
        warned = False
        while True:
            try:
                return await step()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if not warned:
                    log.warning(
                        "the disk is full: this WAL's zones start once their files have room",
                        extra={"wal": str(self.slot.directory), "file": what, "error": str(exc)},
                    )
                    warned = True
                await asyncio.sleep(STATE_SPACE_RETRY_SECS)

    async def drain(self, deadline_secs: float | None) -> bool:
        """Land what the WAL holds within the deadline; what does not land is replayed next start."""
        results = await asyncio.gather(*(lander.drain(deadline_secs) for lander in self.landers))
        return all(results)

    async def close_landers(self) -> None:
        for lander in self.landers:
            await lander.close()
        self._lock.release()

    async def close(self) -> None:
        await self.close_landers()
        await self.sink.close()
