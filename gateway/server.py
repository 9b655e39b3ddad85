"""Run the gateway: start, serve until told to stop, then drain.

A drain goes in the order that loses nothing acknowledged: readiness turns 503 first (so the load
balancer stops sending), requests already in flight finish and are answered, the listeners close,
open lake objects are flushed and landed within the deadline, and the WAL closes last (whatever
missed the deadline is durable there and lands at the next start).

The device listener serves the device API and health checks; ``/metrics`` has its own listener
(gateway/ops/listener.py) and the operator API another (gateway/ops/admin.py). Signals are handled here and
nowhere else: SIGTERM/SIGINT drain and exit, SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from functools import partial

from aiohttp import web

from gateway import open_files
from gateway.ops import logs
from gateway.ops.admin import start_admin
from gateway.app import build_app
from gateway.edge.accept_share import SiblingConnections, share_file
from gateway.edge.connections import GuardedSite
from gateway.ops.listener import start_ops
from gateway.edge.ratelimit_store import AUTH_FAILURES, DEVICES, SharedBuckets
from gateway.service import Gateway
from gateway.settings import ConfigError, Settings
from gateway.ops.status.cluster import runtime_dir, start_peer_listener
from gateway.heartbeat import start_beating
from gateway.edge.tls import server_context
from gateway.edge.while_starting import AnswersOnceLocked
from gateway.listeners import bind_listener

log = logging.getLogger(__name__)


class RunningGateway:
    """A started gateway and its listener; ``stop`` drains it."""

    def __init__(self, gateway: Gateway, runner: web.AppRunner, site: web.TCPSite) -> None:
        self.gateway = gateway
        self.runner = runner
        self.site = site
        self.admin: web.AppRunner | None = None  # the admin listener's runner, when [admin] is enabled
        self.ops: web.AppRunner | None = None  # the ops listener's runner (/metrics), when [ops] is enabled
        self.peers: web.AppRunner | None = None  # this worker's local socket for its siblings (workers > 1)
        self.heartbeat: asyncio.Task[None] | None = None  # for the supervisor's watchdog (gateway/heartbeat.py)
        self.stopped = False

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]

    @property
    def url(self) -> str:
        host = self.gateway.settings.listen.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.gateway.settings.tls.enabled else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def ops_url(self) -> str:
        """Where ``/metrics`` is served (the ops listener)."""
        assert self.ops is not None, "the ops listener is off ([ops] enabled = false)"
        host, port = self.ops.addresses[0][:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> bool:
        """Drain: readiness off, finish in-flight requests, stop listening, land, close the WAL."""
        if self.stopped:
            return True
        self.stopped = True
        gw = self.gateway
        deadline = gw.settings.drain.deadline_secs
        until = time.monotonic() + deadline
        # 1. /readyz answers 503 and new requests get 503 with Retry-After (refusals held back are answered now).
        gw.begin_drain()
        gw.security.connections.tarpit.release()
        log.info("draining", extra={"deadline_secs": deadline, "inflight": gw.inflight})
        # 2. Requests already reading their body finish and are acknowledged.
        await gw.wait_for_inflight(max(0.0, until - time.monotonic()))
        # 3. Stop accepting and close idle keep-alive connections.
        await self.runner.cleanup()
        for listener in (self.admin, self.ops):
            if listener is not None:
                await listener.cleanup()
        if self.peers is not None:
            await self.peers.cleanup()
        # 4. Flush open objects and land them, and any orphaned WAL still draining; what misses the
        # deadline stays in the WAL.
        remaining = max(0.1, until - time.monotonic())
        landed, orphans_landed = await asyncio.gather(gw.pipeline.drain(remaining), gw.finish_orphans(remaining))
        landed_all = landed and orphans_landed
        # 5. Close the WAL (everything written is durable) and the sinks.
        await gw.close()
        if self.heartbeat is not None:
            # Beating until here: a worker told to drain by anyone but the supervisor is still watched,
            # and a drain may take longer than listen.stall_timeout_secs.
            self.heartbeat.cancel()
        if gw.landing_elsewhere:  # the lake process lands it once every worker has exited, and says "drained"
            log.info("requests drained; the lake process lands what the WAL holds")
        else:
            log.info("drained", extra={"landed_everything": landed_all})
        return landed_all


async def start_gateway(
    settings: Settings, *, gateway: Gateway | None = None, worker_index: int | None = None, listener: socket.socket | None = None
) -> RunningGateway:
    """Start a gateway; a supervisor's worker gets its index and the instance's bound ``listener``."""
    gw = gateway or Gateway(settings, worker_index=worker_index)
    # Start-up is one stack: whatever started is closed again, in reverse, if a later part fails.
    async with contextlib.AsyncExitStack() as started:
        ops_listener = None  # a supervisor's worker inherits the ops socket (gateway/ops/listener.py)
        if listener is None:  # alone: bound once the instance is locked, and answering while the start goes on
            listen, ops = settings.listen, settings.ops
            while_starting = AnswersOnceLocked(
                settings,
                lambda: bind_listener(listen.host, listen.port, listen.backlog),
                (lambda: bind_listener(ops.host, ops.port, 128)) if ops.enabled else None,
            )
            gw.instance_locked, gw.waiting_for_room = while_starting.locked, while_starting.waiting_for_room
            try:
                await gw.start()
            finally:
                while_starting.stop()
                started.callback(while_starting.close)
            listener, ops_listener = while_starting.listener, while_starting.ops_listener
        else:  # a supervisor's worker: the supervisor answered while the instance started
            await gw.start()
        started.push_async_callback(gw.close)
        # Per-device limits, and per-source limits on failed authentications, for the whole instance
        # and across restarts: buckets in the retry ledger's store.
        gw.security.limiter.use_shared(SharedBuckets(gw.ledger, DEVICES))
        gw.security.failures.use_shared(SharedBuckets(gw.ledger, AUTH_FAILURES))
        runner = web.AppRunner(
            build_app(gw),
            handle_signals=False,
            # Always installed; it follows the live [log] section, so SIGHUP can turn it on and off.
            access_log=logging.getLogger(logs.ACCESS_LOGGER),
            access_log_class=logs.access_logger_class(lambda: gw.settings),
            shutdown_timeout=settings.drain.deadline_secs,
            # We decompress ourselves: the signature covers the body as sent, and limits apply as it inflates.
            auto_decompress=False,
        )
        await runner.setup()
        started.push_async_callback(runner.cleanup)
        _freeze_what_lives_forever()
        listen = settings.listen
        tls = settings.tls
        # Connections go through the guard: a cap, header and idle timeouts, a maximum age.
        site = GuardedSite(
            runner,
            listen.host,
            listen.port,
            guard=gw.security.connections,
            handshake_timeout_secs=tls.handshake_timeout_secs,
            ssl_context=server_context(tls) if tls.enabled else None,
            backlog=listen.backlog,
            sock=listener,
            siblings=_siblings(gw, listener),
            serving=lambda: _has_room(gw),
        )
        await site.start()
        running = RunningGateway(gw, runner, site)
        for attribute, start in (("admin", start_admin), ("ops", partial(start_ops, sock=ops_listener)), ("peers", start_peer_listener)):
            # admin: off by default; ops (/metrics): on by default; neither ever on the device listener.
            # peers: this worker's local socket for its siblings (workers > 1).
            listener_runner = await start(gw)
            if listener_runner is not None:
                started.push_async_callback(listener_runner.cleanup)
            setattr(running, attribute, listener_runner)
        started.pop_all()  # all started: from now on RunningGateway.stop drains them in its own order
    running.heartbeat = start_beating(runtime_dir(), gw.worker_index)
    guard = gw.security.connections
    log.info("listening", extra={"url": running.url, "max_connections": guard.max_open()})
    if guard.file_budget < settings.connections.max_connections:
        log.warning(
            "the open-files limit leaves room for fewer connections than connections.max_connections; raise it (LimitNOFILE)",
            extra={"open_files_limit": open_files.soft_limit(), "max_connections": guard.file_budget},
        )
    return running


def _has_room(gw: Gateway) -> bool:
    """Whether this worker's WAL has room: while it is full (or its disk is), siblings take its new
    connections. A failed WAL still takes its share, so the load balancer's health checks keep
    finding its 503 (only a restart or a replacement helps it)."""
    return gw.pipeline.wal.refusal() not in ("full", "no_space")


def _siblings(gw: Gateway, listener: socket.socket | None) -> SiblingConnections | None:
    """The other workers on the supervisor's socket, with whom this one shares its connections."""
    runtime = runtime_dir()
    workers = gw.settings.listen.workers
    if listener is None or runtime is None or workers < 2:
        return None
    try:
        return SiblingConnections(share_file(runtime), gw.worker_index, workers)
    except OSError as exc:
        # Serving matters more than an even spread: this worker takes whatever it finds waiting.
        log.warning("cannot share connections with the other workers; accepting all that wait", extra={"error": str(exc)})
        return None


