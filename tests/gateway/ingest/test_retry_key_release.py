"""A request's retry key stays claimed until the WAL has decided, even when its handler is gone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading

import aiohttp
import pytest

from gateway.durable.retry_ledger import body_key
from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import URL, make_env, ndjson, read_zone, record, signed


async def claim_in_another_process(ledger_dir, key: bytes, digest: str) -> str:
    """What another worker of the instance hears when it claims ``key`` now."""
    code = (
        "import sys\n"
        "from gateway.durable.retry_ledger import RetryLedger\n"
        f"ledger = RetryLedger({str(ledger_dir)!r}, window_secs=600, max_keys=1000)\n"
        "ledger.open()\n"
        f"print(ledger.claim_request({key!r}, {digest!r}).outcome)\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


@pytest.mark.parametrize("held", ["before_its_frames_are_read", "at_the_fsync"])
async def test_a_handler_cancelled_by_a_drain_past_its_deadline_keeps_its_key_until_the_wal_decides(tmp_path, monkeypatch, held):
    # Records without seq: their retry is recognised by the body's key alone.
    env = make_env(tmp_path, drain={"deadline_secs": 0.3})
    running = await start_gateway(load_settings(env.config, environ={}))
    gw = running.gateway
    wal = gw.pipeline.wal
    disk_may_go = threading.Event()
    if held == "at_the_fsync":  # a disk whose fsync outlasts the drain's deadline
        fdatasync = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (fd != wal._fd or disk_may_go.wait(30)) and fdatasync(fd))
    else:  # a writer busy with earlier requests until then
        write_and_sync = wal._write_and_sync
        wal._write_and_sync = lambda batch: disk_may_go.wait(30) and write_and_sync(batch)
    device = env.device("dev-1")
    body = ndjson(*(record("dev-1", temperature_c=float(i)) for i in range(5)))
    digest = hashlib.sha256(body).hexdigest()

    async def send() -> int | str:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.post(running.url + URL, data=body, headers=signed(device, body)) as resp:
                    return resp.status
            except aiohttp.ClientError as exc:
                return type(exc).__name__

    sending = asyncio.create_task(send())
    try:
        while not wal._writing:  # the request is in the WAL's writer, held there
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(running.stop())
        answer = await asyncio.wait_for(sending, 10)
        assert answer == "ServerDisconnectedError", "the drain's deadline passed: the handler was cancelled unanswered"
        # The WAL's writer still holds the request: a retry reaching another worker now must wait for
        # it, not run it again.
        assert await claim_in_another_process(gw.ledger.directory, body_key("dev-1", digest), digest) == "running"
    finally:
        disk_may_go.set()
    await asyncio.wait_for(stopping, 30)

    # Held at the fsync, the request was written whole and is durable: its retry after a restart
    # gets the first answer. Held before its frames were read, the cancelled handler had closed its
    # spool: the WAL refused it, and the retry runs it. Either way its records land once.
    again = await start_gateway(load_settings(env.config, environ={}))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(again.url + URL, data=body, headers=signed(device, body)) as resp:
                assert resp.status == 202
                assert (await resp.json())["accepted"] == 5
                assert resp.headers.get("Idempotent-Replayed") == ("true" if held == "at_the_fsync" else None)
    finally:
        await again.stop()
    assert len(read_zone(env.lake, "raw")) == 5
