"""The gateway's shared state, and what may change while it runs (SIGHUP reload, drain)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from connectors.announcing_sink import AnnouncingSink
from connectors.aws.eventbridge import EventBridgePublisher
from connectors.aws.glue import GlueCatalog
from connectors.aws.s3 import S3Sink
from connectors.base import ObjectSink
from connectors.local_lake import LocalLakeSink
from gateway import early_signals
from gateway.ops import logs
from gateway.auth.hmac import HmacAuthenticator, NoAuthenticator
from gateway.auth.certificate import DeviceAuthenticator
from gateway.ingest.enrich import PartitionPolicy
from gateway.ingest.loop_share import LoopShare
from gateway.ops.instance_metadata import availability_zone
from gateway.ops.metrics import GatewayMetrics
from gateway.lake.pipeline import Pipeline
from gateway.auth.registry import DeviceRegistry, RegistryError, RegistryFileWatcher
from gateway.durable.ledger_catch_up import ledger_for, open_and_catch_up_when_room
from gateway.auth.secrets_source import SecretsManagerRegistry
from gateway.edge.security import EdgeSecurity
from gateway.settings import RELOADABLE_SECTIONS, Settings, effective_config, lake_process_lands, with_run_time_sections
from gateway.durable.wal_layout import (
    INSTANCE_LOCK,
    SLOT_LOCK,
    SUPERVISED_ENV,
    EXITED_HOLDER_WAIT_SECS,
    DirectoryLock,
    WalLocked,
    WalSlot,
    orphan_slots,
    slot_for,
)

log = logging.getLogger(__name__)


def build_sink(settings: Settings, slot: WalSlot) -> ObjectSink:
    """The lake the configuration names, with its catalog and event announcements when configured.

    Landed-object events wait in an outbox beside the slot's WAL until EventBridge has them.
    """
    if settings.lake.kind == "local":
        return LocalLakeSink(settings.lake.dir, fsync=settings.wal.fsync)
    s3 = S3Sink(settings.s3, gateway_id=slot.gateway_id)
    catalog = GlueCatalog(settings.glue, lake_url=s3.root_url) if settings.glue else None
    events = EventBridgePublisher(settings.eventbridge) if settings.eventbridge else None
    if catalog is None and events is None:
        return s3
    return AnnouncingSink(s3, catalog=catalog, events=events, outbox_dir=slot.directory / "outbox" if events else None)


def _supervised(settings: Settings) -> bool:
    """A worker whose supervisor holds the instance (and runs the lake process)."""
    return os.environ.get(SUPERVISED_ENV) == str(Path(settings.wal.dir).resolve())


class Gateway:
    def __init__(self, settings: Settings, *, sink: ObjectSink | None = None, worker_index: int | None = None) -> None:
        self.settings = settings
        self.base_id = settings.gateway.gateway_id or socket.gethostname().split(".")[0]
        workers = settings.listen.workers if worker_index is not None else 1
        self.worker_index = worker_index or 0
        # Which WAL directory this process owns, and the name its lake objects carry (wal_layout.py).
        self.slot = slot_for(settings.wal.dir, self.base_id, self.worker_index, workers)
        self.gateway_id = self.slot.gateway_id
        self.availability_zone = settings.gateway.availability_zone
        self.metrics = GatewayMetrics()
        self.security = EdgeSecurity(lambda: self.settings, self.metrics)
        self.loop_lag_secs = 0.0
        # auth.registry_source is chosen at start; changing it needs a restart.
        self.registry_source = (
            SecretsManagerRegistry(
                settings.secretsmanager, self.metrics, self._set_registry, cache_path=Path(settings.wal.dir) / "registry-cache.json"
            )
            if settings.auth.registry_source == "secretsmanager"
            else None
        )
        self.registry = self._load_registry(settings)
        # The file registry is re-read when it changes: `edge-gateway device add` applies without SIGHUP.
        self.registry_watcher = (
            RegistryFileWatcher(lambda: self.settings.auth.registry_path, self._registry_changed, self._registry_unreadable)
            if self.registry_source is None
            else None
        )
        self.authenticator = self._authenticator(settings)
        # With several workers, the lake process lands every worker's WAL (gateway/lake/lake_process.py).
        self.landing_elsewhere = lake_process_lands(settings) and sink is None and _supervised(settings)
        if not self.landing_elsewhere:
            sink = sink or build_sink(settings, self.slot)
            self.metrics.watch_sink(sink)
        self.ledger = ledger_for(settings, on_forget=self._ledger_forgot)  # opened once this process owns wal.dir
        self.pipeline = Pipeline(
            settings, slot=self.slot, sink=sink, metrics=self.metrics, ledger=self.ledger, landing_elsewhere=self.landing_elsewhere
        )
        self.running_requests: dict[bytes, asyncio.Future[bytes | None]] = {}  # retry keys running here
        # Large and compressed bodies are decoded here, one at a time: decoding holds the GIL, so more
        # threads only took it from each other and from the event loop (one thread instead of the
        # default pool: 10-35% more records per CPU-second in paired runs, docs/performance.md).
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.loop_share = LoopShare(lambda: self.settings.admission.loop_turn_ms / 1000)
        self._locks: list[DirectoryLock] = []
        self._orphans: list[asyncio.Task[bool]] = []
        self.partition_policy = PartitionPolicy(
            settings.gateway.max_clock_skew_secs * 1000, settings.gateway.max_event_age_secs * 1000
        )
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()  # set while no telemetry request is in flight
        self._idle.set()
        self._lag_task: asyncio.Task[None] | None = None
        # Alone, told once the start holds the instance lock, and then True while it waits for room
        # on a full disk, False once it goes on (what its listeners answer meanwhile:
        # gateway/edge/while_starting.py).
        self.instance_locked: Callable[[], None] = lambda: None
        self.waiting_for_room: Callable[[bool], None] = lambda waiting: None

    def _load_registry(self, settings: Settings) -> DeviceRegistry:
        if self.registry_source is not None:
            # Loaded by start() and refreshed in the background; a reload asks for a refresh now.
            self.registry_source.refresh_soon()
            return getattr(self, "registry", None) or DeviceRegistry()
        running = getattr(self, "registry", None)
        if running is not None and len(running) and not Path(settings.auth.registry_path).exists():
            # A reload while the file is moved aside: refused, as for an unreadable file (the watcher's rule).
            raise RegistryError(f"{settings.auth.registry_path}: the registry file is gone; the previous devices stay in use")
        try:
            return DeviceRegistry.load(settings.auth.registry_path)
        except RegistryError:
            if settings.auth.mode == "hmac":
                raise
            return DeviceRegistry()

    def _set_registry(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    def _registry_changed(self, registry: DeviceRegistry) -> None:
        before = len(self.registry)
        self.registry = registry
        self.metrics.registry_refreshes.labels("ok").inc()
        self.metrics.registry_last_success.set(time.time())
        log.info(
            "device registry file changed; reloaded",
            extra={"registry_path": self.settings.auth.registry_path, "devices": len(registry), "before": before},
        )

    def _registry_unreadable(self, error: RegistryError) -> None:
        self.metrics.registry_refreshes.labels("error").inc()
        log.error("device registry file changed but cannot be read; the previous devices stay in use", extra={"error": str(error)})

    def _authenticator(self, settings: Settings):
        if settings.auth.mode == "none":
            inner = NoAuthenticator(lambda: self.registry)
        else:
            inner = HmacAuthenticator(
                lambda: self.registry, window_secs=settings.auth.timestamp_window_secs, replay=self.security.replay
            )
        # A verified client certificate authenticates by itself; other requests go to `inner`.
        return DeviceAuthenticator(inner, lambda: self.registry)

    async def start(self) -> None:
        if not self.availability_zone:
            g = self.settings.gateway
            self.availability_zone = await availability_zone(g.metadata_endpoint, g.metadata_timeout_secs)
        started = time.perf_counter()
        if self.registry_source is not None:
            await self.registry_source.start()  # no keys, no service: fails start-up
        try:
            await asyncio.to_thread(self._take_ownership)
            self.security.replay.use_ledger(self.ledger)
            await self.pipeline.start(early_signals.stop_requested)
        except BaseException:
            self.ledger.close()
            self._release_ownership()
            raise
        if self.worker_index == 0:
            self._adopt_orphans()
        wal = self.pipeline.wal
        self.metrics.wal_capacity.set(wal.max_total_bytes)
        self.metrics.wal_bytes.set_function(lambda: wal.total_bytes)
        self.metrics.watch_gateway(lambda: len(self.registry))
        self.metrics.watch_pipeline(self.pipeline)
        self._lag_task = asyncio.create_task(self._watch_loop_lag(), name="loop-lag")
        if self.registry_watcher is not None:
            self.registry_watcher.start()
        log.info(
            "gateway started",
            extra={
                "gateway_id": self.gateway_id,
                "availability_zone": self.availability_zone,
                "devices": len(self.registry),
                "wal_next_lsn": wal.next_lsn,
                "torn_tail_bytes": wal.torn_tail_bytes,
                "start_secs": round(time.perf_counter() - started, 3),
            },
        )
        if self.settings.auth.mode == "hmac" and self.registry_source is None and not len(self.registry):
            log.warning(
                "the device registry holds no devices, so every request will get 401; "
                "create one with `edge-gateway device add DEVICE_ID --registry FILE`",
                extra={"registry_path": self.settings.auth.registry_path},
            )

    def _take_ownership(self) -> None:
        """Lock the instance (unless a supervisor holds it for us), open the retry ledger, lock this WAL.

        Alone, the gateway first catches the ledger up with every WAL directory, as a supervisor does
        before its workers start: a retry of a request in any of them must be known before serving.
        """
        root = self.settings.wal.dir
        supervised = _supervised(self.settings)
        if not supervised:
            instance = DirectoryLock(root, INSTANCE_LOCK, "the WAL directory")
            self._locks.append(instance.acquire(exited_holder_wait_secs=EXITED_HOLDER_WAIT_SECS, stop_requested=early_signals.stop_requested))
            self.instance_locked()
        if supervised:
            self.ledger.open()
        else:
            open_and_catch_up_when_room(
                self.settings, self.base_id, self.ledger, early_signals.stop_requested, waiting_for_room=self.waiting_for_room
            )
        # A worker restarted after a kill may wait here for its predecessor's lock: a stop meanwhile ends the wait.
        self._locks.append(
            DirectoryLock(self.slot.directory, SLOT_LOCK, "the WAL directory").acquire(
                exited_holder_wait_secs=EXITED_HOLDER_WAIT_SECS, stop_requested=early_signals.stop_requested
            )
        )

    def _ledger_forgot(self, kind: str, entries: int) -> None:
        if kind == "signature":
            self.metrics.replay_evictions.inc(entries)

    def _release_ownership(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()

    def _adopt_orphans(self) -> None:
        """Drain WAL directories no worker owns now (``listen.workers`` changed): they hold acked records."""
        workers = self.settings.listen.workers
        for slot in orphan_slots(self.settings.wal.dir, self.base_id, workers):
            self._orphans.append(asyncio.create_task(self._drain_orphan(slot), name=f"orphan-{slot.name or 'root'}"))

    async def _drain_orphan(self, slot: WalSlot) -> bool:
        """Land an orphaned WAL directory; True once it landed everything it held."""
        try:
            lock = DirectoryLock(slot.directory, SLOT_LOCK, "the WAL directory").acquire()
        except WalLocked as exc:
            log.warning("not adopting a WAL directory another process holds", extra={"error": str(exc)})
            return True  # its holder lands it
        pipeline = Pipeline(
            self.settings,
            slot=slot,
            sink=build_sink(self.settings, slot),
            metrics=self.metrics,
            ledger=self.ledger,
        )
        log.warning(
            "draining a WAL directory no worker owns (listen.workers changed)",
            extra={"wal": str(slot.directory), "gateway_id": slot.gateway_id},
        )
        self.metrics.watch_pipeline(pipeline)
        try:
            await pipeline.start()
            landed = await pipeline.drain(None)
            log.info("orphaned WAL directory drained", extra={"wal": str(slot.directory), "landed_everything": landed})
            return landed
        except asyncio.CancelledError:
            log.info("orphaned WAL drain stopped; it continues at the next start", extra={"wal": str(slot.directory)})
            raise
        except Exception:
            log.exception("draining an orphaned WAL directory failed; it is retried at the next start", extra={"wal": str(slot.directory)})
            return False
        finally:
            self.metrics.unwatch_pipeline(pipeline)
            await pipeline.close()
            lock.release()

    async def finish_orphans(self, deadline_secs: float) -> bool:
        """Let orphaned WAL drains run until the deadline; True when each landed everything it held.

        A stop right after a restart with fewer workers would otherwise cut them short at once; what
        misses the deadline is cancelled by ``close`` and lands at the next start.
        """
        if not self._orphans:
            return True
        done, pending = await asyncio.wait(self._orphans, timeout=max(0.0, deadline_secs))
        return not pending and all(not task.cancelled() and task.result() for task in done)

    def reload(self, settings: Settings) -> list[str]:
        """Apply a new configuration's run-time sections; return the sections that need a restart."""
        old, new = effective_config(self.settings), effective_config(settings)
        changed = {section for section in new if new[section] != old[section]}
        needs_restart = sorted(changed - RELOADABLE_SECTIONS)
        registry = self._load_registry(settings)  # raises before anything changes
        self.registry = registry
        self.metrics.registry_refreshes.labels("ok").inc()
        self.settings = with_run_time_sections(self.settings, settings)
        self.authenticator = self._authenticator(self.settings)
        logs.set_level(self.settings.log.level)
        if self.registry_watcher is not None:
            self.registry_watcher.reset()
        log.info("configuration reloaded", extra={"applied": sorted(changed & RELOADABLE_SECTIONS), "needs_restart": needs_restart})
        return needs_restart

    def begin_drain(self) -> None:
        self.draining = True
        self.metrics.draining.set(1)

    def request_started(self) -> None:
        self.inflight += 1
        self.metrics.inflight.inc()
        self._idle.clear()

    def request_finished(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()
        if not self.inflight:
            self._idle.set()

    async def wait_for_inflight(self, deadline_secs: float) -> bool:
        """True once no request is in flight; False if some still are after ``deadline_secs``."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline_secs))
        except TimeoutError:
            pass
        return self.inflight == 0

    async def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
        for task in self._orphans:
            task.cancel()
        await asyncio.gather(*self._orphans, return_exceptions=True)
        if self.registry_source is not None:
            await self.registry_source.close()
        if self.registry_watcher is not None:
            await self.registry_watcher.close()
        await asyncio.to_thread(self.decoder.shutdown)  # requests still decoding (a drain past its deadline) finish first
        await self.pipeline.close()
        if _supervised(self.settings):
            self.ledger.close()
        else:
            await asyncio.to_thread(self.ledger.seal)  # alone, it owns the ledger: flushed (an fsync), a machine restart keeps it
        self._release_ownership()

    async def _watch_loop_lag(self, interval: float = 0.25) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag_secs = max(0.0, loop.time() - before - interval)
            self.metrics.loop_lag.set(self.loop_lag_secs)


GATEWAY = web.AppKey("gateway", Gateway)