def _freeze_what_lives_forever() -> None:
    """Move what start-up built (modules, settings, the app) out of the collector's reach.

    It lives as long as the process, yet every full collection walked it: 40-50 ms with the event
    loop and the WAL writer stopped, every second or two under load (docs/performance.md).
    """
    gc.collect()
    gc.freeze()
    gc.enable()  # off while the worker's stack was imported (gateway/__main__.py)


async def serve(
    settings: Settings,
    reload_settings: Callable[[], Settings],
    stop_requested: Callable[[], bool] = lambda: False,
    reload_requested: Callable[[], bool] = lambda: False,
    *,
    worker_index: int | None = None,
    listener: socket.socket | None = None,
) -> int:
    running = await start_gateway(settings, worker_index=worker_index, listener=listener)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        metrics = running.gateway.metrics
        try:
            needs_restart = running.gateway.reload(reload_settings())
        except (ConfigError, Exception) as exc:  # a bad file must never take the gateway down
            metrics.config_reloads.labels("refused").inc()
            metrics.config_last_reload_success.set(0)
            log.error("configuration reload refused; keeping the running configuration", extra={"error": str(exc)})
            return
        metrics.config_reloads.labels("applied").inc()
        metrics.config_last_reload_success.set(1)
        if needs_restart:
            log.warning("some changes need a restart to apply", extra={"sections": needs_restart})

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if reload_requested():  # SIGHUP while starting: the file may have changed since it was read
        reload()
    if stop_requested():  # told to stop while starting: drain now, like any other stop
        stop.set()
    await stop.wait()
    await running.stop()
    # Records that missed the deadline are safe in the WAL; a clean exit lets the next start land them.
    return 0
