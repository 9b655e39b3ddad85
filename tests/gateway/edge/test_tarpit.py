"""A source that keeps asking while refused gets its answers late, and one that would be refused
anyway is answered at accept, without a request being built.

Over real sockets. The refusal delay is set long (30 s) so that "answered late" reads as "not
answered within a few seconds", while another source is still answered at once.
"""

from __future__ import annotations

import asyncio

from gateway.auth.signing import sign_request
from tests.gateway.conftest import make_env
from tests.gateway.edge.test_abuse import body_of, send
from tests.gateway.edge.test_edge_hardening import one_body_byte_each, session_from

URL = "/v1/telemetry"
LATE = {"refusal_delay_secs": 30.0}


def signed_post(env, device_id: str, records: int) -> bytes:
    body = body_of(device_id, records)
    headers = {"Content-Type": "application/x-ndjson", **sign_request(device_id, env.device(device_id).key, body)}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def status_within(port: int, request: bytes, seconds: float) -> int | None:
    """The status answered to ``request`` on a new connection, or None if none came within ``seconds``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), seconds)
        return int(line.split()[1]) if line else None
    except TimeoutError:
        return None
    finally:
        writer.close()


async def test_a_device_that_ignores_retry_after_is_answered_late(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=2, rate_limits={"records_per_sec": 0.001, "burst_records": 5}, connections=LATE)
    gw = await start(env)
    assert await status_within(gw.port, signed_post(env, "dev-1", 10), 5) == 202  # now in deficit
    assert await status_within(gw.port, signed_post(env, "dev-1", 1), 5) == 429  # the first refusal: at once
    assert await status_within(gw.port, signed_post(env, "dev-1", 1), 3) is None, "asked again at once, answered at once"
    async with session_from("127.0.0.2") as other:
        assert (await send(other, gw, env, "dev-2", n=1))[0] == 202, "another source waits for nothing"


async def test_a_source_holding_its_share_is_refused_at_accept(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, admission={"max_inflight_per_source": 2})
    gw = await start(env)
    held = await one_body_byte_each(gw.port, env, 2)  # the source's two slots
    while gw.gateway.inflight < 2:
        await asyncio.sleep(0.01)
    requests = gw.gateway.metrics.http_requests.labels(URL, "503")._value.get()
    assert await status_within(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 5) == 503
    assert gw.gateway.metrics.connections_closed.labels("source_refused")._value.get() == 1
    assert gw.gateway.metrics.http_requests.labels(URL, "503")._value.get() == requests, "a request was built"
    for _, writer in held:
        writer.close()
    async with session_from("127.0.0.2") as other:
        assert (await send(other, gw, env, "dev-1", n=1))[0] == 202
