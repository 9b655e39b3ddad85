"""Health checks on the device listener: liveness and readiness (what the load balancer checks)."""

from __future__ import annotations

from aiohttp import web

from gateway.responses import json_response
from gateway.service import GATEWAY


async def healthz(request: web.Request) -> web.Response:
    wal = request.app[GATEWAY].pipeline.wal
    if wal.failure is not None:
        # The WAL could not recover from a disk error: only a restart (or a replacement) helps.
        return json_response(503, {"status": "wal_failed", "reason": wal.failure})
    return json_response(200, {"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.draining:
        return json_response(503, {"status": "draining"})
    refusal = gw.pipeline.wal.refusal()
    if refusal is not None:
        # Stay in rotation only while we can take records; the ALB moves devices elsewhere.
        return json_response(503, {"status": f"wal_{refusal}"})
    return json_response(200, {"status": "ready"})

