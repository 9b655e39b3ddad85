"""The operator API: off by default, on its own listener, every request needs the bearer token.

    GET  /status                           the live status page (gateway/ops/status/page.py); its data,
                                           GET /admin/status.json, needs the token like the rest
    GET  /admin/tap?stage=&device=&rate=   NDJSON: a sample of the records passing a stage (tap.py)
    GET  /admin/config                     the effective configuration (it holds no secrets: keys
                                           live in the registry, the token in its own file)
    GET  /admin/registry                   registry source, device count, freshness
    POST /admin/registry/reload            re-read the registry file, or refresh from Secrets Manager now
    GET  /admin/devices/{device_id}        enabled, metadata, key count (never a key), rate-limit state
    POST /admin/devices/{device_id}/disable, /enable
                                           file registry: written to the file and applied at once;
                                           Secrets Manager: 409 (change the secret; it applies
                                           within one refresh interval)
"""

from __future__ import annotations

import asyncio

import hmac
import logging
from pathlib import Path

from aiohttp import web

from gateway.errors import AdminError, ApiError
from gateway.responses import error_response, json_response
from gateway.ops.listener import start_operator_listener
from gateway.auth.registry import DeviceRegistry, NoSuchDevice, RegistryError, set_enabled
from gateway.service import GATEWAY
from gateway.settings import effective_config
from gateway.ops.status.page import admin_routes, is_public

log = logging.getLogger(__name__)

TOKEN = web.AppKey("admin_token", bytes)


def read_token(path: str) -> bytes:
    token = Path(path).read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the admin token must be at least 16 characters")
    return token.encode()


@web.middleware
async def _require_token(request: web.Request, handler) -> web.StreamResponse:
    if is_public(request.path):
        return await handler(request)
    provided = request.headers.get("Authorization", "")
    scheme, _, token = provided.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), request.app[TOKEN]):
        return json_response(
            401, {"error": "unauthorized", "message": "a valid bearer token is required"}, {"WWW-Authenticate": "Bearer"}
        )
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(exc.status, {"error": "http_error", "message": exc.reason})


async def config(request: web.Request) -> web.Response:
    return json_response(200, effective_config(request.app[GATEWAY].settings))


async def registry(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    source = gw.registry_source
    body: dict[str, object] = {"source": gw.settings.auth.registry_source, "devices": len(gw.registry)}
    if source is not None:
        body.update(stale=source.stale, last_success_unix=source.last_success)
    return json_response(200, body)


async def reload_registry(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.registry_source is not None:
        ok = await gw.registry_source.refresh()
        if not ok:
            raise AdminError(502, "registry_unavailable", "Secrets Manager did not answer; the last good keys stay in use")
    else:
        _reload_file(gw)
    return json_response(200, {"devices": len(gw.registry)})


async def device(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    device_id = request.match_info["device_id"]
    found = gw.registry.get(device_id)
    if found is None:
        raise AdminError(404, "not_found", f"no device {device_id!r}")
    return json_response(
        200,
        {
            "device_id": device_id,
            "enabled": found.enabled,
            "metadata": dict(found.metadata),
            "keys": len(found.keys),
            "rate_limit_tokens": gw.security.limiter.state(device_id),
        },
    )


async def set_device_enabled(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    device_id = request.match_info["device_id"]
    enabled = request.match_info["action"] == "enable"
    if gw.registry_source is not None:
        raise AdminError(
            409,
            "conflict",
            "the registry lives in Secrets Manager: set enabled in the device's entry there; "
            f"it applies within {gw.settings.secretsmanager.refresh_interval_secs:g} s",
        )
    try:
        # In a thread: the change may wait for the registry's lock (a `device` command running).
        await asyncio.to_thread(set_enabled, gw.settings.auth.registry_path, device_id, enabled)
    except NoSuchDevice as exc:
        raise AdminError(404, "not_found", str(exc)) from None
    except RegistryError as exc:  # its directory read-only, its lock held too long: nothing changed
        raise AdminError(503, "registry_unwritable", str(exc)) from None
    _reload_file(gw)
    log.info("device %s through the admin API", "enabled" if enabled else "disabled", extra={"device_id": device_id})
    return json_response(200, {"device_id": device_id, "enabled": enabled})


def _reload_file(gw) -> None:
    try:
        gw.registry = DeviceRegistry.load(gw.settings.auth.registry_path)
    except RegistryError as exc:
        gw.metrics.registry_refreshes.labels("error").inc()
        raise AdminError(500, "registry_error", f"the registry file cannot be read; the previous one stays: {exc}") from None
    gw.metrics.registry_refreshes.labels("ok").inc()
    if gw.registry_watcher is not None:
        gw.registry_watcher.reset()


def build_admin_app(gateway, token: bytes) -> web.Application:
    app = web.Application(middlewares=[_require_token])
    app[GATEWAY] = gateway
    app[TOKEN] = token
    app.router.add_get("/admin/config", config)
    app.router.add_get("/admin/registry", registry)
    app.router.add_post("/admin/registry/reload", reload_registry)
    app.router.add_get("/admin/devices/{device_id}", device)
    app.router.add_post(r"/admin/devices/{device_id}/{action:enable|disable}", set_device_enabled)
    app.router.add_routes(admin_routes(GATEWAY))
    return app


async def start_admin(gateway) -> web.AppRunner | None:
    """Start the admin listener when configured; the caller cleans the runner up."""
    s = gateway.settings.admin
    if not s.enabled or gateway.worker_index != 0:
        return None  # with several workers the first one serves it, for the whole instance
    # A tap ends itself when draining, within the 2 s a drain waits for the listener's requests.
    return await start_operator_listener(build_admin_app(gateway, read_token(s.token_path)), s.host, s.port, name="admin")
