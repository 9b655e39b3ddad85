"""Not ready is not broken: an endpoint whose model is still loading is checked again every second or
two, never trips its breaker, and every change of its state is one log line. The same against a real
Triton server whose model loads late is in tests/triton/test_triton_readiness.py."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from connectors.inference.breaker import BreakerSettings, BreakerState
from connectors.inference.endpoint_health import Health
from connectors.errors import NoEndpointError, TransientError
from connectors.inference.pool import InferencePool
from tests.connectors.inference.test_inference_pool import FakeEndpoint

X = np.zeros((4, 8), dtype=np.float32)
BREAKER = BreakerSettings(consecutive_failures=1, open_secs=30.0, jitter=0.0, half_open_successes=1)


def _health(pool: InferencePool, name: str) -> Health:
    return {s.name: s.health for s in pool.status()}[name]


async def test_not_ready_is_checked_again_with_a_short_backoff_and_never_trips_the_breaker(clock):
    a = FakeEndpoint("a", ready=False)
    pool = InferencePool([a], breaker_settings=BREAKER, probe_secs=1.0, max_probe_secs=2.0, clock=clock)
    checks_at = []
    for _ in range(40):  # 4 s in steps of 0.1 s
        before = a.ready_checks
        with pytest.raises(NoEndpointError) as caught:
            await pool.infer(X)
        if a.ready_checks > before:
            checks_at.append(round(clock.now - 1000.0, 1))
        assert caught.value.calls_failed == 0  # nothing was sent: this is "unavailable", not "failed"
        clock.advance(0.1)
    assert checks_at == [0.0, 1.0, 2.5, 4.5][: len(checks_at)] and len(checks_at) == 3  # 1 s, then x1.5, capped at 2 s
    assert pool.breaker("a").state is BreakerState.CLOSED
    assert a.calls == 0 and a.warm_ups == 0
    a.is_ready = True
    clock.advance(2.0)
    assert (await pool.infer(X)).endpoint == "a"
    assert _health(pool, "a") is Health.READY


async def test_every_state_change_is_one_log_line(clock, caplog):
    a = FakeEndpoint("a", ready=False, script=[TransientError("connection reset", endpoint="a")])
    pool = InferencePool([a], breaker_settings=BREAKER, clock=clock)
    caplog.set_level(logging.INFO, logger="connectors.inference.pool")
    with pytest.raises(NoEndpointError):
        await pool.infer(X)
    a.is_ready = True
    clock.advance(1.0)
    with pytest.raises(TransientError):
        await pool.infer(X)  # ready, then the live call fails: failing, and the breaker opens
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "inference endpoint a: starting -> not ready (readiness check answered not ready)",
        "inference endpoint a: not ready -> ready",
        "inference endpoint a: ready -> failing (connection reset)",
        "inference endpoint a: breaker closed -> open, next probe in 30.0 s",
    ]


async def test_monitor_finds_an_endpoint_that_becomes_ready_and_tells_listeners():
    a = FakeEndpoint("a", ready=False)
    pool = InferencePool([a], probe_secs=0.01, max_probe_secs=0.02)
    seen: list[bool] = []
    changed = asyncio.Event()

    def listener(available: bool) -> None:
        seen.append(available)
        changed.set()

    pool.on_availability(listener)
    await pool.start()
    try:
        while a.ready_checks < 3:  # the monitor checks on its own, without any call
            await asyncio.sleep(0.01)
        assert seen == [False] and a.calls == 0
        changed.clear()
        a.is_ready = True
        await asyncio.wait_for(changed.wait(), timeout=30)
        assert seen == [False, True]
        assert _health(pool, "a") is Health.READY and a.warm_ups == 1
    finally:
        await pool.close()
