"""Every stage measured: the gateway's Prometheus metrics, named ``edge_gateway_<thing>_<unit>``.

One registry per gateway instance (not the process-global one), so tests can run several
gateways in one process and read each one's numbers. What describes the present (backlog and
oldest unlanded age per zone, registry size, the batcher's state) is read when scraped, never
left behind by the last event that happened to set it. With ``listen.workers > 1`` each scrape is
answered for the whole instance (``gateway/ops/status/cluster.py``), each series with a ``worker`` label.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from connectors.base import LandedObject, ObjectSink
from gateway.ops.build import version
from gateway.ops.starting_metrics import STARTING_HELP

if TYPE_CHECKING:
    from gateway.lake.pipeline import Pipeline

log = logging.getLogger(__name__)

# A `_created` series per counter doubles what is stored and says nothing an operator uses.
disable_created_metrics()

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        self.build_info = Gauge(
            "edge_gateway_build_info", "Always 1; the running version in its labels", ["version", "python"], registry=r
        )
        self.build_info.labels(version(), platform.python_version()).set(1)
        self.http_requests = Counter(
            "edge_gateway_http_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "edge_gateway_http_request_duration_seconds",
            "Time from request start to response (for telemetry: the ack latency)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.records = Counter("edge_gateway_records", "Records received, by outcome", ["outcome"], registry=r)
        self.records_rejected = Counter(
            "edge_gateway_records_rejected", "Records refused by validation, by reason", ["reason"], registry=r
        )
        self.request_bytes = Counter("edge_gateway_request_bytes", "Request body bytes as sent", registry=r)
        self.inflight = Gauge("edge_gateway_inflight_requests", "Telemetry requests being processed", registry=r)
        self.draining = Gauge("edge_gateway_draining", "1 while the gateway drains for shutdown", registry=r)
        # 0 once serving; 1 is what the ops listener answers while the instance starts (gateway/ops/starting_metrics.py).
        Gauge("edge_gateway_starting", STARTING_HELP, registry=r).set(0)
        self.wal_bytes = Gauge("edge_gateway_wal_bytes", "Bytes held in the write-ahead log", registry=r)
        self.wal_capacity = Gauge("edge_gateway_wal_capacity_bytes", "Configured WAL capacity", registry=r)
        self.wal_fsync = Histogram(
            "edge_gateway_wal_fsync_duration_seconds", "WAL group-commit fsync latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.objects_landed = Counter("edge_gateway_objects_landed", "Lake objects landed", ["zone"], registry=r)
        self.records_landed = Counter("edge_gateway_records_landed", "Records landed in the lake", ["zone"], registry=r)
        self.bytes_landed = Counter("edge_gateway_bytes_landed", "Object bytes landed", ["zone"], registry=r)
        self.landing_duration = Histogram(
            "edge_gateway_landing_duration_seconds", "Time to land one object", ["zone"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.stage_errors = Counter(
            "edge_gateway_stage_errors", "Errors by stage of the record path", ["stage", "error"], registry=r
        )
        self.loop_lag = Gauge("edge_gateway_event_loop_lag_seconds", "How late the event loop runs a timer", registry=r)
        self.rate_limited = Counter("edge_gateway_rate_limited", "Requests answered 429", registry=r)
        self.inference_batch_size = Histogram(
            "edge_gateway_inference_batch_size", "Records per inference call",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r,
        )
        self.inference_latency = Histogram(
            "edge_gateway_inference_latency_seconds", "Inference call latency", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inference_records = Counter(
            "edge_gateway_inference_records", "Curated records by inference status", ["status"], registry=r
        )
        self.inference_desired_capacity = Gauge(
            "edge_gateway_inference_desired_capacity",
            "Endpoint slots the current arrival rate keeps busy (arrival rate x predicted service time): an autoscaling signal",
            registry=r,
        )
        self.inference_idle = Gauge(
            "edge_gateway_inference_endpoint_idle_seconds", "Seconds since an endpoint last scored", ["endpoint"], registry=r
        )
        # Device security and abuse resistance.
        self.auth_refused = Counter(
            "edge_gateway_auth_refused", "Requests refused by authentication (401/403), by reason", ["reason"], registry=r
        )
        self.replay_evictions = Counter(
            "edge_gateway_replay_cache_evictions", "Signatures forgotten early because the replay cache was full", registry=r
        )
        self.replays = Counter(
            "edge_gateway_replays",
            "Requests sent again with a signature already accepted, not refused: answered (the first answer again) or taken (never answered: run once)",
            ["outcome"],
            registry=r,
        )
        self.admission_refused = Counter(
            "edge_gateway_admission_refused", "Requests answered 503 by admission control, by reason", ["reason"], registry=r
        )
        self.connections_open = Gauge("edge_gateway_connections_open", "Open device connections", registry=r)
        self.connections_closed = Counter(
            "edge_gateway_connections_closed",
            "Connections the gateway closed, by reason (connection_cap, header_timeout, idle_timeout, max_age, rebalance, silent_preempted, idle_preempted, ...)",
            ["reason"],
            registry=r,
        )
        self.inflight_bytes = Gauge("edge_gateway_inflight_bytes", "Body bytes of requests in progress", registry=r)
        self.inflight_limit = Gauge(
            "edge_gateway_admission_inflight_limit",
            "Requests this worker lets in at once now (admission.max_inflight_requests, less while answers come late)",
            registry=r,
        )
        self.registry_refreshes = Counter(
            "edge_gateway_registry_refreshes",
            "Device registry reloads (file changed, SIGHUP, admin API, Secrets Manager refresh), by outcome",
            ["outcome"],
            registry=r,
        )
        self.registry_stale = Gauge(
            "edge_gateway_registry_stale", "1 while the last registry refresh failed (the last good keys are in use)", registry=r
        )
        self.dead_lettered_records = Counter(
            "edge_gateway_dead_lettered_records",
            "Records that could not be built into or uploaded as their zone's object and went to the dead-letter prefix",
            ["zone", "reason"],
            registry=r,
        )
        self.wal_records_lost = Counter(
            "edge_gateway_wal_records_lost",
            "Records a zone cannot land because their WAL frames were damaged or removed on disk",
            ["zone"],
            registry=r,
        )
        self.objects_rolled_early = Counter(
            "edge_gateway_objects_rolled_early",
            "Lake objects rolled before their size or age: more hour partitions were written than lake.max_open_partitions or lake.max_open_bytes hold",
            ["zone"],
            registry=r,
        )
        # Read when scraped (watch_gateway); set() by a Secrets Manager refresh before a gateway is watched.
        self.registry_devices = Gauge("edge_gateway_registry_devices", "Devices in the registry", registry=r)
        self.registry_last_success = Gauge(
            "edge_gateway_registry_last_success_timestamp_seconds", "When the registry was last refreshed", registry=r
        )
        self.registry_refresh_duration = Histogram(
            "edge_gateway_registry_refresh_duration_seconds", "Time to refresh the registry", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.config_reloads = Counter(
            "edge_gateway_config_reloads", "Configuration reloads (SIGHUP), by outcome (applied, refused)", ["outcome"], registry=r
        )
        self.config_last_reload_success = Gauge(
            "edge_gateway_config_last_reload_success", "1 when the last configuration reload was applied, 0 when refused", registry=r
        )
        self.config_last_reload_success.set(1)
        self._pipelines: list[Pipeline] = []
        self._sinks: list[ObjectSink] = []
        self._landed_listeners: list[Callable[[str, LandedObject], None]] = []
        r.register(_PipelineCollector(self._pipelines))

    def watch_sink(self, sink: ObjectSink) -> None:
        """Export a connector's own counters (retries, throttles, concurrency) at scrape time."""
        if not self._sinks:
            self.registry.register(_SinkCollector(self._sinks))
        self._sinks.append(sink)

    def watch_gateway(self, registry_size: Callable[[], int]) -> None:
        """The registry's size, read when scraped (a file registry never reports it otherwise)."""
        self.registry_devices.set_function(registry_size)

    def watch_pipeline(self, pipeline: Pipeline) -> None:
        """Backlog and oldest unlanded age of the pipeline's zones, and its batcher, read when scraped."""
        self._pipelines.append(pipeline)

    def unwatch_pipeline(self, pipeline: Pipeline) -> None:
        if pipeline in self._pipelines:
            self._pipelines.remove(pipeline)

    def on_landed(self, listener: Callable[[str, LandedObject], None]) -> Callable[[], None]:
        """Call ``listener(zone, landed)`` for each object landed (``tap``); returns its removal."""
        self._landed_listeners.append(listener)
        return lambda: self._landed_listeners.remove(listener) if listener in self._landed_listeners else None

    # -- the landing observer interface ------------------------------------------------------

    def landed(self, zone: str, obj: LandedObject, seconds: float) -> None:
        self.objects_landed.labels(zone).inc()
        self.records_landed.labels(zone).inc(obj.records)
        self.bytes_landed.labels(zone).inc(obj.bytes)
        self.landing_duration.labels(zone).observe(seconds)
        log.debug("object landed", extra={"zone": zone, "key": obj.key, "records": obj.records, "bytes": obj.bytes, "seconds": round(seconds, 4)})
        for listener in tuple(self._landed_listeners):
            try:
                listener(zone, obj)
            except Exception:  # an observer must never disturb landing
                log.exception("a landing listener failed")

    def landing_failed(self, zone: str, error: Exception) -> None:
        self.stage_errors.labels(f"land_{zone}", type(error).__name__).inc()

    def dead_lettered(self, zone: str, records: int, reason: str) -> None:
        self.dead_lettered_records.labels(zone, reason).inc(records)

    def damaged(self, zone: str, records: int) -> None:
        self.wal_records_lost.labels(zone).inc(records)

    def rolled_early(self, zone: str, objects: int) -> None:
        self.objects_rolled_early.labels(zone).inc(objects)

    def backlog(self, zone: str, backlog_bytes: int, oldest_age_secs: float) -> None:
        """Landers report as they go; the exported figures are computed at scrape time instead."""


