"""The lake process: steps 7-10 for every worker's WAL, in a process of their own.

With ``listen.workers > 1`` and ``lake.landing = "process"`` (the default) the supervisor starts it
beside the ingest workers. The workers then only receive, verify, validate, append to their WAL
and acknowledge; this process follows each worker's WAL (gateway/durable/wal_follower.py), lands
its zones and scores the curated one, so compression, Parquet and the model never take an ingest
worker's CPU or delay an acknowledgement. One scorer serves every WAL (larger batches, one model).

Exactly once is kept as before: each WAL's zones keep their state files in that WAL directory, the
process holds each directory's landing lock while it lands it, and a worker deletes a segment only
once every zone has released it (gateway/durable/wal_board.py). Killed, it is restarted by the
supervisor and carries on from those state files; the workers keep acknowledging into their WALs
meanwhile, up to ``wal.max_total_bytes``.

Stopping: SIGTERM (the supervisor's, or one sent to the whole group) starts the drain's clock, and
landing goes on while the workers finish their requests; SIGUSR1, sent by the supervisor once every
worker has exited, lands what the WALs hold within what is left of ``drain.deadline_secs``.
Metrics are served on ``<runtime>/lake.sock``, which the worker answering ``/metrics`` merges in
with ``worker="lake"`` (gateway/ops/status/cluster.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

from aiohttp import web
from prometheus_client import generate_latest

from gateway.allocator import return_freed_pages
from gateway.durable.wal_board import ReleasedPositions, durable_board, released_board
from gateway.durable.wal_follower import WalFollower
from gateway.durable.wal_layout import slot_for
from gateway.lake.zones import Zones, needs_scorer
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.status.cluster import lake_socket, runtime_dir
from gateway.heartbeat import start_beating
from gateway.supervisor import LAKE
from gateway.service import build_sink
from gateway.settings import Settings

log = logging.getLogger(__name__)

# How often a WAL that has no durable end yet (its worker never started) is looked at again.
WAIT_FOR_WAL_SECS = 0.1


class LakeProcess:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        base_id = settings.gateway.gateway_id or socket.gethostname().split(".")[0]
        self.metrics = GatewayMetrics()
        self.scorer = None
        slots = [slot_for(settings.wal.dir, base_id, index, settings.listen.workers) for index in range(settings.listen.workers)]
        if needs_scorer(settings, [slot.directory for slot in slots]):
            from gateway.lake.curated import CuratedScorer

            self.scorer = CuratedScorer(settings.inference, self.metrics, in_lake_process=True)
        self.zones: list[Zones] = []
        self.draining = False
        for slot in slots:
            follower = WalFollower(slot.directory / "segments", durable_board(slot.directory), ReleasedPositions(released_board(slot.directory)))
            sink = build_sink(settings, slot)
            self.metrics.watch_sink(sink)
            zones = Zones(settings, wal=follower, slot=slot, sink=sink, metrics=self.metrics, scorer=self.scorer)
            self.metrics.watch_pipeline(zones)  # type: ignore[arg-type]  # landers and scorer, as a pipeline has
            self.zones.append(zones)
        self._starting: list[asyncio.Task[None]] = []
        self._peers: web.AppRunner | None = None
        self.failed = asyncio.Event()  # a WAL's zones could not start: exit, and be started again

    async def start(self) -> None:
        if self.scorer is not None:
            await self.scorer.start()
        # Each WAL's zones start once its worker has published a durable end: one worker slow to
        # start (or crash-looping) holds back no other's landing.
        self._starting = [asyncio.create_task(self._start_zones(z), name=f"lake-{i}") for i, z in enumerate(self.zones)]
        for task in self._starting:
            task.add_done_callback(self._check_started)
        self._peers = await _serve_peers(self)
        log.info("lake process started", extra={"wals": len(self.zones), "curated": self.scorer is not None})

    async def _start_zones(self, zones: Zones) -> None:
        while not zones.wal.refresh():
            await asyncio.sleep(WAIT_FOR_WAL_SECS)
        await zones.start(on_death=self._zone_died)

    def _zone_died(self, error: BaseException) -> None:
        # In a worker, a zone that stopped waits for a restart of the gateway; here the supervisor
        # restarts this process, which carries on from the zones' state files.
        log.critical("a zone stopped landing; the lake process exits to be started again", extra={"error": repr(error)})
        self.failed.set()

    def _check_started(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("the lake process cannot land a WAL directory", exc_info=task.exception())
            self.failed.set()

    async def drain(self, deadline_secs: float) -> bool:
        """Land everything durable in every WAL within the deadline; what is left lands next start.

        Logs one ``drained`` line per WAL, as a worker landing its own does, so a drain report
        (the drain hook) counts one per worker whichever process landed it.
        """
        self.draining = True  # ends every tap
        # A WAL whose worker never published a durable end holds nothing this process could land.
        await asyncio.wait(self._starting, timeout=min(5.0, deadline_secs))
        started = [task.done() and not task.cancelled() and task.exception() is None for task in self._starting]
        results = await asyncio.gather(
            *(z.drain(deadline_secs) if ok else _nothing_landed(z.slot) for z, ok in zip(self.zones, started, strict=True))
        )
        for index, (zones, landed) in enumerate(zip(self.zones, results, strict=True)):
            log.info("drained", extra={"landed_everything": landed, "worker": index, "wal": str(zones.slot.directory), "landed_by": "lake process"})
        return all(results)

    async def close(self) -> None:
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        if self._peers is not None:
            await self._peers.cleanup()
        for zones in self.zones:
            await zones.close()
            zones.wal.close()
        if self.scorer is not None:
            await self.scorer.close()


async def _nothing_landed(slot) -> bool:
    """A WAL the lake process never started landing: drained only if it holds no log at all."""
    return not slot.has_log


class _TapView:
    """What a tap reads of a gateway, for one WAL the lake process lands."""

    def __init__(self, zones: Zones, metrics: GatewayMetrics) -> None:
        self.pipeline = zones  # its wal (the follower) and scorer
        self.metrics = metrics
        self.gateway_id = zones.slot.gateway_id


async def _serve_peers(lake: LakeProcess) -> web.AppRunner | None:
    """``<runtime>/lake.sock``: this process's metrics, and its tap stages (landed, scored)."""
    from gateway.ops.status.page import stream_taps
    from gateway.ops.status.tap import Tap, TapRequest

    runtime = runtime_dir()
    if runtime is None:
        return None

    async def local_metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(lake.metrics.registry), content_type="text/plain", charset="utf-8")

    async def tap(request: web.Request) -> web.StreamResponse:
        try:
            wanted = TapRequest.from_query(request.query)
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        taps: list[tuple[int | str, Tap]] = []
        if "landed" in wanted.stages:
            for index, zones in enumerate(lake.zones):
                taps.append((index, Tap(_TapView(zones, lake.metrics), TapRequest(frozenset({"landed"}), wanted.device, wanted.rate))))
        if "scored" in wanted.stages and lake.scorer is not None and lake.zones:
            # One scorer serves every WAL: its events once, as the lake process's.
            view = _TapView(lake.zones[0], lake.metrics)
            taps.append((LAKE, Tap(view, TapRequest(frozenset({"scored"}), wanted.device, wanted.rate))))
        await stream_taps(response, taps, lambda: lake.draining)
        return response

    app = web.Application()
    app.router.add_get("/metrics", local_metrics)
    app.router.add_get("/tap", tap)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    path = lake_socket(runtime)
    path.unlink(missing_ok=True)  # left by this process's previous life
    await web.UnixSite(runner, str(path)).start()
    return runner


