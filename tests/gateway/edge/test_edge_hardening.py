"""What an unauthenticated client can no longer do to everyone else, over real sockets.

Each test names the finding it covers: the work done before authentication, decompression limits,
header parsing, device enumeration, slots held by slow or many connections, and replays across
restarts.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging

import aiohttp
import orjson
import zstandard

from gateway.ingest import handler
from gateway.auth.signing import sign_request
from tests.gateway.conftest import make_env, read_zone, record, wait_for_records
from tests.gateway.edge.test_abuse import body_of, send

URL = "/v1/telemetry"


def ndjson(*records: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


async def post(http, gw, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with http.post(gw.url + URL, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def zstd_stream(data: bytes, **params) -> bytes:
    """zstd without a declared content size, so the frame's window is what the decoder must allocate."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(**params)) if params else zstandard.ZstdCompressor()
    with cctx.stream_writer(out, closefd=False) as writer:
        writer.write(data)
    return out.getvalue()


async def test_a_forged_bomb_is_refused_without_being_decompressed(tmp_path, start, http, monkeypatch):
    """Finding 1: decompression, framing and validation ran before the signature was checked."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    decoded = []
    real_decode = handler._decode
    monkeypatch.setattr(handler, "_decode", lambda *args: decoded.append(1) or real_decode(*args))
    bomb = zstd_stream(b"\n" * (64 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "zstd", **sign_request("dev-1", "not-the-key", bomb)}
    status, answer = await post(http, gw, bomb, headers)
    assert (status, answer["error"]) == (401, "unauthorized")
    assert decoded == [], "a forged body was decompressed"
    assert (await send(http, gw, env, "dev-1", n=3))[0] == 202 and decoded == [1]


async def test_a_zstd_frame_asking_for_a_huge_window_is_refused(tmp_path, start, http):
    """Finding 3: a frame declaring a 2^27 window held ~60 MiB per request."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    body = zstd_stream(ndjson(record("dev-1", seq=1)), window_log=27)
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "zstd", **sign_request("dev-1", env.device().key, body)}
    status, answer = await post(http, gw, body, headers)
    assert status == 400 and "zstd" in answer["message"]
    small = zstd_stream(ndjson(record("dev-1", seq=2)), window_log=20)
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "zstd", **sign_request("dev-1", env.device().key, small)}
    assert (await post(http, gw, small, headers))[0] == 202


async def test_compressed_bodies_are_charged_what_they_decompress_to(tmp_path, start, http):
    """Finding 4: the byte rate limit charged compressed bytes, so zstd bypassed it."""
    env = make_env(tmp_path, n_devices=1, rate_limits={"bytes_per_sec": 64 * 1024.0, "burst_bytes": 64 * 1024})
    gw = await start(env)
    plain = b"".join(orjson.dumps(record("dev-1", seq=i, temperature_c=20.0)) + b"\n" for i in range(3000))
    body = zstandard.ZstdCompressor().compress(plain)
    assert len(body) < 64 * 1024 < len(plain)
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "zstd", **sign_request("dev-1", env.device().key, body)}
    assert (await post(http, gw, body, headers))[0] == 202
    status, _, response_headers = await send(http, gw, env, "dev-1", n=1)
    assert status == 429 and int(response_headers["Retry-After"]) >= 1


async def test_a_unicode_digit_timestamp_is_a_401_not_a_500(tmp_path, start, http):
    """Finding 6: `X-Timestamp: ¹` passed str.isdigit() and crashed int() (a 500 for anyone)."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    for stamp in ("¹", "١٧٠٠٠٠٠٠٠٠", "12 34"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: 3\r\n"
            b"X-Device-Id: dev-1\r\nX-Signature: v1=00\r\nX-Timestamp: " + stamp.encode() + b"\r\nConnection: close\r\n\r\n{}\n"
        )
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert response.split(b"\r\n", 1)[0].split()[1] == b"401", (stamp, response[:200])
        assert b"whole unix seconds" in response


async def test_every_gzip_member_is_read_and_trailing_garbage_refused(tmp_path, start, http):
    """Finding 7: a body of several gzip members kept only the first; trailing garbage was accepted."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    members = b"".join(gzip.compress(ndjson(record("dev-1", seq=s))) for s in range(3))
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip", **sign_request("dev-1", env.device().key, members)}
    status, answer = await post(http, gw, members, headers)
    assert status == 202 and answer["accepted"] == 3
    # The same kind of body split across reads at every awkward place: each member's magic cut in two.
    split = b"".join(gzip.compress(ndjson(record("dev-1", seq=s))) for s in range(3, 6))
    status = await _chunked_post(gw.port, split, env.device().key, cut_every=11)
    assert status == 202
    junk = gzip.compress(ndjson(record("dev-1", seq=9))) + b"garbage"
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip", **sign_request("dev-1", env.device().key, junk)}
    status, answer = await post(http, gw, junk, headers)
    assert status == 400 and "after the end of the gzip stream" in answer["message"]
    lines = await wait_for_records(env.lake, "raw", 6)
    assert sorted(line["seq"] for line in lines) == list(range(6))


