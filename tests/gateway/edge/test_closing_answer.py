"""The fixed answers written straight to a socket: a refusal at accept, the listener while starting."""

from __future__ import annotations

import http.client
import io
import json

from gateway.edge.closing_answer import closing_answer
from gateway.edge.connections import fixed_response
from gateway.errors import RateLimited, Unavailable


class _Socket:
    def __init__(self, raw: bytes) -> None:
        self._file = io.BytesIO(raw)

    def makefile(self, *args, **kwargs):
        return self._file


def read(raw: bytes, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    """``raw`` as an HTTP client reads it."""
    response = http.client.HTTPResponse(_Socket(raw), method=method)
    response.begin()
    return response, response.read()


def test_a_refusal_reads_as_its_status_reason_retry_after_and_json_body_and_closes():
    response, body = read(fixed_response(RateLimited("slow down", retry_after_secs=7)))
    assert (response.status, response.reason) == (429, "Too Many Requests")
    assert response.getheader("Retry-After") == "7" and response.getheader("Connection") == "close"
    assert json.loads(body) == {"error": RateLimited.code, "message": "slow down"}
    response, _ = read(fixed_response(Unavailable("later")))
    assert (response.status, response.reason) == (503, "Service Unavailable") and response.getheader("Retry-After") is None


def test_the_answer_to_a_head_request_keeps_the_length_of_the_body_it_leaves_out():
    raw = closing_answer(200, b'{"status": "starting"}', head_only=True)
    response, body = read(raw, method="HEAD")
    assert response.status == 200 and body == b""
    assert response.getheader("Content-Length") == str(len(b'{"status": "starting"}'))
    assert raw.endswith(b"\r\n\r\n")
