"""Large and compressed bodies are decoded in the worker's one decode thread, never on the loop."""

from __future__ import annotations

import asyncio
import threading

from gateway.ingest import handler
from tests.gateway.conftest import ndjson, record, signed


async def test_large_bodies_are_decoded_one_at_a_time_off_the_event_loop(env, gateway, http, monkeypatch) -> None:
    seen: list[str] = []
    running = [0, 0]  # now, most at once
    real_decode = handler._decode

    def decode(*args):
        running[0] += 1
        running[1] = max(running[1], running[0])
        seen.append(threading.current_thread().name)
        try:
            return real_decode(*args)
        finally:
            running[0] -= 1

    monkeypatch.setattr(handler, "_decode", decode)
    device = env.device()

    async def post(first_seq: int) -> int:
        body = ndjson(*(record(seq=first_seq + i) for i in range(400)))  # well over the 16 KiB decoded on the loop
        async with http.post(gateway.url + "/v1/telemetry", data=body, headers=signed(device, body)) as resp:
            return resp.status

    assert await asyncio.gather(*(post(1000 * i) for i in range(6))) == [202] * 6
    assert len(seen) == 6 and all(name.startswith("decode") for name in seen), seen
    assert running[1] == 1
