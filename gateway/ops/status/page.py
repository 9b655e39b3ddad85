"""The live status page and the tap, on the admin listener.

    GET /status                  the page (static; it holds no data, so it needs no token)
    GET /status/static/{file}    its script, style and the vendored charting library (uPlot, MIT)
    GET /admin/status.json       a snapshot of the instance (bearer token), derived from /metrics
    GET /admin/tap               NDJSON stream of sampled records (bearer token; see tap.py)

The snapshot is computed from the same merged exposition ``/metrics`` serves, so the page and
Prometheus never disagree and every worker is counted. The page polls it once a second and turns
counters into rates and histogram buckets into percentiles itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.status.cluster import Cluster, runtime_dir
from gateway.supervisor import LAKE
from gateway.ops.status.tap import Tap, TapRequest

STATIC = Path(__file__).parent / "static"
ACK_ROUTE = "/v1/telemetry"
HEARTBEAT_SECS = 5.0
_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css", ".txt": "text/plain"}


def snapshot(exposition: bytes) -> dict:
    """The figures the page draws, summed over workers (ages: the largest), from an exposition."""
    out: dict = {
        "t": time.time(),
        "workers": {"up": 0, "total": 0},
        "records": {},
        "landed": {},
        "ack_buckets": {},
        "wal": {"bytes": 0.0, "capacity": 0.0},
        "zones": {},
        "batch": {"sum": 0.0, "count": 0.0, "mean": 0.0},
        "endpoints": {},
        "deferrals": {},
        "inference": {},
        "refusals": {},
        "devices": 0.0,
    }
    single = True
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "edge_gateway_worker_up":
                single = False
                if labels.get("worker") == LAKE:
                    out["lake_up"] = int(value)
                    continue
                out["workers"]["total"] += 1
                out["workers"]["up"] += int(value)
            elif name == "edge_gateway_records_total":
                _add(out["records"], labels["outcome"], value)
            elif name == "edge_gateway_records_landed_total":
                _add(out["landed"], labels["zone"], value)
            elif name == "edge_gateway_http_request_duration_seconds_bucket" and labels.get("route") == ACK_ROUTE:
                _add(out["ack_buckets"], labels["le"], value)
            elif name == "edge_gateway_wal_bytes":
                out["wal"]["bytes"] += value
            elif name == "edge_gateway_wal_capacity_bytes":
                out["wal"]["capacity"] += value
            elif name == "edge_gateway_wal_backlog_bytes":
                _add(out["zones"].setdefault(labels["consumer"], {"backlog_bytes": 0.0, "oldest_age_secs": 0.0}), "backlog_bytes", value)
            elif name == "edge_gateway_wal_oldest_unlanded_age_seconds":
                zone = out["zones"].setdefault(labels["consumer"], {"backlog_bytes": 0.0, "oldest_age_secs": 0.0})
                zone["oldest_age_secs"] = max(zone["oldest_age_secs"], value)
            elif name == "edge_gateway_inference_batch_size_sum":
                out["batch"]["sum"] += value
            elif name == "edge_gateway_inference_batch_size_count":
                out["batch"]["count"] += value
            elif name == "edge_gateway_inference_mean_batch_size":
                out["batch"]["mean"] = max(out["batch"]["mean"], value)
            elif name in ("edge_gateway_inference_concurrency_limit", "edge_gateway_inference_calls_in_flight"):
                key = "concurrency_limit" if name.endswith("limit") else "in_flight"
                _add(out["endpoints"].setdefault(labels["endpoint"], {"concurrency_limit": 0.0, "in_flight": 0.0}), key, value)
            elif name == "edge_gateway_inference_deferrals_total":
                _add(out["deferrals"], labels["reason"], value)
            elif name == "edge_gateway_inference_records_total":
                _add(out["inference"], labels["status"], value)
            elif name == "edge_gateway_auth_refused_total":
                _add(out["refusals"], f"auth: {labels['reason']}", value)
            elif name == "edge_gateway_admission_refused_total":
                _add(out["refusals"], f"overload: {labels['reason']}", value)
            elif name == "edge_gateway_rate_limited_total":
                _add(out["refusals"], "rate limited", value)
            elif name == "edge_gateway_records_rejected_total":
                _add(out["refusals"], f"invalid record: {labels['reason']}", value)
            elif name == "edge_gateway_registry_devices":
                out["devices"] = max(out["devices"], value)
    if single:
        out["workers"] = {"up": 1, "total": 1}
    out["ack_buckets"] = sorted(([float(le), n] for le, n in out["ack_buckets"].items()), key=lambda b: b[0])
    return out


def _add(target: dict, key: str, value: float) -> None:
    target[key] = target.get(key, 0.0) + value


# -- handlers --------------------------------------------------------------------------------


async def page(request: web.Request) -> web.FileResponse:
    return _static_file("index.html")


async def static(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    return _static_file(name)


def _static_file(name: str) -> web.FileResponse:
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        raise web.HTTPNotFound()
    response = web.FileResponse(path, headers={"Cache-Control": "no-cache"})
    response.content_type = _TYPES.get(path.suffix, "application/octet-stream")
    return response


def status_json(gateway_key):
    async def handler(request: web.Request) -> web.Response:
        gw = request.app[gateway_key]
        body = snapshot(await Cluster(gw, runtime_dir()).metrics())
        body["gateway_id"] = gw.base_id
        body["draining"] = gw.draining
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return handler


def tap_handler(gateway_key, *, whole_instance: bool):
    """The tap stream: this worker's events, and with ``whole_instance`` every sibling's too."""

    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[gateway_key]
        try:
            wanted = TapRequest.from_query(request.query)
        except ValueError as exc:
            return web.Response(status=400, body=orjson.dumps({"error": "bad_request", "message": str(exc)}), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await response.prepare(request)
        cluster = Cluster(gw, runtime_dir())
        label = gw.worker_index if whole_instance and not cluster.single else None
        peers: list[int | str] = []
        if whole_instance and not cluster.single:
            # The lake process answers for landed and scored records when it lands the WALs.
            peers = [*cluster.others(), *([LAKE] if cluster.lake else [])]
        await stream_taps(
            response,
            [(label, Tap(gw, wanted))],
            lambda: gw.draining,
            lambda merged: [_pump_peer(cluster, i, wanted, merged) for i in peers],
        )
        return response

    return handler


async def stream_taps(response: web.StreamResponse, taps: list[tuple[int | str | None, Tap]], stopped, peers=lambda merged: []) -> None:
    """Stream the events of ``taps`` (each labelled with its worker, unless None) and of the
    ``peers(merged)`` coroutines until the client goes or ``stopped()``; then stop them all."""
    merged: asyncio.Queue[dict] = asyncio.Queue(1000)
    for _, tap in taps:
        tap.start()
    pumps = [asyncio.create_task(_pump_local(tap, merged, label)) for label, tap in taps]
    pumps += [asyncio.create_task(pump) for pump in peers(merged)]
    try:
        await _stream_events(response, merged, stopped)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for _, tap in taps:
            await tap.close()


async def _stream_events(response: web.StreamResponse, events: asyncio.Queue, stopped) -> None:
    """Write events as NDJSON until the client goes or ``stopped()``; a blank line when quiet."""
    quiet = 0.0
    try:
        while not stopped():  # a drain ends every tap, so it never waits on a listener
            try:
                event = await asyncio.wait_for(events.get(), 1.0)
            except TimeoutError:
                quiet += 1.0
                if quiet >= HEARTBEAT_SECS:
                    quiet = 0.0
                    await response.write(b"\n")  # a blank line: finds a client that went away
                continue
            quiet = 0.0
            await response.write(orjson.dumps(event) + b"\n")
    except (ConnectionError, asyncio.CancelledError):
        pass


async def _pump_local(tap: Tap, merged: asyncio.Queue, worker: int | str | None) -> None:
    async for event in tap.events():
        if worker is not None:
            event["worker"] = worker
        with contextlib.suppress(asyncio.QueueFull):
            merged.put_nowait(event)


async def _pump_peer(cluster: Cluster, index: int | str, wanted: TapRequest, merged: asyncio.Queue) -> None:
    while True:
        async for line in cluster.stream(index, f"/tap?{wanted.query()}"):
            if not line.strip():
                continue
            event = orjson.loads(line)
            event.setdefault("worker", index)  # the lake process names the worker whose WAL it landed
            with contextlib.suppress(asyncio.QueueFull):
                merged.put_nowait(event)
        await asyncio.sleep(1.0)  # the sibling restarted: listen again


def admin_routes(gateway_key) -> list[web.RouteDef]:
    return [
        web.get("/status", page),
        web.get("/status/static/{name:.+}", static),
        web.get("/admin/status.json", status_json(gateway_key)),
        web.get("/admin/tap", tap_handler(gateway_key, whole_instance=True)),
    ]


def is_public(path: str) -> bool:
    """The page and its files hold no data and need no token; what they fetch does."""
    return path == "/status" or path.startswith("/status/static/")
