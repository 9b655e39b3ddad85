"""CircuitBreaker state machine, driven by an injected clock (no sleeps)."""

from __future__ import annotations

import pytest

from connectors.inference.breaker import BreakerSettings, BreakerState, CircuitBreaker

SETTINGS = BreakerSettings(
    consecutive_failures=3, failure_rate=0.5, min_requests=10, window_secs=10.0,
    open_secs=30.0, max_open_secs=100.0, jitter=0.0, half_open_successes=2,
)


def _breaker(clock, settings=SETTINGS, **kwargs) -> CircuitBreaker:
    return CircuitBreaker("e1", settings, clock=clock, **kwargs)


def _fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_failure(breaker.acquire())


def _succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_success(breaker.acquire())


def test_starts_closed_and_allows_traffic(clock):
    breaker = _breaker(clock)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allows()
    permit = breaker.acquire()
    assert permit is not None and not permit.probe


def test_opens_after_consecutive_failures(clock):
    breaker = _breaker(clock)
    _fail(breaker, 2)
    _succeed(breaker)  # a success resets the run
    _fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    _fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows()
    assert breaker.acquire() is None
    assert breaker.retry_after() == pytest.approx(30.0)


def test_opens_on_failure_rate_over_the_window(clock):
    breaker = _breaker(clock)
    for _ in range(5):  # alternate: never 3 in a row, but 50 % of 10
        _succeed(breaker)
        _fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_old_outcomes_leave_the_rate_window(clock):
    breaker = _breaker(clock)
    for _ in range(4):
        _succeed(breaker)
        _fail(breaker)
    clock.advance(11.0)  # those 8 outcomes are now outside the 10 s window
    _succeed(breaker)
    _fail(breaker)
    assert breaker.state is BreakerState.CLOSED


def test_half_open_after_the_open_period_admits_one_probe(clock):
    breaker = _breaker(clock)
    _fail(breaker, 3)
    clock.advance(29.9)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.2)
    assert breaker.state is BreakerState.HALF_OPEN
    probe = breaker.acquire()
    assert probe is not None and probe.probe
    assert not breaker.allows()
    assert breaker.acquire() is None  # only one probe at a time


def test_probe_successes_close_the_breaker(clock):
    breaker = _breaker(clock)
    _fail(breaker, 3)
    clock.advance(30.0)
    breaker.record_success(breaker.acquire())
    assert breaker.state is BreakerState.HALF_OPEN  # needs 2
    breaker.record_success(breaker.acquire())
    assert breaker.state is BreakerState.CLOSED


def test_probe_failure_reopens_for_longer_up_to_the_cap(clock):
    breaker = _breaker(clock)
    _fail(breaker, 3)
    expected = [60.0, 90.0, 100.0, 100.0]  # 30 s x openings, capped at 100 s
    for wait in expected:
        clock.advance(breaker.retry_after())
        probe = breaker.acquire()
        assert probe is not None and probe.probe
        breaker.record_failure(probe)
        assert breaker.state is BreakerState.OPEN
        assert breaker.retry_after() == pytest.approx(wait)


def test_closing_resets_the_backoff(clock):
    breaker = _breaker(clock)
    _fail(breaker, 3)
    clock.advance(30.0)
    breaker.record_failure(breaker.acquire())  # second opening: 60 s
    clock.advance(60.0)
    _succeed(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    _fail(breaker, 3)
    assert breaker.retry_after() == pytest.approx(30.0)


def test_release_frees_the_probe_slot_without_a_verdict(clock):
    breaker = _breaker(clock)
    _fail(breaker, 3)
    clock.advance(30.0)
    probe = breaker.acquire()
    breaker.release(probe)  # e.g. the endpoint answered 503: alive but busy
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allows()


def test_results_of_calls_started_before_a_state_change_are_ignored(clock):
    breaker = _breaker(clock)
    slow = breaker.acquire()  # started while closed
    _fail(breaker, 3)
    clock.advance(30.0)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success(slow)  # must not count as a probe success
    breaker.record_failure(slow)  # nor re-open it
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire().probe


def test_trip_opens_immediately(clock):
    breaker = _breaker(clock)
    breaker.trip()
    assert breaker.state is BreakerState.OPEN


def test_jitter_spreads_the_open_period(clock):
    settings = BreakerSettings(consecutive_failures=1, open_secs=30.0, jitter=0.1)
    low = _breaker(clock, settings, rng=lambda: 0.0)
    high = _breaker(clock, settings, rng=lambda: 1.0)
    _fail(low)
    _fail(high)
    assert low.retry_after() == pytest.approx(27.0)
    assert high.retry_after() == pytest.approx(33.0)


def test_state_changes_are_reported(clock):
    seen = []
    breaker = _breaker(clock, on_change=lambda name, old, new: seen.append((name, old, new)))
    _fail(breaker, 3)
    clock.advance(30.0)
    _succeed(breaker, 2)
    assert seen == [
        ("e1", BreakerState.CLOSED, BreakerState.OPEN),
        ("e1", BreakerState.OPEN, BreakerState.HALF_OPEN),
        ("e1", BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{"consecutive_failures": 0}, {"failure_rate": 0.0}, {"open_secs": 0.0}, {"max_open_secs": 1.0}, {"jitter": 1.0}],
)
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        BreakerSettings(**kwargs)
