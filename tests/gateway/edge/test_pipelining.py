"""Finding 9, the pipelined side: bytes queued behind a complete request must not pass for an idle connection.

Each test talks raw HTTP/1.1 over a real socket. The idle timeout is long (60 s) and the header
timeout short, so a connection closed within a few seconds was closed by the header timeout.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.auth.signing import sign_request
from tests.gateway.conftest import make_env, read_zone
from tests.gateway.edge.test_abuse import body_of

URL = "/v1/telemetry"
TIMEOUTS = {"header_timeout_secs": 0.5, "idle_timeout_secs": 60.0}
PARTIAL = b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"


async def connected(tmp_path, start) -> tuple[object, object, asyncio.StreamReader, asyncio.StreamWriter]:
    """A gateway with one device and these timeouts, its environment, and a raw connection to it."""
    env = make_env(tmp_path, n_devices=1, connections=TIMEOUTS)
    gw = await start(env)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    return gw, env, reader, writer


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return int(head.split()[1]), await asyncio.wait_for(reader.readexactly(length), 10)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the gateway closes the connection within ``seconds`` (well below the idle timeout)."""
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def signed_post(env, device_id: str, records: int) -> bytes:
    body = body_of(device_id, records)
    headers = {"Content-Type": "application/x-ndjson", **sign_request(device_id, env.device(device_id).key, body)}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def test_a_partial_request_pipelined_behind_a_get_is_closed_by_the_header_timeout(tmp_path, start):
    gw, env, reader, writer = await connected(tmp_path, start)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + PARTIAL)  # one write: both arrive together
    await writer.drain()
    assert (await read_response(reader))[0] == 200
    assert await closed_within(reader, 10), "the pipelined partial request escaped the header timeout"
    writer.close()
    assert gw.gateway.metrics.connections_closed.labels("header_timeout")._value.get() == 1


async def test_a_partial_request_pipelined_behind_a_body_is_closed_by_the_header_timeout(tmp_path, start):
    gw, env, reader, writer = await connected(tmp_path, start)
    writer.write(signed_post(env, "dev-1", 5) + PARTIAL)  # the partial request starts right where the body ends
    await writer.drain()
    assert (await read_response(reader))[0] == 202
    assert await closed_within(reader, 10), "bytes after a Content-Length body passed for an idle connection"
    writer.close()


async def test_complete_pipelined_requests_are_answered_and_the_connection_stays_kept_alive(tmp_path, start):
    gw, env, reader, writer = await connected(tmp_path, start)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + signed_post(env, "dev-1", 5) + b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert [(await read_response(reader))[0] for _ in range(3)] == [200, 202, 200]
    assert not await closed_within(reader, 2), "an idle kept-alive connection was closed by the header timeout"
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_a_client_that_shuts_its_side_after_sending_is_answered_then_closed(tmp_path, start):
    """``shutdown(SHUT_WR)`` right after the requests: each complete one is answered, then the
    connection closes (aiohttp alone closes at EOF: the records land, the device never hears so)."""
    gw, env, reader, writer = await connected(tmp_path, start)
    writer.write(signed_post(env, "dev-1", 5) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.write_eof()
    await writer.drain()
    assert [(await read_response(reader))[0] for _ in range(2)] == [202, 200]
    assert await closed_within(reader, 5), "the half-closed connection stayed open after its answers"
    writer.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_client_that_shuts_its_side_mid_body_is_answered_400_then_closed(tmp_path, start, framing, caplog):
    """``shutdown(SHUT_WR)`` with the body short of what its framing says: it can never be complete.
    The connection used to close without a word (a device could not tell a cut body from a lost
    answer); the request is now refused as malformed, then the connection closes. Nothing lands,
    and nothing is logged as an error: a device that loses its link mid-upload is no fault of the gateway."""
    gw, env, reader, writer = await connected(tmp_path, start)
    request = signed_post(env, "dev-1", 5)
    if framing == "chunked":
        head, _, body = request.partition(b"\r\n\r\n")
        head = head.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")
        request = head + b"\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    writer.write(request[:-10])  # 10 bytes short
    writer.write_eof()
    await writer.drain()
    status, body = await read_response(reader)
    assert status == 400 and b"the body ended before its declared length" in body, body
    assert await closed_within(reader, 5), "the half-closed connection stayed open after its answer"
    writer.close()
    await asyncio.sleep(0.3)
    assert read_zone(env.lake, "raw") == [] and read_zone(env.lake, "quarantine") == []
    assert errors_logged(caplog) == []


@pytest.mark.parametrize("how", ["shut_wr", "close"])
async def test_a_client_gone_mid_body_is_no_error(tmp_path, start, caplog, how):
    """A client that closes its socket (or its side of it) with its body short: aiohttp read the
    body again after the 400, met the refusal once more and logged it as an unhandled exception
    (ERROR, with a traceback), once per such request. It is logged at most as information now."""
    gw, env, reader, writer = await connected(tmp_path, start)
    writer.write(signed_post(env, "dev-1", 5)[:-10])
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body when the client goes
    if how == "shut_wr":
        writer.write_eof()
        assert (await read_response(reader))[0] == 400
    writer.close()
    await asyncio.sleep(0.5)
    assert gw.gateway.metrics.http_requests.labels(URL, "400")._value.get() == 1
    assert errors_logged(caplog) == []


def errors_logged(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_gone_mid_body_while_its_refusal_is_held_is_no_error(tmp_path, start, caplog):
    """A refusal asked for again before its Retry-After is held back (the tarpit). A client that
    left mid-body during that hold cut a body the middleware had already let go of: aiohttp read it
    again after the answer and logged the cut as an unhandled exception (seen from outside, under a
    drive dropping uploads mid-body). Whatever the request waited on, the cut is no error now."""
    env = make_env(tmp_path, n_devices=1, connections={**TIMEOUTS, "refusal_delay_secs": 1.0},
                   rate_limits={"records_per_sec": 1.0, "burst_records": 1})
    gw = await start(env)
    statuses = []
    for _ in range(2):  # accepted (and over its rate), then refused: the next refusal is held
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(signed_post(env, "dev-1", 5))
        await writer.drain()
        statuses.append((await read_response(reader))[0])
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(signed_post(env, "dev-1", 5)[:-10])
    await writer.drain()
    await asyncio.sleep(0.2)  # refused at its headers, and held
    writer.write_eof()
    statuses.append((await read_response(reader))[0])
    assert await closed_within(reader, 5)
    writer.close()
    await asyncio.sleep(0.3)
    assert statuses == [202, 429, 429]
    assert errors_logged(caplog) == []
