"""Build the aiohttp application: routes on the device listener and the gateway in its state.

Only the device API and health checks: ``/metrics`` lives on the ops listener (gateway/ops/listener.py).
"""

from __future__ import annotations

from aiohttp import HttpVersion10, HttpVersion11, web

from gateway.errors import VersionNotSupported
from gateway.ops import health, openapi
from gateway.ingest.handler import ROUTE, expect_after_admission, post_telemetry
from gateway.responses import error_response, json_response
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


@web.middleware
async def http_1_only(request: web.Request, handler) -> web.StreamResponse:
    """A request line naming HTTP/2.0 (or 0.9) parses, and aiohttp would answer it in kind: it gets
    505 instead, in HTTP/1.1, the highest version the gateway speaks (RFC 9110 15.6.6, RFC 9112 2.3)."""
    if request.version in (HttpVersion10, HttpVersion11):
        return await handler(request)
    claimed = request.version
    # The answer's status line is written in the request's version, which aiohttp caches (reify).
    request._cache["version"] = HttpVersion11
    return error_response(VersionNotSupported(f"HTTP/{claimed.major}.{claimed.minor} is not supported: send HTTP/1.1"))


def build_app(gateway: Gateway) -> web.Application:
    # The connection guard is outermost: it sees every request start and its final response.
    app = web.Application(middlewares=[gateway.security.connections.middleware, http_1_only, json_errors])
    app[GATEWAY] = gateway
    app.router.add_post(ROUTE, post_telemetry, expect_handler=expect_after_admission)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get(openapi.ROUTE, openapi.openapi)
    return app
