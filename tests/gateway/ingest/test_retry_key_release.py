"""A request's retry key stays claimed until the WAL has decided, even when its handler is gone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time

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


async def test_identical_requests_waiting_on_one_the_wal_refused_run_it_once(tmp_path):
    """Two retries of a request arrive while it waits in the WAL, and wait for its answer; the WAL
    refuses it (a full disk). Woken together, they must not both run it: one runs, the other gets
    its answer. (Both claimed the key for this process, both ran, and the records landed twice.)"""
    from gateway.auth.signing import sign_request
    from gateway.durable.wal import WalNoSpace

    env = make_env(tmp_path)
    running = await start_gateway(load_settings(env.config, environ={}))
    gw = running.gateway
    wal = gw.pipeline.wal
    disk_may_go = threading.Event()
    refused: list = []
    write_and_sync = wal._write_and_sync

    def first_batch_refused(batch):
        if refused:
            return write_and_sync(batch)
        disk_may_go.wait(30)
        refused.extend(batch)
        for queued in batch:
            queued.error = WalNoSpace("the disk holding the write-ahead log is full (test)")

    wal._write_and_sync = first_batch_refused
    device = env.device("dev-1")
    body = ndjson(*(record("dev-1", seq=i, temperature_c=float(i)) for i in range(5)))
    key = body_key("dev-1", hashlib.sha256(body).hexdigest())

    async def send(attempt: int) -> tuple[int, str | None]:
        headers = {"Content-Type": "application/x-ndjson", **sign_request("dev-1", device.key, body, now=time.time() - attempt)}
        async with aiohttp.ClientSession() as http:
            async with http.post(running.url + URL, data=body, headers=headers) as resp:
                return resp.status, resp.headers.get("Idempotent-Replayed")

    try:
        first = asyncio.create_task(send(0))
        while not wal._writing:  # the first request is in the WAL's writer, held there
            await asyncio.sleep(0.01)
        retries = [asyncio.create_task(send(attempt)) for attempt in (1, 2)]
        while len(gw.running_requests[key][1]._callbacks or ()) < 2:  # both retries wait for its answer
            await asyncio.sleep(0.01)
        disk_may_go.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *retries), 10)
    finally:
        disk_may_go.set()
        await running.stop()
    assert answers[0][0] == 503
    assert set(answers[1:]) == {(202, None), (202, "true")}, answers  # one ran it, the other got its answer
    assert sorted(line["seq"] for line in read_zone(env.lake, "raw")) == list(range(5))