class _PipelineCollector:
    """Per zone, now: WAL bytes not landed and the oldest unlanded record's age; the batcher's state."""

    def __init__(self, pipelines: list[Pipeline]) -> None:
        self._pipelines = pipelines

    def collect(self) -> Iterable:
        backlog = GaugeMetricFamily(
            "edge_gateway_wal_backlog_bytes", "WAL bytes a consumer has not landed yet (now)", labels=["consumer"]
        )
        oldest = GaugeMetricFamily(
            "edge_gateway_wal_oldest_unlanded_age_seconds",
            "How long the oldest record a consumer has not landed has waited (now; 0 when everything is landed)",
            labels=["consumer"],
        )
        per_zone: dict[str, list[float]] = {}
        scorers = []
        for pipeline in tuple(self._pipelines):  # the worker's own and any orphaned WAL being drained
            for lander in pipeline.landers:
                try:
                    nbytes, age = lander.unlanded()
                except Exception:  # a lander closing under a scrape: its figures are gone with it
                    continue
                total = per_zone.setdefault(lander.zone, [0.0, 0.0])
                total[0] += nbytes
                total[1] = max(total[1], age)
            if pipeline.scorer is not None:
                scorers.append(pipeline.scorer)
        for zone, (nbytes, age) in sorted(per_zone.items()):
            backlog.add_metric([zone], nbytes)
            oldest.add_metric([zone], age)
        yield backlog
        yield oldest
        if scorers:
            yield from _batcher_families(scorers[0].batcher.stats())

    def describe(self) -> Iterable:
        return []


