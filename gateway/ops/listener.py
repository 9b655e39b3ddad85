"""The ops listener: ``/metrics`` for the scraper, on its own address (loopback by default).

The device listener serves the device API and ``/healthz`` ``/readyz`` only, so nothing an operator
reads is reachable from where devices connect, whatever spelling of the path (``/%6detrics``) a
client tries. With several workers the supervisor binds this socket once, like the device one, and
every worker serves it: whichever answers merges the whole instance (gateway/ops/status/cluster.py).
"""

from __future__ import annotations

import logging
import os
import socket

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.listeners import bind_listener
from gateway.service import GATEWAY
from gateway.ops.status.cluster import Cluster, runtime_dir
from gateway.supervisor import OPS_FD_ENV

log = logging.getLogger(__name__)


async def metrics(request: web.Request) -> web.Response:
    # The whole instance, whichever worker answers (gateway/ops/status/cluster.py).
    body = await Cluster(request.app[GATEWAY], runtime_dir()).metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_ops_app(gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get("/metrics", metrics)
    return app


def inherited_socket() -> socket.socket | None:
    """The ops socket a supervisor handed down, or None when this process binds its own."""
    fd = os.environ.get(OPS_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


async def start_operator_listener(app: web.Application, host: str, port: int, *, name: str, sock: socket.socket | None = None) -> web.AppRunner:
    """Serve ``app`` on its own address (or an inherited socket); the caller cleans the runner up.

    A drain waits 2 s at most for its requests still open: nothing on it holds a device's records.
    """
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock if sock is not None else bind_listener(host, port, 128))
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    log.info(f"{name} listening", extra={"host": host, "port": runner.addresses[0][1]})
    return runner


async def start_ops(gateway, sock: socket.socket | None = None) -> web.AppRunner | None:
    """Start the ops listener when enabled, on ``sock`` where the start bound it already, else on the
    socket a supervisor handed down or its own; the caller cleans the runner up."""
    s = gateway.settings.ops
    if not s.enabled:
        return None
    return await start_operator_listener(build_ops_app(gateway), s.host, s.port, name="ops", sock=sock if sock is not None else inherited_socket())