async def run_lake(settings: Settings, early_signals: list[int] = ()) -> int:
    """Run until the supervisor says the workers are gone (SIGUSR1), then drain; ``early_signals``
    arrived while this process was still starting (read once the handlers are set: one may arrive
    while they are being set)."""
    if settings.lake.process_nice:
        os.nice(settings.lake.process_nice)  # before the decoder starts: it inherits the priority
    lake = LakeProcess(settings)
    loop = asyncio.get_running_loop()
    workers_gone = asyncio.Event()
    stopping_since: list[float] = []
    # SIGTERM: the instance is stopping; keep landing while the workers finish their requests.
    loop.add_signal_handler(signal.SIGTERM, lambda: stopping_since.append(time.monotonic()))
    loop.add_signal_handler(signal.SIGINT, lambda: stopping_since.append(time.monotonic()))
    # SIGUSR1: every worker has exited, so what the WALs hold now is all there is to land.
    loop.add_signal_handler(signal.SIGUSR1, workers_gone.set)
    # SIGHUP (passed on by the supervisor) reloads the workers' run-time sections; none is the lake's.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("lake process: a reload changes nothing here; lake settings need a restart"))
    if {signal.SIGTERM, signal.SIGINT} & set(early_signals):
        stopping_since.append(time.monotonic())
    if signal.SIGUSR1 in early_signals:
        workers_gone.set()
    beat = None
    stop_trimming = return_freed_pages()  # the WAL reads, records and row groups freed in bursts
    try:
        await lake.start()
        beat = start_beating(runtime_dir(), LAKE)
        waits = [asyncio.ensure_future(workers_gone.wait()), asyncio.ensure_future(lake.failed.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        if lake.failed.is_set():
            return 1
        deadline = settings.drain.deadline_secs
        left = deadline - (time.monotonic() - stopping_since[0]) if stopping_since else deadline
        await lake.drain(max(1.0, left))
    finally:
        stop_trimming()
        if beat is not None:
            beat.cancel()
        await lake.close()
    return 0
