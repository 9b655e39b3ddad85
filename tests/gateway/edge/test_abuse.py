"""Abuse resistance: per-device rate limits (429), admission control (503), slow clients, proxies."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from gateway.auth.signing import sign_request
from tests.gateway.conftest import free_port, make_env, record, wait_for_records


def body_of(device_id: str, n: int) -> bytes:
    return b"".join(orjson.dumps(record(device_id, seq=time.time_ns() + i)) + b"\n" for i in range(n))


async def send(http, gw, env, device_id: str, n: int = 10, **headers: str) -> tuple[int, dict, dict]:
    body = body_of(device_id, n)
    signed = {"Content-Type": "application/x-ndjson", **sign_request(device_id, env.device(device_id).key, body), **headers}
    async with http.post(gw.url + "/v1/telemetry", data=body, headers=signed) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_abusive_device_gets_429_while_the_others_get_202(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=4, rate_limits={"records_per_sec": 200.0, "burst_records": 200})
    gw = await start(env)

    async def abuser() -> list[int]:
        statuses = []
        for _ in range(40):
            statuses.append((await send(http, gw, env, "dev-4", n=50))[0])
        return statuses

    async def polite(device_id: str) -> list[int]:
        statuses = []
        for _ in range(5):
            statuses.append((await send(http, gw, env, device_id, n=10))[0])
            await asyncio.sleep(0.05)
        return statuses

    abusive, *others = await asyncio.gather(abuser(), *(polite(d) for d in ("dev-1", "dev-2", "dev-3")))
    assert abusive.count(429) >= 30 and abusive[:4] == [202] * 4
    assert all(s == [202] * 5 for s in others)
    assert gw.gateway.metrics.rate_limited._value.get() == abusive.count(429)


async def test_retry_after_comes_from_the_bucket(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, rate_limits={"records_per_sec": 10.0, "burst_records": 10})
    gw = await start(env)
    assert (await send(http, gw, env, "dev-1", n=50))[0] == 202  # 40 records in debt: 4 s at 10/s
    status, answer, headers = await send(http, gw, env, "dev-1", n=1)
    assert status == 429 and answer["error"] == "rate_limited"
    assert 3 <= int(headers["Retry-After"]) <= 5


async def test_byte_rate_limit(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, rate_limits={"bytes_per_sec": 1000.0, "burst_bytes": 1000})
    gw = await start(env)
    assert (await send(http, gw, env, "dev-1", n=100))[0] == 202
    status, _, headers = await send(http, gw, env, "dev-1", n=1)
    assert status == 429 and int(headers["Retry-After"]) >= 5


async def test_rate_limits_are_reloadable(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, rate_limits={"records_per_sec": 1.0, "burst_records": 1})
    gw = await start(env)
    assert (await send(http, gw, env, "dev-1", n=20))[0] == 202
    assert (await send(http, gw, env, "dev-1"))[0] == 429
    from gateway.edge.settings import RateLimitSettings

    gw.gateway.reload(msgspec_replace(gw.gateway.settings, rate_limits=RateLimitSettings(enabled=False)))
    assert (await send(http, gw, env, "dev-1"))[0] == 202


def msgspec_replace(settings, **changes):
    import msgspec

    return msgspec.structs.replace(settings, **changes)


async def test_forged_requests_do_not_drain_a_device_bucket(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, rate_limits={"records_per_sec": 1.0, "burst_records": 5})
    gw = await start(env)
    for _ in range(20):  # an attacker sending under dev-1's name without its key
        body = body_of("dev-1", 50)
        headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", "stolen-name-only", body)}
        async with http.post(gw.url + "/v1/telemetry", data=body, headers=headers) as resp:
            assert resp.status == 401
    assert (await send(http, gw, env, "dev-1", n=1))[0] == 202


@pytest.mark.parametrize(
    ("admission", "reason"),
    [({"max_inflight_requests": 1}, "inflight_requests"), ({"max_inflight_bytes": 1000}, "inflight_bytes")],
)
async def test_admission_control_answers_503_with_retry_after(tmp_path, start, http, admission, reason):
    env = make_env(tmp_path, n_devices=1, admission={**admission, "retry_after_secs": 3, "retry_after_spread_secs": 0})
    gw = await start(env)
    # Hold one request open mid-body (chunked: it declares no length), then send another.
    body = body_of("dev-1", 100)
    headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", env.device("dev-1").key, body)}
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode())
    writer.write(b"%x\r\n%b\r\n" % (2000, body[:2000]))
    await writer.drain()
    await asyncio.sleep(0.2)
    status, answer, response_headers = await send(http, gw, env, "dev-1", n=5)
    assert status == 503 and response_headers["Retry-After"] == "3" and "overloaded" in answer["message"]
    assert gw.gateway.metrics.admission_refused.labels(reason)._value.get() == 1
    writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body) - 2000, body[2000:]))
    await writer.drain()
    assert b" 202 " in await reader.readline()
    writer.close()


async def test_event_loop_lag_refuses_new_requests(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, admission={"max_loop_lag_ms": 50})
    gw = await start(env)
    gw.gateway._lag_task.cancel()  # hold the measurement still
    await asyncio.sleep(0)
    gw.gateway.loop_lag_secs = 0.2
    assert (await send(http, gw, env, "dev-1"))[0] == 503


async def raw_status(port: int, payload: bytes, *, wait: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), wait)
    finally:
        writer.close()


async def test_slow_headers_are_cut_off(tmp_path, start):
    env = make_env(tmp_path, n_devices=1, connections={"header_timeout_secs": 0.3})
    gw = await start(env)
    started = time.monotonic()
    answer = await raw_status(gw.port, b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    assert answer == b"" and time.monotonic() - started < 3
    assert gw.gateway.metrics.connections_closed.labels("header_timeout")._value.get() == 1


async def test_slow_body_gets_408_and_a_closed_connection(tmp_path, start):
    env = make_env(tmp_path, n_devices=1, connections={"body_idle_timeout_secs": 0.3})
    gw = await start(env)
    body = body_of("dev-1", 10)
    headers = sign_request("dev-1", env.device("dev-1").key, body)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {len(body)}\r\n{head}\r\n"
    answer = await raw_status(gw.port, request.encode() + body[:10])
    assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer


async def test_connection_cap(tmp_path, start):
    env = make_env(tmp_path, n_devices=1, connections={"max_connections": 2})
    gw = await start(env)
    held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
    for _, writer in held:  # connections that have started a request keep their place
        writer.write(b"GET /hea")
        await writer.drain()
    await asyncio.sleep(0.05)
    answer = await raw_status(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
    assert gw.gateway.metrics.connections_closed.labels("connection_cap")._value.get() == 1
    for _, writer in held:
        writer.close()


async def test_old_connections_are_told_to_close(tmp_path, start, http):
    env = make_env(tmp_path, n_devices=1, connections={"max_age_secs": 0.2, "max_age_jitter": 0.0})
    gw = await start(env)
    async with http.get(gw.url + "/healthz") as resp:
        assert resp.headers.get("Connection", "").lower() != "close"
    await asyncio.sleep(0.3)
    async with http.get(gw.url + "/healthz") as resp:
        assert resp.headers.get("Connection", "").lower() == "close"
    assert gw.gateway.metrics.connections_closed.labels("max_age")._value.get() == 1


@pytest.mark.parametrize(
    ("trusted", "expected"), [(["127.0.0.0/8"], "203.0.113.7"), (["10.0.0.0/8"], "127.0.0.1"), ([], "127.0.0.1")]
)
async def test_forwarded_for_only_from_trusted_proxies(tmp_path, start, http, trusted, expected):
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env, {"EDGE_GATEWAY__PROXY__TRUSTED_CIDRS": orjson.dumps(trusted).decode()})
    status, _, _ = await send(http, gw, env, "dev-1", n=1, **{"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
    assert status == 202
    lines = await wait_for_records(env.lake, "raw", 1)
    assert lines[0]["source_ip"] == expected


async def test_a_listener_on_every_address_takes_ipv4_and_ipv6_and_names_each_source_plainly(tmp_path, start, caplog):
    """``listen.host = "::"`` bound IPv6 only: every IPv4 device was refused. It takes both now (the
    ops listener on "::" too), and an IPv4 device's address is itself (not ``::ffff:127.0.0.1``) in
    its records, its limits and the access log."""
    env = make_env(tmp_path, n_devices=1)
    ops_port = free_port()
    gw = await start(env, {
        "EDGE_GATEWAY__LISTEN__HOST": "::", "EDGE_GATEWAY__PROXY__TRUSTED_CIDRS": '["10.0.0.0/8"]',
        "EDGE_GATEWAY__OPS__HOST": "::", "EDGE_GATEWAY__OPS__PORT": str(ops_port),
        "EDGE_GATEWAY__LOG__ACCESS_LOG": "true",
    })  # fmt: skip
    caplog.set_level("INFO", logger="gateway.access")
    for host in ("127.0.0.1", "[::1]"):
        async with aiohttp.ClientSession() as http:
            body = body_of("dev-1", 1)
            headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", env.device("dev-1").key, body)}
            async with http.post(f"http://{host}:{gw.port}/v1/telemetry", data=body, headers=headers) as resp:
                assert resp.status == 202, await resp.text()
            async with http.get(f"http://{host}:{ops_port}/metrics") as resp:
                assert resp.status == 200
    lines = await wait_for_records(env.lake, "raw", 2)
    assert sorted(line["source_ip"] for line in lines) == ["127.0.0.1", "::1"]
    posts = [r for r in caplog.records if r.name == "gateway.access" and r.path == "/v1/telemetry"]
    assert sorted(r.remote for r in posts) == ["127.0.0.1", "::1"]


def test_forwarded_for_walks_past_trusted_hops():
    from gateway.edge.proxy import resolve_peer
    from gateway.edge.settings import ProxySettings

    s = ProxySettings(trusted_cidrs=["10.0.0.0/8"])
    hdr = {"X-Forwarded-For": "1.2.3.4, 203.0.113.9, 10.0.0.5", "X-Forwarded-Proto": "https"}
    peer = resolve_peer("10.1.2.3", False, hdr, s)
    assert (peer.address, peer.scheme, peer.trusted_proxy) == ("203.0.113.9", "https", True)
    assert resolve_peer("10.1.2.3", False, {"X-Forwarded-For": "junk, 10.0.0.5"}, s).address == "10.0.0.5"
    assert resolve_peer("192.0.2.1", False, hdr, s) == type(peer)("192.0.2.1", "http", False)
    huge = {"X-Forwarded-For": ",".join(["10.0.0.1"] * 100_000)}
    assert resolve_peer("10.1.2.3", False, huge, s).trusted_proxy


async def test_silent_sockets_cannot_hold_the_connection_cap(tmp_path, start, http):
    """Edge finding 9: sockets that never sent a byte kept signed requests out (503)."""
    env = make_env(tmp_path, n_devices=1, connections={"max_connections": 8})
    gw = await start(env)
    silent = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(8)]
    await asyncio.sleep(0.05)
    for _ in range(3):  # each newcomer takes the place of the oldest silent socket
        status, _, _ = await send(http, gw, env, "dev-1", n=2)
        assert status == 202
    assert gw.gateway.metrics.connections_closed.labels("silent_preempted")._value.get() >= 1
    for _, writer in silent:
        writer.close()


async def test_idle_kept_alive_connections_cannot_hold_the_connection_cap(tmp_path, start, http):
    """A pool of clients that went quiet after a request each held the cap: new devices got 503 until
    the idle timeout (75 s). The connection idle longest now makes room, and only that one."""
    env = make_env(tmp_path, n_devices=1, connections={"max_connections": 4})
    gw = await start(env)
    idle = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        idle.append((reader, writer))
        await asyncio.sleep(0.01)  # the first one has waited longest
    status, _, _ = await send(http, gw, env, "dev-1", n=2)
    assert status == 202
    assert await asyncio.wait_for(idle[0][0].read(), 5) == b""  # closed to make room
    for reader, _ in idle[1:]:
        assert not reader.at_eof()
    assert gw.gateway.metrics.connections_closed.labels("idle_preempted")._value.get() == 1
    for _, writer in idle:
        writer.close()


async def test_one_source_holds_at_most_its_share_of_connections(tmp_path, start, http):
    """Edge finding 9: one address could open every connection the gateway allows."""
    env = make_env(tmp_path, n_devices=1, connections={"max_connections_per_source": 3})
    gw = await start(env)
    held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(3)]
    answer = await raw_status(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        assert (await send(other, gw, env, "dev-1", n=2))[0] == 202, "another source is not affected"
    for _, writer in held:
        writer.close()


async def test_a_trusted_load_balancer_is_not_held_to_one_sources_share(tmp_path, start, http):
    """Behind an ALB every connection comes from a few balancer addresses: they carry everyone."""
    env = make_env(tmp_path, n_devices=1, connections={"max_connections_per_source": 2})
    gw = await start(env, {"EDGE_GATEWAY__PROXY__TRUSTED_CIDRS": '["127.0.0.1/32"]'})
    held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(4)]
    assert (await send(http, gw, env, "dev-1", n=2))[0] == 202
    for _, writer in held:
        writer.close()
