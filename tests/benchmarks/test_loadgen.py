"""The load generator: schedules fixed in advance, unique signed bodies, latency from intended send time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from benchmarks.loadgen import open_loop, prepare, schedule
from gateway.auth.registry import add_device
from gateway.auth.signing import SCHEME, signature
from gateway.simulator import SimulatedDevice


@contextlib.asynccontextmanager
async def telemetry_server(handler) -> AsyncIterator[str]:
    """A loopback HTTP server answering POST /v1/telemetry with ``handler``; yields its base URL."""
    app = web.Application()
    app.router.add_post("/v1/telemetry", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def test_poisson_schedule_is_seeded_and_has_the_asked_mean_rate() -> None:
    a = schedule(1000.0, 10.0, arrivals="poisson", seed=7)
    assert a == schedule(1000.0, 10.0, arrivals="poisson", seed=7)
    assert a != schedule(1000.0, 10.0, arrivals="poisson", seed=8)
    assert all(x < y for x, y in zip(a, a[1:])) and 0 <= a[0] and a[-1] < 10.0
    assert 9_500 < len(a) < 10_500
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.001, rel=0.05)


def test_fixed_schedule_is_evenly_spaced() -> None:
    assert schedule(4.0, 1.0, arrivals="fixed") == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError):
        schedule(0.0, 1.0)
    with pytest.raises(ValueError):
        schedule(1.0, 1.0, arrivals="bursty")


def test_every_request_is_a_new_validly_signed_body(tmp_path: Path) -> None:
    # The gateway refuses a signature it has seen (replay guard): bodies must never repeat.
    registry = tmp_path / "devices.json"
    keys = {f"dev-{i}": add_device(registry, f"dev-{i}", {}) for i in range(2)}
    devices = [SimulatedDevice(d, k) for d, k in keys.items()]
    prepared = prepare(devices, records_per_request=5, distinct=3)
    seen = set()
    for _ in range(20):
        body, headers = prepared.next()
        assert body.count(b"\n") == 5
        digest = hashlib.sha256(body).hexdigest()
        expected = signature(keys[headers["X-Device-Id"]].encode(), headers["X-Timestamp"], "POST", "/v1/telemetry", digest)
        assert headers["X-Signature"] == f"{SCHEME}={expected}"
        seen.add(headers["X-Signature"])
    assert len(seen) == 20


async def test_open_loop_counts_latency_from_the_intended_send_time() -> None:
    # A server that answers nothing for its first 300 ms: an honest open-loop generator keeps sending
    # on schedule and charges the stall to every request that waited, including the first one.
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response({"accepted": 1}, status=202)

    asyncio.get_running_loop().call_later(0.3, release.set)
    async with telemetry_server(handler) as url:
        prepared = prepare([SimulatedDevice("dev-1", None)], records_per_request=2, distinct=2)
        run = await open_loop(url, prepared, requests_per_sec=50.0, duration_secs=0.5, arrivals="fixed", keep_timeline=True)
    assert run.sent == 25 and run.statuses == {202: 25}
    assert run.timeline is not None
    for offset, latency, _status in run.timeline:
        if offset < 0.25:  # sent while the server was stalled: waited at least until the release
            assert latency >= 0.3 - offset - 0.02
    assert run.percentile_ms(1.0) >= 280


async def test_a_fleet_that_honours_retry_after_lets_a_refused_devices_turns_pass() -> None:
    # One device is refused with Retry-After: 10; the other is accepted. Devices that follow the API
    # send nothing more for the refused one during the run; its turns are counted as deferred.
    seen: list[tuple[str, str | None]] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        device = request.headers["X-Device-Id"]
        seen.append((device, request.headers.get("X-Forwarded-For")))
        if device == "dev-refused":
            return web.json_response({"error": "unavailable"}, status=503, headers={"Retry-After": "10"})
        return web.json_response({"accepted": 1}, status=202)

    devices = [SimulatedDevice("dev-refused", "k1"), SimulatedDevice("dev-ok", "k2")]
    async with telemetry_server(handler) as url:
        prepared = prepare(devices, records_per_request=2, distinct=2, behind_proxy=True)
        run = await open_loop(url, prepared, requests_per_sec=100.0, duration_secs=0.6, arrivals="fixed", honor_retry_after=True)
    refused_sends = [d for d, _ in seen if d == "dev-refused"]
    # Its first request, and at most those sent before that first answer came back.
    assert 1 <= len(refused_sends) <= 5, len(refused_sends)
    assert run.deferred == 30 - len(refused_sends)
    assert run.statuses.get(202) == 30
    # Each device speaks from an address of its own, as a load balancer in front would pass it.
    assert {d: f for d, f in seen} == {"dev-refused": "10.0.0.1", "dev-ok": "10.0.0.2"}
