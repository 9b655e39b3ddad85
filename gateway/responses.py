"""The JSON answers every listener gives: a body and status, or an ``ApiError`` as the device API words it."""

from __future__ import annotations

import re

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gateway.errors import AllRecordsInvalid, ApiError, HeadersTooLarge, MalformedRequest, UriTooLong


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
    connection then closed (aiohttp's own answer is plain text); 414 for a target and 431 for
    headers longer or more than the parser takes (RFC 9110 15.5.15, RFC 6585 5)."""
    return error_response(malformed_request(message or (str(exc) if exc is not None else ""), exc))


def malformed_request(parser_message: str, exc: BaseException | None = None) -> MalformedRequest:
    """The refusal of a request whose framing aiohttp's parser refused, with the parser's reason."""
    # aiohttp's message is a line, then the offending bytes and a caret under them: keep the line.
    text = parser_message.strip()
    reason = text.splitlines()[0].rstrip(": ")[:200] if text else "unparseable request"  # it may quote the request
    too_large = _too_large(exc)
    limit = re.search(r"more than (\d+) bytes", reason)
    at_most = f" (at most {limit[1]} bytes a line)" if limit else f" ({reason})"
    if too_large is UriTooLong:
        return UriTooLong(f"the request target is longer than the gateway takes{at_most}")
    if too_large is HeadersTooLarge:
        return HeadersTooLarge(f"the request's headers are larger than the gateway takes{at_most}")
    return MalformedRequest(f"the HTTP request is malformed: {reason}")


# Where aiohttp's parsers (the C one, and the Python one without its extensions) read a request's
# target and its headers: a line too long there is a target or a header too long.
_TARGET_READERS = frozenset({"cb_on_url", "parse_message"})
_HEADER_READERS = frozenset({"cb_on_header_field", "cb_on_header_value", "parse_headers", "_process_header"})


def _too_large(exc: BaseException | None) -> type[MalformedRequest] | None:
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
        return HeadersTooLarge
    if not isinstance(exc, LineTooLong):
        return None
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    reader = tb.tb_frame.f_code.co_name.rsplit(".", 1)[-1] if tb is not None else ""  # Cython names are qualified
    return UriTooLong if reader in _TARGET_READERS else HeadersTooLarge if reader in _HEADER_READERS else None
