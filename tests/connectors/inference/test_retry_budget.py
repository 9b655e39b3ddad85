"""RetryBudget: retries as a fraction of recent requests, plus a floor, on an injected clock."""

from __future__ import annotations

import pytest

from connectors.inference.retry_budget import RetryBudget


def _spend_all(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_withdraw():
        spent += 1
        assert spent < 10_000
    return spent


def test_floor_allows_retries_without_traffic(clock):
    budget = RetryBudget(ratio=0.2, min_retries_per_sec=0.5, ttl_secs=10.0, clock=clock)
    assert _spend_all(budget) == 5  # 0.5/s x 10 s


def test_retries_are_a_fraction_of_requests(clock):
    budget = RetryBudget(ratio=0.2, min_retries_per_sec=0.0, ttl_secs=10.0, clock=clock)
    assert not budget.try_withdraw()
    for _ in range(100):
        budget.record_request()
    assert budget.balance() == pytest.approx(20.0)
    assert _spend_all(budget) == 20
    budget.record_request()
    assert not budget.try_withdraw()  # 0.2 of a retry is not a retry


def test_deposits_and_withdrawals_expire_after_the_ttl(clock):
    budget = RetryBudget(ratio=0.5, min_retries_per_sec=0.0, ttl_secs=10.0, slots=10, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert _spend_all(budget) == 5
    clock.advance(5.0)
    for _ in range(4):
        budget.record_request()
    assert _spend_all(budget) == 2
    clock.advance(5.5)  # the first 10 requests and 5 retries are forgotten; the later 4 and 2 remain
    assert budget.balance() == pytest.approx(0.0)
    clock.advance(5.0)
    assert budget.balance() == pytest.approx(0.0)
    for _ in range(2):
        budget.record_request()
    assert budget.balance() == pytest.approx(1.0)


def test_memory_is_bounded_whatever_the_rate(clock):
    budget = RetryBudget(clock=clock)
    for _ in range(50_000):
        budget.record_request()
        clock.advance(0.001)
    assert len(budget._ring) == 10


@pytest.mark.parametrize("kwargs", [{"ratio": -0.1}, {"ttl_secs": 0.0}, {"slots": 0}, {"min_retries_per_sec": -1}])
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)
