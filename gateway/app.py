"""Build the aiohttp application: routes on the device listener and the gateway in its state.

Only the device API and health checks: ``/metrics`` lives on the ops listener (gateway/ops/listener.py).
"""

from __future__ import annotations

from aiohttp import web

from gateway.ops import health, openapi
from gateway.ingest.handler import ROUTE, expect_after_admission, post_telemetry
from gateway.responses import json_response
from gateway.service import GATEWAY, Gateway


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown route, wrong method) answer in the API's JSON shape too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
        return json_response(exc.status, {"error": code, "message": exc.reason}, headers=None)


def build_app(gateway: Gateway) -> web.Application:
    # The connection guard is outermost: it sees every request start and its final response.
    app = web.Application(middlewares=[gateway.security.connections.middleware, json_errors])
    app[GATEWAY] = gateway
    app.router.add_post(ROUTE, post_telemetry, expect_handler=expect_after_admission)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get(openapi.ROUTE, openapi.openapi)
    return app
