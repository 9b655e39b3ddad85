"""The gateway's shared state, and what may change while it runs (SIGHUP reload, drain)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from aiohttp import web

from connectors.announcing_sink import AnnouncingSink
from connectors.base import ObjectSink
from connectors.eventbridge import EventBridgePublisher
from connectors.glue import GlueCatalog
from connectors.local_lake import LocalLakeSink
from connectors.s3 import S3Sink
from gateway import logs
from gateway.auth import HmacAuthenticator, NoAuthenticator
from gateway.cert_auth import DeviceAuthenticator
from gateway.dedup import IdempotencyCache, SeqIndex
from gateway.enrich import PartitionPolicy
from gateway.instance_metadata import availability_zone
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.registry import DeviceRegistry, RegistryError
from gateway.secrets_registry import SecretsManagerRegistry
from gateway.security import EdgeSecurity
from gateway.settings import RELOADABLE_SECTIONS, Settings, effective_config

log = logging.getLogger(__name__)


def build_sink(settings: Settings, gateway_id: str) -> ObjectSink:
    """The lake the configuration names, with its catalog and event announcements when configured."""
    if settings.lake.kind == "local":
        return LocalLakeSink(settings.lake.dir, fsync=settings.wal.fsync)
    s3 = S3Sink(settings.s3, gateway_id=gateway_id)
    catalog = GlueCatalog(settings.glue, lake_url=s3.root_url) if settings.glue else None
    events = EventBridgePublisher(settings.eventbridge) if settings.eventbridge else None
    if catalog is None and events is None:
        return s3
    return AnnouncingSink(s3, catalog=catalog, events=events)


class Gateway:
    def __init__(self, settings: Settings, *, sink: ObjectSink | None = None) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway.gateway_id or socket.gethostname().split(".")[0]
        self.availability_zone = settings.gateway.availability_zone
        self.metrics = GatewayMetrics()
        self.security = EdgeSecurity(lambda: self.settings, self.metrics)
        self.loop_lag_secs = 0.0
        # auth.registry_source is chosen at start; changing it needs a restart.
        self.registry_source = (
            SecretsManagerRegistry(settings.secretsmanager, self.metrics, self._set_registry)
            if settings.auth.registry_source == "secretsmanager"
            else None
        )
        self.registry = self._load_registry(settings)
        self.authenticator = self._authenticator(settings)
        sink = sink or build_sink(settings, self.gateway_id)
        self.metrics.watch_sink(sink)
        self.pipeline = Pipeline(settings, gateway_id=self.gateway_id, sink=sink, metrics=self.metrics)
        limits = settings.limits
        self.seq_index = SeqIndex(limits.dedup_window_secs, limits.dedup_max_keys)
        self.idempotency = IdempotencyCache(limits.dedup_window_secs, limits.dedup_max_keys)
        self.partition_policy = PartitionPolicy(
            settings.gateway.max_clock_skew_secs * 1000, settings.gateway.max_event_age_secs * 1000
        )
        self.draining = False
        self.inflight = 0
        self._lag_task: asyncio.Task[None] | None = None

    def _load_registry(self, settings: Settings) -> DeviceRegistry:
        if self.registry_source is not None:
            # Loaded by start() and refreshed in the background; a reload asks for a refresh now.
            self.registry_source.refresh_soon()
            return getattr(self, "registry", None) or DeviceRegistry()
        try:
            return DeviceRegistry.load(settings.auth.registry_path)
        except RegistryError:
            if settings.auth.mode == "hmac":
                raise
            return DeviceRegistry()

    def _set_registry(self, registry: DeviceRegistry) -> None:
        self.registry = registry

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
        await self.pipeline.start()
        wal = self.pipeline.wal
        self.metrics.wal_capacity.set(wal.max_total_bytes)
        self.metrics.wal_bytes.set_function(lambda: wal.total_bytes)
        self._lag_task = asyncio.create_task(self._watch_loop_lag(), name="loop-lag")
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

    def reload(self, settings: Settings) -> list[str]:
        """Apply a new configuration's run-time sections; return the sections that need a restart."""
        old, new = effective_config(self.settings), effective_config(settings)
        changed = {section for section in new if new[section] != old[section]}
        needs_restart = sorted(changed - RELOADABLE_SECTIONS)
        registry = self._load_registry(settings)  # raises before anything changes
        self.registry = registry
        live = {s: getattr(settings, s) if s in RELOADABLE_SECTIONS else getattr(self.settings, s) for s in new}
        self.settings = Settings(**live)
        self.authenticator = self._authenticator(self.settings)
        logs.configure(self.settings.log.level)
        log.info("configuration reloaded", extra={"applied": sorted(changed & RELOADABLE_SECTIONS), "needs_restart": needs_restart})
        return needs_restart

    def begin_drain(self) -> None:
        self.draining = True
        self.metrics.draining.set(1)

    async def wait_for_inflight(self, deadline_secs: float) -> bool:
        until = time.monotonic() + deadline_secs
        while self.inflight and time.monotonic() < until:
            await asyncio.sleep(0.01)
        return self.inflight == 0

    async def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
        if self.registry_source is not None:
            await self.registry_source.close()
        await self.pipeline.close()

    async def _watch_loop_lag(self, interval: float = 0.25) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag_secs = max(0.0, loop.time() - before - interval)
            self.metrics.loop_lag.set(self.loop_lag_secs)


GATEWAY = web.AppKey("gateway", Gateway)
