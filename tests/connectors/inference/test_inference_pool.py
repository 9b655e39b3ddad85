"""InferencePool routing, failover, breakers, retry budget and idle warm-up.

These tests use fake endpoints on purpose: they exercise the pool's decisions (which endpoint, when to
fail over, when to warm up) under exact, scripted failures and an injected clock. The same pool
against real PyTriton servers, with a server killed mid-load, is in tests/triton/.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from connectors.inference.breaker import BreakerSettings, BreakerState
from connectors.inference.endpoint_health import Health
from connectors.errors import NoEndpointError, PermanentError, ThrottledError, TransientError
from connectors.inference.base import Inferencer, InferenceOutput
from connectors.inference.pool import InferencePool
from connectors.inference.retry_budget import RetryBudget

X = np.zeros((4, 8), dtype=np.float32)
BREAKER = BreakerSettings(consecutive_failures=2, open_secs=30.0, jitter=0.0, half_open_successes=1)


class FakeEndpoint:
    """An Inferencer whose answers the test scripts: a list of exceptions/None (None = success)."""

    def __init__(self, name: str, *, script=None, ready: bool = True) -> None:
        self.name = name
        self.script = list(script or [])
        self.is_ready = ready
        self.calls = 0
        self.ready_checks = 0
        self.warm_ups = 0
        self.timeouts: list[float | None] = []
        self.gate: asyncio.Event | None = None  # when set, infer waits for it (to hold calls in flight)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ready(self) -> bool:
        self.ready_checks += 1
        await asyncio.sleep(0)
        return self.is_ready

    async def warm_up(self) -> None:
        self.warm_ups += 1

    async def infer(self, features, *, timeout_secs=None) -> InferenceOutput:
        self.calls += 1
        self.timeouts.append(timeout_secs)
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        n = len(features)
        return InferenceOutput(np.full(n, 0.5, np.float32), ["normal"] * n, "m", "1", 1.0, endpoint=self.name)


def _pool(clock, *endpoints, **kwargs) -> InferencePool:
    kwargs.setdefault("breaker_settings", BREAKER)
    kwargs.setdefault("idle_after_secs", 60.0)
    return InferencePool(list(endpoints), clock=clock, **kwargs)


def prefer_a(name: str, n: int) -> float:
    """A prediction that always ranks "a" first, so a test can aim its script at "a"."""
    return 0.0 if name == "a" else 1.0


def _transient(name: str = "e") -> TransientError:
    return TransientError("connection refused", endpoint=name)


async def test_pool_is_an_inferencer(clock):
    pool = _pool(clock, FakeEndpoint("a"))
    assert isinstance(pool, Inferencer)
    await pool.start()
    assert await pool.ready()
    out = await pool.infer(X)
    assert out.endpoint == "a" and len(out.scores) == 4
    await pool.close()


async def test_routes_to_the_earliest_predicted_completion(clock):
    a, b = FakeEndpoint("a"), FakeEndpoint("b")
    predicted = {"a": 0.020, "b": 0.005}
    seen = []

    def predict(name: str, n: int) -> float:
        seen.append((name, n))
        return predicted[name]

    pool = _pool(clock, a, b, predict_completion=predict)
    assert (await pool.infer(X)).endpoint == "b"
    assert ("a", 4) in seen and ("b", 4) in seen
    predicted["a"] = 0.001
    assert (await pool.infer(X)).endpoint == "a"


async def test_default_prediction_spreads_by_in_flight_calls(clock):
    a, b = FakeEndpoint("a"), FakeEndpoint("b")
    pool = _pool(clock, a, b)
    await pool.warm_up()
    a.gate = asyncio.Event()
    first = asyncio.create_task(pool.infer(X))
    await asyncio.sleep(0)
    assert a.calls == 1  # ties go to the first endpoint listed
    second = await pool.infer(X)
    assert second.endpoint == "b"  # a has one call in flight
    a.gate.set()
    assert (await first).endpoint == "a"


async def test_fails_over_on_endpoint_failure_and_sidelines_a_dead_endpoint(clock):
    a, b = FakeEndpoint("a", script=[_transient("a")]), FakeEndpoint("b")
    pool = _pool(clock, a, b, predict_completion=prefer_a)
    out = await pool.infer(X)
    assert out.endpoint == "b"
    assert a.calls == 1 and b.calls == 1
    assert {s.name: s.health for s in pool.status()}["a"] is Health.FAILING
    # The failed endpoint is checked again before more live traffic; it is down, so it is set aside
    # as not ready (no live call failed, so the breaker is not the one that keeps it out).
    a.is_ready = False
    assert (await pool.infer(X)).endpoint == "b"
    assert {s.name: s.health for s in pool.status()}["a"] is Health.NOT_READY
    assert (await pool.infer(X)).endpoint == "b"
    assert a.calls == 1 and a.ready_checks == 2  # first use, then once after the failure
    status = {s.name: s for s in pool.status()}
    assert status["a"].failures == 1 and status["b"].calls == 3


async def test_breaker_opens_after_failures_then_probes_and_recovers(clock):
    a = FakeEndpoint("a", script=[_transient(), _transient()])
    b = FakeEndpoint("b")
    pool = _pool(clock, a, b, predict_completion=prefer_a)
    await pool.infer(X)
    await pool.infer(X)
    assert pool.breaker("a").state is BreakerState.OPEN
    calls_before = a.calls
    await pool.infer(X)
    assert a.calls == calls_before  # open: skipped
    clock.advance(30.0)
    out = await pool.infer(X)  # half-open probe: readiness, warm-up, then the live call
    assert out.endpoint == "a"
    assert pool.breaker("a").state is BreakerState.CLOSED


async def test_backpressure_fails_over_without_penalising_the_breaker(clock):
    a = FakeEndpoint("a", script=[ThrottledError("queue full", endpoint="a")] * 5)
    b = FakeEndpoint("b")
    pool = _pool(clock, a, b, predict_completion=prefer_a)
    for _ in range(5):
        assert (await pool.infer(X)).endpoint == "b"
    assert pool.breaker("a").state is BreakerState.CLOSED
    assert {s.name: s.throttled for s in pool.status()} == {"a": 5, "b": 0}


async def test_backpressure_everywhere_is_reported_as_throttling(clock):
    a = FakeEndpoint("a", script=[ThrottledError("queue full", endpoint="a")])
    b = FakeEndpoint("b", script=[ThrottledError("503", endpoint="b")])
    pool = _pool(clock, a, b)
    with pytest.raises(ThrottledError):
        await pool.infer(X)


async def test_permanent_errors_are_raised_without_failover(clock):
    a = FakeEndpoint("a", script=[PermanentError("invalid argument", endpoint="a")])
    b = FakeEndpoint("b")
    pool = _pool(clock, a, b)
    with pytest.raises(PermanentError):
        await pool.infer(X)
    assert b.calls == 0
    assert pool.breaker("a").state is BreakerState.CLOSED


async def test_clear_error_when_no_endpoint_can_take_the_call(clock):
    a, b = FakeEndpoint("a"), FakeEndpoint("b")
    pool = _pool(clock, a, b)
    pool.breaker("a").trip()
    clock.advance(10.0)
    pool.breaker("b").trip()
    with pytest.raises(NoEndpointError) as caught:
        await pool.infer(X)
    message = str(caught.value)
    assert "no inference endpoint can take the call" in message
    assert "a: breaker open, probe in 20.0 s" in message and "b: breaker open, probe in 30.0 s" in message
    assert caught.value.retry_after == pytest.approx(20.0)
    assert isinstance(caught.value, TransientError)


async def test_every_endpoint_failing_names_each_failure(clock):
    a = FakeEndpoint("a", script=[_transient("a")])
    b = FakeEndpoint("b", script=[TransientError("timed out", endpoint="b")])
    pool = _pool(clock, a, b)
    with pytest.raises(NoEndpointError, match="a: failed: connection refused; b: failed: timed out") as caught:
        await pool.infer(X)
    assert isinstance(caught.value.__cause__, TransientError)


async def test_retry_budget_limits_failover(clock):
    budget = RetryBudget(ratio=0.0, min_retries_per_sec=0.1, ttl_secs=10.0, clock=clock)  # one retry in 10 s
    a = FakeEndpoint("a", script=[_transient(), _transient()])
    b = FakeEndpoint("b")
    pool = _pool(
        clock, a, b, retry_budget=budget, predict_completion=prefer_a,
        breaker_settings=BreakerSettings(consecutive_failures=5),
    )
    assert (await pool.infer(X)).endpoint == "b"  # the one affordable retry
    a.is_ready = True
    with pytest.raises(TransientError, match="connection refused"):
        await pool.infer(X)  # no budget left: the failure is returned to the caller
    assert b.calls == 1


async def test_idle_endpoint_is_checked_and_warmed_before_live_traffic(clock):
    a = FakeEndpoint("a")
    pool = _pool(clock, a, idle_after_secs=60.0)
    await pool.infer(X)
    assert (a.ready_checks, a.warm_ups) == (1, 1)  # first use
    clock.advance(59.0)
    await pool.infer(X)
    assert (a.ready_checks, a.warm_ups) == (1, 1)  # still warm
    clock.advance(61.0)
    assert pool.status()[0].idle_secs == pytest.approx(61.0)
    assert not pool.status()[0].warm
    # Several calls arrive together after idle: they share one readiness check and one warm-up.
    outs = await asyncio.gather(*(pool.infer(X) for _ in range(5)))
    assert len(outs) == 5
    assert (a.ready_checks, a.warm_ups) == (2, 2)
    assert pool.status()[0].idle_secs == 0.0


async def test_endpoint_not_ready_is_skipped_without_tripping_its_breaker(clock):
    a, b = FakeEndpoint("a", ready=False), FakeEndpoint("b")
    pool = _pool(clock, a, b)
    assert (await pool.infer(X)).endpoint == "b"
    assert a.calls == 0 and a.warm_ups == 0
    assert pool.breaker("a").state is BreakerState.CLOSED
    assert {s.name: s.health for s in pool.status()}["a"] is Health.NOT_READY


async def test_misconfigured_endpoint_failing_warm_up_is_skipped(clock):
    a, b = FakeEndpoint("a"), FakeEndpoint("b")

    async def broken_warm_up() -> None:
        raise PermanentError("no output 'label'", endpoint="a")

    a.warm_up = broken_warm_up
    pool = _pool(clock, a, b)
    assert (await pool.infer(X)).endpoint == "b"
    assert pool.breaker("a").state is BreakerState.OPEN


async def test_timeout_is_an_overall_deadline_across_attempts(clock):
    a, b = FakeEndpoint("a"), FakeEndpoint("b")

    async def slow_fail(features, *, timeout_secs=None):
        a.timeouts.append(timeout_secs)
        clock.advance(0.3)
        raise TransientError("timed out", endpoint="a")

    a.infer = slow_fail
    pool = _pool(clock, a, b)
    await pool.infer(X, timeout_secs=1.0)
    assert a.timeouts == [pytest.approx(1.0)]
    assert b.timeouts == [pytest.approx(0.7)]


async def test_cancelled_probe_frees_the_slot(clock):
    a = FakeEndpoint("a")
    pool = _pool(clock, a)
    await pool.infer(X)
    pool.breaker("a").trip()
    clock.advance(30.0)
    a.gate = asyncio.Event()
    task = asyncio.create_task(pool.infer(X))
    while a.calls < 2:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.breaker("a").allows()


async def test_caller_cancelled_during_warm_up_frees_the_probe_slot(clock):
    a = FakeEndpoint("a")
    pool = _pool(clock, a)
    pool.breaker("a").trip()
    clock.advance(30.0)
    release = asyncio.Event()

    async def slow_ready() -> bool:
        await release.wait()
        return True

    a.ready = slow_ready
    task = asyncio.create_task(pool.infer(X))
    await asyncio.sleep(0.01)
    assert not pool.breaker("a").allows()  # the probe slot is taken by the waiting call
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.breaker("a").allows()
    release.set()  # the shared warm-up goes on for the next caller
    assert (await pool.infer(X)).endpoint == "a"


def test_pool_configuration_errors():
    with pytest.raises(ValueError, match="at least one"):
        InferencePool([])
    with pytest.raises(ValueError, match="unique"):
        InferencePool([FakeEndpoint("a"), FakeEndpoint("a")])
