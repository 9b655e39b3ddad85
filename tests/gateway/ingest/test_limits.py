"""Every configured limit answers a clear 413, early, and lands nothing of the refused request."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import orjson
import psutil
import pytest
import zstandard

from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, record, signed

LIMITS = {
    "max_body_bytes": 64 * 1024,
    "max_decompressed_bytes": 256 * 1024,
    "max_document_bytes": 32 * 1024,
    "max_record_bytes": 2048,
    "max_records_per_request": 50,
}


@pytest.fixture
async def small(tmp_path):
    env = make_env(tmp_path, limits=LIMITS)
    running = await start_gateway(load_settings(env.config, environ={}))
    yield env, running
    await running.stop()


async def _post(url, body, headers):
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/telemetry", data=body, headers=headers) as resp:
            return resp.status, await resp.json()


def lines(n: int) -> bytes:
    return b"".join(orjson.dumps(record(seq=i)) + b"\n" for i in range(n))


async def test_compressed_body_over_the_limit(small):
    env, gw = small
    body = os.urandom(70 * 1024)
    status, answer = await _post(gw.url, body, signed(env.device(), body, encoding="zstd"))
    assert status == 413 and "65536" in answer["message"]


async def test_chunked_body_over_the_limit_without_content_length(small):
    env, gw = small
    body = lines(10) * 200  # ~140 KiB, sent chunked so only counting can catch it

    async def chunks():
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    status, answer = await _post(gw.url, chunks(), signed(env.device(), body))
    assert status == 413 and answer["error"] == "too_large"


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
async def test_decompression_bomb_is_refused_early(small, encoding):
    env, gw = small
    import gzip

    plain = b"\n" * (64 * 1024 * 1024)  # 64 MiB of nothing, a few KiB compressed
    body = zstandard.ZstdCompressor(level=19).compress(plain) if encoding == "zstd" else gzip.compress(plain, 9)
    assert len(body) < LIMITS["max_body_bytes"]
    status, answer = await _post(gw.url, body, signed(env.device(), body, encoding=encoding))
    assert status == 413 and "decompresses" in answer["message"]


async def test_record_over_the_limit(small):
    env, gw = small
    rec = record(seq=1) | {"tags": {"blob": "x" * 4000}}
    body = orjson.dumps(rec) + b"\n"
    status, answer = await _post(gw.url, body, signed(env.device(), body))
    assert status == 413 and "2048" in answer["message"]


async def test_endless_line_is_refused_before_it_ends(small):
    env, gw = small
    body = b'{"device_id": "dev-1", "pad": "' + b"y" * 20000
    status, answer = await _post(gw.url, body, signed(env.device(), body))
    assert status == 413 and "record" in answer["message"]


async def test_too_many_records(small):
    env, gw = small
    body = lines(51)
    status, answer = await _post(gw.url, body, signed(env.device(), body))
    assert status == 413 and "50 records" in answer["message"]


async def test_json_document_over_its_buffer_limit_points_to_ndjson(small):
    env, gw = small
    body = orjson.dumps([record(seq=i) for i in range(40)] * 1)
    body = body[:-1] + b"," + b" " * (33 * 1024) + b"]"
    status, answer = await _post(gw.url, body, signed(env.device(), body, "application/json"))
    assert status == 413 and "ndjson" in answer["message"]


async def test_refused_requests_land_nothing(small):
    env, gw = small
    body = lines(51)
    await _post(gw.url, body, signed(env.device(), body))
    await gw.stop()
    assert not any(env.lake.rglob("*.ndjson.zst"))


@pytest.mark.slow
async def test_fifty_mib_streamed_body_under_a_memory_bound(tmp_path, gateway_process):
    """A 50 MiB NDJSON body is decoded as it streams: the gateway's memory grows by far less."""
    env = make_env(
        tmp_path,
        limits={"max_body_bytes": 128 * 1024 * 1024, "max_decompressed_bytes": 128 * 1024 * 1024, "max_records_per_request": 1_000_000},
        lake={"target_object_bytes": 8 * 1024 * 1024},
        wal={"segment_bytes": 16 * 1024 * 1024},
    )
    gp = gateway_process(env)
    gp.start()
    proc = psutil.Process(gp.proc.pid)
    baseline = proc.memory_info().rss
    one = orjson.dumps(record(seq=0, temperature_c=1.0, humidity_pct=2.0, pressure_hpa=3.0)) + b"\n"
    n = (50 * 1024 * 1024) // len(one) + 1
    body_len = n * len(one)
    dev = env.device()
    # Sign without holding the body: hash it as a stream, the way the gateway does.
    import hashlib

    from gateway.auth.signing import SCHEME, signature

    digest = hashlib.sha256()
    for i in range(n):
        digest.update(orjson.dumps(record(seq=i, ts=1_700_000_000_000, temperature_c=1.0, humidity_pct=2.0, pressure_hpa=3.0)) + b"\n")
    ts = str(int(time.time()))
    headers = {
        "Content-Type": "application/x-ndjson",
        "X-Device-Id": dev.device_id,
        "X-Timestamp": ts,
        "X-Signature": f"{SCHEME}=" + signature(dev.key.encode(), ts, "POST", "/v1/telemetry", digest.hexdigest()),
    }
    peak = baseline
    stop = asyncio.Event()

    async def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.02)

    async def body():
        chunk = []
        for i in range(n):
            chunk.append(orjson.dumps(record(seq=i, ts=1_700_000_000_000, temperature_c=1.0, humidity_pct=2.0, pressure_hpa=3.0)) + b"\n")
            if len(chunk) == 2000:
                yield b"".join(chunk)
                chunk = []
        if chunk:
            yield b"".join(chunk)

    sampler = asyncio.create_task(sample())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as http:
        async with http.post(gp.url + "/v1/telemetry", data=body(), headers=headers) as resp:
            answer = await resp.json()
    stop.set()
    await sampler
    assert resp.status == 202, answer
    assert answer["accepted"] == n
    growth = peak - baseline
    print(f"RSS growth {growth / 2**20:.1f} MiB for a {body_len / 2**20:.1f} MiB body")
    assert body_len > 50 * 1024 * 1024
    # Spooling keeps a few MiB in memory; holding the body would cost > 50 MiB (plus its records).
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB for a {body_len / 2**20:.0f} MiB body"
    gp.signal(signal.SIGTERM)
    assert gp.wait(120) == 0


