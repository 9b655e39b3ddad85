"""Deadline arithmetic of the policy, checked against numbers worked out by hand."""

from __future__ import annotations

import pytest

from batching import BatchPolicy, ServiceTimeModel
from batching.policy import (
    REASON_DEADLINE_CAP,
    REASON_FLUSH,
    REASON_FULL,
    REASON_HOPELESS,
    REASON_LATE_BINDING,
    REASON_NOT_WORTH_WAITING,
    REASON_WAIT,
    REASON_WAIT_EXPIRED,
    EndpointView,
    QueueView,
    deadline_cap,
    decide,
    wait_and_run_cap,
    wait_budget,
)

# S(b) = 1 ms + 0.1 ms * b with no tail, so every number below can be checked by hand.
MODEL = ServiceTimeModel(0.001, 0.0001, prior_rho=1.0)
POLICY = BatchPolicy(max_batch=128, max_wait_secs=0.005, wait_and_run_share=0.8, worth_waiting_items=0.5, lead_secs=0.001)


def queue(length: int, deadline: float, *, budget: float = 0.050, oldest: float = 0.0) -> QueueView:
    return QueueView(length=length, head_deadline=deadline, head_budget_secs=budget, oldest_enqueued_at=oldest)


def idle(free_at: float = 0.0) -> EndpointView:
    return EndpointView(MODEL, free_at=free_at, drain_at=free_at, busy=False)


def test_wait_and_run_cap_is_the_nexus_rule() -> None:
    # 2 * (1 + 0.1 b) ms <= 0.8 * 50 ms  ->  b <= 190, then capped by max_batch.
    assert wait_and_run_cap(MODEL, 0.050, POLICY) == 128
    assert wait_and_run_cap(MODEL, 0.050, BatchPolicy(max_batch=1000)) == 190
    # A budget too small for even one item still yields 1: the deadline checks decide the rest.
    assert wait_and_run_cap(MODEL, 0.001, POLICY) == 1


def test_deadline_cap_fits_the_batch_between_free_and_deadline() -> None:
    # Start at 2 ms, finish by 12 ms: 1 + 0.1 b <= 10  ->  b <= 90.
    assert deadline_cap(MODEL, free_at=0.002, deadline=0.012, limit=128) == 90
    assert deadline_cap(MODEL, free_at=0.002, deadline=0.012, limit=32) == 32
    assert deadline_cap(MODEL, free_at=0.002, deadline=0.0025, limit=128) == 0


def test_wait_budget_counts_the_items_that_arrive_while_waiting() -> None:
    # slack = 50 - 0 - (1 + 1) = 48 ms; divided by 1 + 1.0 * 0.0001 * 1000 = 1.1.
    assert wait_budget(MODEL, 10, free_at=0.0, deadline=0.050, rate_per_sec=1000) == pytest.approx(0.048 / 1.1)
    # With no arrivals the budget is the plain slack.
    assert wait_budget(MODEL, 10, free_at=0.0, deadline=0.050, rate_per_sec=0) == pytest.approx(0.048)


def test_a_head_that_cannot_finish_in_time_is_deferred() -> None:
    # One item needs 1.1 ms; the endpoint frees at 10 ms and the head is due at 11 ms.
    decision = decide(0.0, queue(1, 0.011), idle(free_at=0.010), POLICY, 0.0)
    assert decision.defer_head and decision.reason == REASON_HOPELESS
    assert decide(0.0, queue(1, 0.0112), idle(free_at=0.010), POLICY, 0.0).send == 1


def test_under_overload_a_head_that_would_shrink_the_batch_is_deferred() -> None:
    # 200 queued: half of a full batch (64) needs 7.4 ms; a head due in 7 ms would force a small batch.
    decision = decide(0.0, queue(200, 0.007), idle(), POLICY, 0.0)
    assert decision.defer_head
    # Due in 10 ms it fits a batch of 90, more than half of b*: it goes, in a deadline-capped batch.
    decision = decide(0.0, queue(200, 0.010), idle(), POLICY, 0.0)
    assert (decision.send, decision.reason) == (90, REASON_DEADLINE_CAP)


def test_a_full_batch_goes_at_once() -> None:
    decision = decide(0.0, queue(300, 0.050), idle(), POLICY, 5000.0)
    assert (decision.send, decision.reason) == (128, REASON_FULL)


def test_a_close_deadline_caps_the_batch_size() -> None:
    # Head due at 6 ms, endpoint free now: 1 + 0.1 b <= 6  ->  b <= 50 of the 100 queued.
    decision = decide(0.0, queue(100, 0.006), idle(), POLICY, 5000.0)
    assert (decision.send, decision.reason) == (50, REASON_DEADLINE_CAP)


def test_late_binding_holds_items_until_the_endpoint_is_about_to_drain() -> None:
    busy = EndpointView(MODEL, free_at=0.004, drain_at=0.004, busy=True)
    decision = decide(0.0, queue(5, 0.050), busy, POLICY, 1000.0)
    assert decision.reason == REASON_LATE_BINDING
    assert decision.wake_at == pytest.approx(0.003)  # free_at - lead
    # Once within the lead, it no longer holds for late binding.
    assert decide(0.0035, queue(5, 0.050), busy, POLICY, 1000.0).reason != REASON_LATE_BINDING


def test_waits_for_company_within_the_age_bound() -> None:
    # Plenty of slack, 1000 items/s: worth waiting; the age bound (5 ms since oldest at t=0) wins.
    decision = decide(0.001, queue(2, 0.050, oldest=0.0), idle(free_at=0.001), POLICY, 1000.0)
    assert decision.reason == REASON_WAIT
    assert decision.wake_at == pytest.approx(0.005)
    assert decision.wait_secs == pytest.approx(0.004)


def test_sends_when_the_oldest_item_has_waited_max_wait() -> None:
    decision = decide(0.005, queue(2, 0.050, oldest=0.0), idle(free_at=0.005), POLICY, 1000.0)
    assert (decision.send, decision.reason) == (2, REASON_WAIT_EXPIRED)


def test_does_not_wait_when_too_few_items_are_expected() -> None:
    # 50 items/s over at most 5 ms is 0.25 expected items, below the 0.5 threshold.
    decision = decide(0.0, queue(3, 0.050), idle(), POLICY, 50.0)
    assert (decision.send, decision.reason) == (3, REASON_NOT_WORTH_WAITING)


def test_flushing_sends_without_waiting() -> None:
    busy = EndpointView(MODEL, free_at=0.004, drain_at=0.004, busy=True)
    decision = decide(0.0, queue(5, 0.050), busy, POLICY, 1000.0, flushing=True)
    assert (decision.send, decision.reason) == (5, REASON_FLUSH)


def test_policy_rejects_nonsense_knobs() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch=0)
    with pytest.raises(ValueError):
        BatchPolicy(wait_and_run_share=1.5)
