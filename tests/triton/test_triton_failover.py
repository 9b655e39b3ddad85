"""InferencePool over real PyTriton servers: a server killed mid-load, a slow one, a failing one."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from connectors.inference.breaker import BreakerSettings, BreakerState
from connectors.inference.endpoint_health import Health
from connectors.inference.pool import InferencePool
from connectors.inference.local_model import LocalModelInferencer
from connectors.inference.models.train_anomaly_model import generate
from connectors.inference.triton import TritonInferencer

pytestmark = pytest.mark.triton

# Long enough open periods that a breaker opened in a test stays open until the test ends.
BREAKER = BreakerSettings(consecutive_failures=3, open_secs=120.0, max_open_secs=120.0, jitter=0.0)


def _batches(count: int, rows: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [generate(rng, rows)[0].astype(np.float32) for _ in range(count)]


def _prefer(*names: str):
    """A prediction that ranks the named endpoints first, so the test decides where load lands."""
    return lambda name, n: 0.0 if name in names else 1.0


async def _assert_scores(batches, outputs) -> None:
    local = LocalModelInferencer()
    for batch, out in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(out.scores, (await local.infer(batch)).scores, atol=1e-6)


async def test_server_killed_mid_load_fails_over_and_loses_nothing(victim, primary):
    endpoints = [
        TritonInferencer(victim.settings("grpc", client_timeout_secs=5.0)),
        TritonInferencer(victim.settings("http", client_timeout_secs=5.0)),
        TritonInferencer(primary.settings("grpc", client_timeout_secs=5.0)),
    ]
    pool = InferencePool(
        endpoints, breaker_settings=BREAKER, predict_completion=_prefer("victim-grpc", "victim-http")
    )
    await pool.start()
    batches = _batches(60, 64, seed=5)
    results: list = [None] * len(batches)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(batches)):
        queue.put_nowait(i)
    done = 0

    async def worker() -> None:
        nonlocal done
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await pool.infer(batches[i])
            done += 1
            if done == 15:
                victim.kill()  # other workers have calls in flight on the victim right now

    try:
        await pool.warm_up()
        await asyncio.gather(*(worker() for _ in range(6)))
        assert victim.killed
        await _assert_scores(batches, results)  # every batch scored, correctly
        served = [r.endpoint for r in results]
        assert served[:10].count("primary-grpc") == 0  # the victim took the load while it lived
        assert served[-20:].count("primary-grpc") == 20  # then everything failed over
        status = {s.name: s for s in pool.status()}
        for name in ("victim-grpc", "victim-http"):
            # Out of rotation: its breaker opened on failed calls, or a readiness check found it down.
            assert status[name].breaker is BreakerState.OPEN or status[name].health is Health.NOT_READY, status[name]
        assert status["primary-grpc"].breaker is BreakerState.CLOSED
        assert status["victim-grpc"].failures + status["victim-http"].failures >= 1
        assert not await endpoints[0].ready()
    finally:
        await pool.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_slow_endpoint_times_out_and_fails_over(slow_server, primary, protocol):
    slow = TritonInferencer(slow_server.settings(protocol, client_timeout_secs=0.1))
    fast = TritonInferencer(primary.settings(protocol, client_timeout_secs=5.0))
    pool = InferencePool([slow, fast], breaker_settings=BREAKER, predict_completion=_prefer(slow.name))
    await pool.start()
    try:
        batches = _batches(3, 16, seed=6)
        outputs = [await pool.infer(b) for b in batches]
        await _assert_scores(batches, outputs)
        assert all(out.endpoint == fast.name for out in outputs)
        assert pool.breaker(slow.name).state is BreakerState.OPEN  # timeouts are endpoint failures
    finally:
        await pool.close()


async def test_default_routing_learns_to_avoid_a_slow_endpoint(slow_server, primary):
    slow = TritonInferencer(slow_server.settings("grpc", client_timeout_secs=5.0))
    fast = TritonInferencer(primary.settings("grpc", client_timeout_secs=5.0))
    pool = InferencePool([slow, fast], breaker_settings=BREAKER)  # default: in-flight x smoothed latency
    await pool.start()
    try:
        await pool.warm_up()
        batches = _batches(12, 8, seed=7)
        outputs = [await pool.infer(b) for b in batches]
        await _assert_scores(batches, outputs)
        served = [out.endpoint for out in outputs]
        assert served[0] == slow.name  # listed first, nothing known yet
        assert served[1:].count(fast.name) == len(served) - 1  # one 300 ms answer is enough to learn
    finally:
        await pool.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_failing_endpoint_opens_its_breaker_and_nothing_is_lost(failing_server, primary, protocol):
    failing = TritonInferencer(failing_server.settings(protocol))
    healthy = TritonInferencer(primary.settings(protocol))
    pool = InferencePool([failing, healthy], breaker_settings=BREAKER, predict_completion=_prefer(failing.name))
    await pool.start()
    try:
        batches = _batches(10, 32, seed=8)
        outputs = [await pool.infer(b) for b in batches]
        await _assert_scores(batches, outputs)
        assert all(out.endpoint == healthy.name for out in outputs)
        status = {s.name: s for s in pool.status()}
        assert status[failing.name].breaker is BreakerState.OPEN
        assert status[failing.name].failures >= 1
    finally:
        await pool.close()
