"""The JSON answers every listener gives: a body and status, or an ``ApiError`` as the device API words it."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.errors import AllRecordsInvalid, ApiError, MalformedRequest


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


def parser_refusal(exc: BaseException | None, message: str | None) -> web.Response:
    """The answer to a request aiohttp's HTTP parser refused (two ``Content-Length`` headers, a bad
    chunk, a malformed header line): 400 in the device API's JSON, as every other refusal, on a
    connection then closed (aiohttp's own answer is plain text)."""
    return error_response(malformed_request(message or (str(exc) if exc is not None else "")))


def malformed_request(parser_message: str) -> MalformedRequest:
    """The refusal of a request whose framing aiohttp's parser refused, with the parser's reason."""
    # aiohttp's message is a line, then the offending bytes and a caret under them: keep the line.
    text = parser_message.strip()
    reason = text.splitlines()[0].rstrip(": ")[:200] if text else "unparseable request"  # it may quote the request
    return MalformedRequest(f"the HTTP request is malformed: {reason}")