async def _chunked_post(port: int, body: bytes, key: str, cut_every: int) -> int:
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip", **sign_request("dev-1", key, body)}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST {URL} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n{head}\r\n".encode())
    for at in range(0, len(body), cut_every):
        piece = body[at : at + cut_every]
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        await writer.drain()
        await asyncio.sleep(0.001)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_unknown_and_known_devices_get_the_same_answer(tmp_path, start, http):
    """Finding 8: an unknown id got an immediate 401, a disabled device '403 disabled' with a wrong key."""
    env = make_env(tmp_path, n_devices=2)
    gw = await start(env)
    env.disable("dev-2")
    gw.gateway.reload(gw.gateway.settings)
    answers = []
    for device_id in ("dev-1", "nobody-here", "dev-2"):
        body = ndjson(record(device_id))
        headers = {"Content-Type": "application/x-ndjson", **sign_request(device_id, "a-wrong-key", body)}
        answers.append(await post(http, gw, body, headers))
    assert answers[0] == answers[1] == answers[2] == (401, {"error": "unauthorized", "message": "the signature does not match"})
    body = ndjson(record("dev-2"))
    status, answer = await post(http, gw, body, {"Content-Type": "application/x-ndjson", **sign_request("dev-2", env.device("dev-2").key, body)})
    assert status == 403 and "disabled" in answer["message"], "only the device itself learns it is disabled"


async def test_repeated_authentication_failures_cost_the_source_not_the_device(tmp_path, start, http):
    """Finding 1, the budget side: forged requests are charged to the source address that sends them."""
    env = make_env(tmp_path, n_devices=1, rate_limits={"auth_failures_per_sec": 0.5, "burst_auth_failures": 5})
    gw = await start(env)
    statuses = []
    for _ in range(8):
        body = body_of("dev-1", 2)
        statuses.append((await post(http, gw, body, {"Content-Type": "application/x-ndjson", **sign_request("dev-1", "forged", body)}))[0])
    assert statuses[:5] == [401] * 5 and 429 in statuses[5:]
    # The device itself, from another source address, is untouched.
    async with session_from("127.0.0.2") as other:
        assert (await send(other, gw, env, "dev-1", n=2))[0] == 202


