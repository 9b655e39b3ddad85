"""Finding 5, the replay side: a captured request was accepted once per worker.

With ``listen.workers = 2`` the same signed request sent 10 times was accepted twice, because each
worker kept its own memory of the signatures it had seen. The real ``edge-gateway serve`` runs here
with two workers, and the request is resent until both workers have answered it: it is taken once,
and every resend is refused as a replay (401) or, once the retry ledger holds the request, given
its first answer again (202, ``Idempotent-Replayed: true``).
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.durability.client import ndjson
from tests.durability.harness import ServeProcess, make_devices, write_gateway_config
from tests.gateway.conftest import free_port
from tests.gateway.edge.test_shared_rate_limits import answered_per_worker

WAVE = 4


async def resend(url: str, body: bytes, headers: dict[str, str]) -> str:
    """The captured request once more, on a fresh connection (so the kernel spreads them across
    workers): its status, "replayed" for a first answer given again."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.post(url + "/v1/telemetry", data=body, headers=headers) as resp:
            await resp.read()
            return "replayed" if resp.headers.get("Idempotent-Replayed") == "true" else str(resp.status)


async def test_a_captured_request_is_accepted_once_whichever_worker_gets_it(tmp_path):
    port, ops_port = free_port(), free_port()
    (device,) = make_devices(tmp_path / "devices.json", 1)
    config = write_gateway_config(tmp_path, port, listen={"workers": 2}, ops={"port": ops_port})
    serve = ServeProcess(config, port, tmp_path / "logs")
    try:
        serve.start(workers=2)
        ops_url = f"http://127.0.0.1:{ops_port}"
        body = ndjson(device.records(1))
        headers = device.headers_for(body)
        before = await answered_per_worker(ops_url)
        statuses: list[str] = []
        for _ in range(40):
            statuses += await asyncio.gather(*(resend(serve.url, body, headers) for _ in range(WAVE)))
            after = await answered_per_worker(ops_url)
            taken = [after.get(w, 0.0) - before.get(w, 0.0) for w in ("0", "1")]
            if min(taken) >= 2:
                break
        assert min(taken) >= 2, f"the kernel gave one worker every connection: {taken}"
        assert statuses.count("202") == 1, f"accepted {statuses.count('202')} times: {statuses}"
        assert set(statuses) <= {"202", "401", "replayed"}, statuses
        assert await resend(serve.url, body, headers) == "replayed", "once answered, a resend gets that answer"
    finally:
        serve.kill()
