"""Large and compressed bodies are decoded in the worker's one decode thread, never on the loop;
small uncompressed ones on the loop, where a hop to the thread and back would cost more."""

from __future__ import annotations

import asyncio
import threading

from gateway.ingest import handler
from tests.gateway.conftest import ndjson, record, signed


def _watch_decoding(monkeypatch) -> tuple[list[str], list[int]]:
    """The thread each body is decoded in, and the most decoded at once."""
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
    return seen, running


def _body_of_size(first_seq: int, at_least: int) -> bytes:
    records = 1
    while len(ndjson(*(record(seq=first_seq + i) for i in range(records)))) < at_least:
        records *= 2
    return ndjson(*(record(seq=first_seq + i) for i in range(records)))


async def test_large_bodies_are_decoded_one_at_a_time_off_the_event_loop(env, gateway, http, monkeypatch) -> None:
    seen, running = _watch_decoding(monkeypatch)
    device = env.device()

    async def post(first_seq: int) -> int:
        body = _body_of_size(first_seq, handler.INLINE_DECODE_BYTES + 1)
        async with http.post(gateway.url + "/v1/telemetry", data=body, headers=signed(device, body)) as resp:
            return resp.status

    assert await asyncio.gather(*(post(100_000 * i) for i in range(6))) == [202] * 6
    assert len(seen) == 6 and all(name.startswith("decode") for name in seen), seen
    assert running[1] == 1


async def test_small_uncompressed_bodies_are_decoded_on_the_event_loop(env, gateway, http, monkeypatch) -> None:
    seen, _ = _watch_decoding(monkeypatch)
    device = env.device()
    body = ndjson(*(record(seq=i) for i in range(300)))  # a typical batch, well under the limit
    assert len(body) <= handler.INLINE_DECODE_BYTES
    async with http.post(gateway.url + "/v1/telemetry", data=body, headers=signed(device, body)) as resp:
        assert resp.status == 202
    assert seen == [threading.main_thread().name]