def _batcher_families(stats) -> Iterable:
    mean = GaugeMetricFamily("edge_gateway_inference_mean_batch_size", "Records per batch, recent average (the batcher's choice)")
    mean.add_metric([], stats.mean_batch_size)
    queued = GaugeMetricFamily("edge_gateway_inference_queued_records", "Records waiting in the batcher")
    queued.add_metric([], stats.queued_records)
    limit = GaugeMetricFamily(
        "edge_gateway_inference_concurrency_limit", "Calls the adaptive limiter allows at once, per endpoint", labels=["endpoint"]
    )
    inflight = GaugeMetricFamily("edge_gateway_inference_calls_in_flight", "Calls running, per endpoint", labels=["endpoint"])
    for endpoint in stats.endpoints:
        limit.add_metric([endpoint.name], endpoint.concurrency_limit)
        inflight.add_metric([endpoint.name], endpoint.in_flight)
    deferred = CounterMetricFamily(
        "edge_gateway_inference_deferrals",
        "Batcher items (one request's records for one hour) deferred unscored, by reason",
        labels=["reason"],
    )
    for reason, n in sorted(stats.deferred_by_reason.items()):
        deferred.add_metric([reason], n)
    yield from (mean, queued, limit, inflight, deferred)


class _SinkCollector:
    """Reads each sink's ``stats`` dataclass (and its concurrency, if adaptive) when scraped, summed
    over the sinks (the lake process has one per worker's WAL)."""

    def __init__(self, sinks: list[ObjectSink]) -> None:
        self._sinks = sinks

    def collect(self):
        counters: dict[str, list] = {}  # name -> [help, value], in the order first seen
        gauges: dict[str, list] = {}
        for sink in tuple(self._sinks):
            parts = [sink, getattr(sink, "sink", None), getattr(sink, "catalog", None), getattr(sink, "events", None), getattr(sink, "outbox", None)]
            for part in parts:
                stats = getattr(part, "stats", None)
                if stats is None or not dataclasses.is_dataclass(stats):
                    continue
                kind = type(part).__name__.lower()
                for field in dataclasses.fields(stats):
                    entry = counters.setdefault(f"edge_gateway_{kind}_{field.name}", [f"{type(part).__name__} {field.name.replace('_', ' ')}", 0])
                    entry[1] += getattr(stats, field.name)
                for gauge in ("concurrency_limit", "requests_in_flight", "catalog_queued", "outbox_pending_files", "outbox_pending_bytes"):
                    if hasattr(part, gauge):
                        entry = gauges.setdefault(f"edge_gateway_{kind}_{gauge}", [f"{type(part).__name__} {gauge.replace('_', ' ')}", 0])
                        entry[1] += getattr(part, gauge)
        for name, (documentation, value) in counters.items():
            metric = CounterMetricFamily(name, documentation)
            metric.add_metric([], value)
            yield metric
        for name, (documentation, value) in gauges.items():
            family = GaugeMetricFamily(name, documentation)
            family.add_metric([], value)
            yield family

    def describe(self):
        return []