async def one_body_byte_each(port: int, env, connections: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Signed requests from 127.0.0.1 that each send one byte of their body and then wait."""
    body = body_of("dev-1", 50)
    headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", env.device().key, body)}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    held = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body[:1])
        await writer.drain()
        held.append((reader, writer))
    return held


def session_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from another loopback address (another source)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def test_one_source_holds_only_its_share_of_the_slots(tmp_path, start, http):
    """Finding 2: 256 slow connections naming a known device held every admission slot."""
    env = make_env(tmp_path, n_devices=1, admission={"max_inflight_per_source": 4})
    gw = await start(env)
    held = await one_body_byte_each(gw.port, env, 6)
    await asyncio.sleep(0.3)
    refused = []
    for reader, _ in held[4:]:
        refused.append(int((await asyncio.wait_for(reader.readline(), 5)).split()[1]))
    assert refused == [503, 503], "a source got more than its share of in-flight requests"
    async with session_from("127.0.0.2") as other:
        assert (await send(other, gw, env, "dev-1", n=2))[0] == 202, "another source still gets in"
    for _, writer in held:
        writer.close()


async def test_a_body_dripping_below_the_minimum_rate_is_cut_off(tmp_path, start, http):
    """Finding 2, the slow side: a byte every few seconds kept a slot for as long as the client liked."""
    env = make_env(tmp_path, n_devices=1, connections={"min_body_bytes_per_sec": 100.0, "body_rate_grace_secs": 1.0})
    gw = await start(env)
    body = body_of("dev-1", 20)
    headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", env.device().key, body)}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
    status = None
    for at in range(len(body)):  # ten bytes a second: under the minimum once the grace is over
        writer.write(body[at : at + 1])
        try:
            await writer.drain()
        except ConnectionError:
            break
        try:
            line = await asyncio.wait_for(reader.readline(), 0.1)
        except TimeoutError:
            continue
        if line:
            status = int(line.split()[1])
            break
    writer.close()
    assert status == 408


async def test_a_captured_request_lands_nothing_after_a_restart(tmp_path, start, http):
    """Finding 5: the replay cache lived in one process's memory; a restart forgot it. Resent after
    the restart, the request gets its first answer again and lands nothing; its signature is still
    remembered, so were the ledger to forget the request, it would be refused (test_hmac_auth)."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    body = ndjson(record("dev-1", seq=77))
    headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", env.device().key, body)}
    async with http.post(gw.url + URL, data=body, headers=headers) as resp:
        assert resp.status == 202
        first = await resp.read()
    await gw.stop()
    gw = await start(env)
    async with http.post(gw.url + URL, data=body, headers=headers) as resp:
        assert (resp.status, resp.headers.get("Idempotent-Replayed"), await resp.read()) == (202, "true", first)
    signature = headers["X-Signature"].partition("=")[2], int(headers["X-Timestamp"])
    assert not gw.gateway.security.replay.claim(*signature), "the signature was forgotten at the restart"
    await gw.stop()
    assert [line["seq"] for line in read_zone(env.lake, "raw")] == [77]


async def test_stored_answers_are_compact(tmp_path, start, http):
    """Finding 12: idempotency answers were stored whole (~19 KiB each with 100 errors)."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    bad = b"".join(orjson.dumps({"device_id": "dev-1", "ts": "not a time", "metrics": {"t": 1}, "pad": "x" * 100}) + b"\n" for _ in range(100))
    body = bad + ndjson(record("dev-1", seq=5))
    headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": "k-1", **sign_request("dev-1", env.device().key, body)}
    async with http.post(gw.url + URL, data=body, headers=headers) as resp:
        assert resp.status == 202
        answer = await resp.read()
    assert len(answer) > 5000 and len((await resp.json())["errors"]) == 100
    ledger = gw.gateway.ledger
    stored = _stored_request_bytes(ledger)
    assert stored < len(answer) / 4, f"{stored} bytes stored for a {len(answer)}-byte answer"
    headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": "k-1", **sign_request("dev-1", env.device().key, body)}
    async with http.post(gw.url + URL, data=body, headers=headers) as resp:
        assert resp.headers.get("Idempotent-Replayed") == "true" and await resp.read() == answer


def _stored_request_bytes(ledger) -> int:
    with ledger._env.begin() as txn:
        return max(len(v) for kind_slot, db in ledger._dbs.items() if kind_slot.startswith(b"request") for _, v in txn.cursor(db=db))


async def test_malformed_requests_log_one_short_line_each_at_most_a_few_a_second(tmp_path, start, caplog):
    """Finding 14: aiohttp logged each malformed request at ERROR with a traceback, unthrottled."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    for _ in range(40):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(100), 5)).startswith(b"HTTP/1.0 400")
        writer.close()
    lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert lines and all(r.levelno == logging.WARNING and r.exc_info is None for r in lines)
    assert len(lines) <= 10, f"{len(lines)} log lines for 40 malformed requests"
    assert "Traceback" not in caplog.text


async def test_a_request_the_http_parser_refuses_is_answered_in_json_and_closed(tmp_path, start):
    """aiohttp answered framing its parser refuses in plain text; a device reads every refusal as the
    device API's JSON, and the connection, whose framing is now unknown, is closed."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    head = b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
    cases = {
        "two lengths": (head + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "Content-Length"),
        "chunked and a length": (head + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "Content-Length"),
        "a signed length": (head + b"Content-Length: +3\r\n\r\nabc", "Content-Length"),
        "a folded header": (head + b" X-Folded: y\r\nContent-Length: 3\r\n\r\nabc", "whitespace"),
    }
    for name, (request, named) in cases.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the gateway must close the connection
        writer.close()
        status_and_headers, _, body = answer.partition(b"\r\n\r\n")
        assert status_and_headers.split(b"\r\n")[0].endswith(b" 400 Bad Request"), (name, answer[:300])
        assert b"Content-Type: application/json" in status_and_headers, (name, status_and_headers)
        refusal = orjson.loads(body)
        assert refusal["error"] == "malformed", (name, refusal)
        assert refusal["message"].startswith("the HTTP request is malformed: ") and named in refusal["message"], (name, refusal)
    await asyncio.sleep(0.5)
    assert read_zone(env.lake, "raw") == [] and read_zone(env.lake, "quarantine") == []


async def test_a_target_or_headers_too_large_and_other_http_versions_get_their_own_status(tmp_path, start):
    """They were all 400 (and HTTP/2.0 was answered "HTTP/2.0 202"): a long URL is 414, a long header
    line or too many headers 431, a request line naming HTTP other than 1.0 or 1.1 is 505, answered in
    HTTP/1.1; each in the API's JSON on a closed connection, and nothing lands. (aiohttp writes the
    answers to requests its parser refused in HTTP/1.0.)"""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    body = ndjson(record(seq=1))
    signed = b"".join(f"{name}: {value}\r\n".encode() for name, value in sign_request("dev-1", env.device("dev-1").key, body).items())
    rest = b"Host: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: %d\r\n" % len(body) + signed

    def request(line: bytes, headers: bytes = b"") -> bytes:
        return line + b"\r\n" + rest + headers + b"\r\n" + body

    cases = {
        "a 10 KB target": (request(b"POST /v1/telemetry?" + b"a" * 10_000 + b" HTTP/1.1"), b" 414 ", "uri_too_long"),
        "a 10 KB header": (request(b"POST /v1/telemetry HTTP/1.1", b"X-Big: " + b"b" * 10_000 + b"\r\n"), b" 431 ", "headers_too_large"),
        "a 10 KB header name": (request(b"POST /v1/telemetry HTTP/1.1", b"X-" + b"n" * 10_000 + b": v\r\n"), b" 431 ", "headers_too_large"),
        "200 headers": (request(b"POST /v1/telemetry HTTP/1.1", b"".join(b"X-H%d: v\r\n" % i for i in range(200))), b" 431 ", "headers_too_large"),
        "HTTP/2.0": (request(b"POST /v1/telemetry HTTP/2.0"), b"HTTP/1.1 505 ", "http_version_not_supported"),
        "HTTP/0.9": (request(b"POST /v1/telemetry HTTP/0.9"), b"HTTP/1.1 505 ", "http_version_not_supported"),
    }
    for name, (raw, status_line, code) in cases.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the gateway must close the connection
        writer.close()
        status_and_headers, _, answer_body = answer.partition(b"\r\n\r\n")
        assert status_line in status_and_headers.split(b"\r\n")[0], (name, answer[:300])
        assert b"Content-Type: application/json" in status_and_headers, (name, status_and_headers)
        assert orjson.loads(answer_body)["error"] == code, (name, answer_body)
    await asyncio.sleep(0.5)
    assert read_zone(env.lake, "raw") == [] and read_zone(env.lake, "quarantine") == []


async def test_a_chunked_body_whose_framing_breaks_midway_is_refused_at_once_in_json(tmp_path, start, caplog):
    """A chunk size the parser refuses after the headers were handled (a later packet): aiohttp queued
    its refusal as a next request, and the body being read waited for bytes that never came, until
    the minimum body rate cut it off with a 408 ("arrived too slowly"). It is a 400 now, at once,
    the only answer on its connection, and no error of the gateway's (it was logged as unhandled)."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    body = ndjson(record(seq=1), record(seq=2))
    signed = sign_request("dev-1", env.device("dev-1").key, body)
    head = b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
    head += b"".join(f"{name}: {value}\r\n".encode() for name, value in signed.items()) + b"\r\n"
    for bad_chunk in (b"-5\r\n", b"5  \r\n", b"5\nabcde\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head + b"%x\r\n%b\r\n" % (len(body) - 5, body[:-5]))
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is reading the body when the bad chunk comes
        writer.write(bad_chunk + body[-5:] + b"\r\n0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status_and_headers, _, answer_body = answer.partition(b"\r\n\r\n")
        assert status_and_headers.split(b"\r\n")[0].endswith(b" 400 Bad Request"), (bad_chunk, answer[:300])
        refusal = orjson.loads(answer_body)
        assert refusal["error"] == "malformed" and "chunk size" in refusal["message"], (bad_chunk, refusal)
        assert answer.count(b"HTTP/1.1 ") == 1, (bad_chunk, answer)
    await asyncio.sleep(0.5)
    assert read_zone(env.lake, "raw") == [] and read_zone(env.lake, "quarantine") == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_transfer_coding_besides_chunked_is_refused_501_and_lands_nothing(tmp_path, start):
    """The HTTP parser frames "gzip, chunked" as plain chunked and handed the gzip bytes over as the
    records (each one invalid, so 422 and quarantined garbage); RFC 9112 answers 501."""
    import gzip

    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    body = gzip.compress(ndjson(record(seq=1), record(seq=2)))
    signed = sign_request("dev-1", env.device("dev-1").key, body)
    for coding in (b"gzip, chunked", b"x-custom,chunked", b"deflate ,\tChunked"):
        head = b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n"
        head += b"Transfer-Encoding: " + coding + b"\r\n"
        head += b"".join(f"{name}: {value}\r\n".encode() for name, value in signed.items()) + b"\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status_and_headers, _, answer_body = answer.partition(b"\r\n\r\n")
        assert status_and_headers.split(b"\r\n")[0].endswith(b" 501 Not Implemented"), (coding, answer[:300])
        refusal = orjson.loads(answer_body)
        assert refusal["error"] == "not_implemented" and "Content-Encoding" in refusal["message"], (coding, refusal)
    # A Transfer-Encoding naming no coding at all frames nothing: malformed, not a coding to decline.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: \r\n"
    writer.write(head + b"".join(f"{name}: {value}\r\n".encode() for name, value in signed.items()) + b"Connection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request") and b'"malformed"' in answer, answer[:300]
    assert b"names no coding" in answer, answer[:300]
    await asyncio.sleep(0.5)
    assert read_zone(env.lake, "raw") == [] and read_zone(env.lake, "quarantine") == []


async def test_expect_100_continue_is_answered_after_admission_so_a_refused_body_is_never_sent(tmp_path, start):
    """aiohttp answered "100 Continue" to every request before the gateway looked at it: a device with
    a malformed signature (or facing a full WAL, or declaring a body too large) sent its whole body
    only to be refused. The
    refusal comes first now; an admitted request still gets its 100 at once; another expectation
    is refused in the API's JSON (it was plain text)."""
    env = make_env(tmp_path, n_devices=1)
    gw = await start(env)
    body = ndjson(record(seq=1), record(seq=2))

    def head(device_id: str, key: str, expect: bytes = b"100-continue") -> bytes:
        signed = sign_request(device_id, key, body)
        lines = b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nExpect: " + expect + b"\r\n"
        lines += b"Content-Length: %d\r\n" % len(body)
        return lines + b"".join(f"{name}: {value}\r\n".encode() for name, value in signed.items()) + b"\r\n"

    async def answer_to_headers(request_head: bytes) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(request_head)
        status_and_headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return status_and_headers, reader, writer

    first, reader, writer = await answer_to_headers(head("dev-1", env.device("dev-1").key))
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 202 "), final
    writer.close()

    unsigned = head("dev-1", env.device("dev-1").key).replace(b"X-Signature: v1=", b"X-Signature: v0=")
    refused, reader, writer = await answer_to_headers(unsigned)
    assert refused.startswith(b"HTTP/1.1 401 "), refused  # before any byte of the body
    writer.close()

    odd, reader, writer = await answer_to_headers(head("dev-1", env.device("dev-1").key, b"200-ok"))
    assert odd.startswith(b"HTTP/1.1 417 ") and b"application/json" in odd, odd
    length = int(odd.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert orjson.loads(await asyncio.wait_for(reader.readexactly(length), 5))["error"] == "expectation_failed"
    writer.close()
    assert len(await wait_for_records(env.lake, "raw", 2)) == 2


def test_the_registry_refuses_weak_keys_loose_permissions_and_links(tmp_path):
    """Finding 10: the registry write followed planted links, permissions were never checked, 1-char keys passed."""
    import json
    import os

    import pytest

    from gateway.auth.registry import DeviceRegistry, RegistryError, add_device

    registry = tmp_path / "devices.json"
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    for planted in (".devices.json.tmp", f".devices.json.{os.getpid()}.tmp"):
        (tmp_path / planted).symlink_to(victim)
    add_device(registry, "dev-1", {})
    assert victim.read_text() == "untouched" and registry.stat().st_mode & 0o777 == 0o600
    assert len(DeviceRegistry.load(registry)) == 1
    registry.chmod(0o644)
    with pytest.raises(RegistryError, match="chmod 600"):
        DeviceRegistry.load(registry)
    registry.chmod(0o600)
    link = tmp_path / "linked.json"
    link.symlink_to(registry)
    with pytest.raises(RegistryError, match="symbolic link"):
        DeviceRegistry.load(link)
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps({"devices": {"dev-1": {"keys": ["k"]}}}))
    weak.chmod(0o600)
    with pytest.raises(RegistryError, match="length >= 32"):
        DeviceRegistry.load(weak)