def _spool_files(directory: str) -> int:
    """Spool files this process holds open: unlinked temporary files in ``directory``."""
    fds = f"/proc/{os.getpid()}/fd"
    targets = []
    for fd in os.listdir(fds):
        try:
            targets.append(os.readlink(f"{fds}/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return sum(os.path.dirname(target) == directory for target in targets)


async def test_a_request_waiting_for_the_wal_lets_go_of_its_body_then_of_its_frames(tmp_path, monkeypatch):
    """Once a request is claimed to run, its frames are final: the body as sent, kept until then to
    validate it anew, is let go before the wait for the WAL, and its frames once the WAL's writer has
    written them, before their fsync. With spools of 4 KiB both spill to files, so what is held shows."""
    env = make_env(tmp_path, limits={"spool_memory_bytes": 4096})
    running = await start_gateway(load_settings(env.config, environ={}))
    try:
        spool_dir = os.path.realpath(running.gateway.pipeline.spool_dir)
        at_persist, at_fsync = [], []
        persist = running.gateway.pipeline.persist

        async def counting_persist(*args, **kwargs):
            at_persist.append(_spool_files(spool_dir))
            return await persist(*args, **kwargs)

        fdatasync = os.fdatasync

        def counting_fdatasync(fd):
            if f"{os.sep}segments{os.sep}" in os.readlink(f"/proc/self/fd/{fd}"):
                at_fsync.append(_spool_files(spool_dir))
            return fdatasync(fd)

        running.gateway.pipeline.persist = counting_persist
        monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
        body = b"".join(orjson.dumps(record(seq=i, temperature_c=float(i))) + b"\n" for i in range(200))
        status, answer = await _post(running.url, body, signed(env.device(), body))
        assert status == 202 and answer["accepted"] == 200
        assert at_persist == [1], f"spool files open when the request went to the WAL: {at_persist} (its frames only)"
        assert at_fsync == [0], f"spool files open while its fsync ran: {at_fsync}"
    finally:
        await running.stop()
