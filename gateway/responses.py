"""The JSON answers every listener gives: a body and status, or an ``ApiError`` as the device API words it."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.errors import AllRecordsInvalid, ApiError


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def error_response(error: ApiError) -> web.Response:
    body: dict[str, object] = {"error": error.code, "message": error.message}
    if isinstance(error, AllRecordsInvalid):
        body["errors"] = error.errors
    headers = {"Retry-After": str(error.retry_after_secs)} if error.retry_after_secs is not None else None
    response = json_response(error.status, body, headers)
    if error.closes_connection:
        response.force_close()
    return response
