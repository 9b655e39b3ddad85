"""How many requests a worker lets in at once adapts to how late its answers come."""

from __future__ import annotations

import time
import types

import pytest

from gateway.edge.admission import WINDOW_SECS, Admission, InflightLimit
from gateway.edge.settings import AdmissionSettings
from gateway.errors import Unavailable
from gateway.ingest import handler
from tests.gateway.edge.test_abuse import send
from tests.gateway.conftest import make_env


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limit_with(clock: Clock, **settings) -> InflightLimit:
    s = AdmissionSettings(**{"max_inflight_requests": 100, "min_inflight_requests": 10, "answer_target_ms": 200, **settings})
    return InflightLimit(lambda: s, clock)


def window(limit: InflightLimit, clock: Clock, *, answers: int, late: int, late_secs: float = 0.5, in_flight: int | None = None) -> None:
    """One judged window: ``answers`` requests let in with ``in_flight`` (default: the limit) in
    flight and answered, ``late`` of them ``late_secs`` after their body arrived, the others at once."""
    limit.admitting(limit.value if in_flight is None else in_flight)
    for i in range(answers):
        clock.now += 0.001
        limit.answered(clock.now - (late_secs if i < late else 0.05))
    clock.now += WINDOW_SECS
    limit.answered(clock.now - 0.05)  # the window's end is noticed with the next answer


def test_late_answers_shrink_the_limit_as_much_as_they_were_late() -> None:
    clock = Clock()
    limit = limit_with(clock)  # answer_target_ms = 200
    assert limit.value == 100
    window(limit, clock, answers=10, late=10, late_secs=0.25)
    assert limit.value == 80  # typically 250 ms: 200/250 of the requests in flight answer on time
    clock.now += 3.0
    window(limit, clock, answers=10, late=10, late_secs=2.0)
    assert limit.value == 40  # ten times late: halved, no more, in one window
    for _ in range(10):
        clock.now += 3.0  # every request judged arrived after the last decrease
        window(limit, clock, answers=10, late=10)
    assert limit.value == 10  # min_inflight_requests


def test_the_limit_shrinks_from_what_was_in_flight() -> None:
    clock = Clock()
    limit = limit_with(clock)
    window(limit, clock, answers=10, late=10, late_secs=0.4, in_flight=40)
    assert limit.value == 20  # Little's law: 40 in flight, answered twice as late as the target


def test_a_few_late_answers_change_nothing() -> None:
    clock = Clock()
    limit = limit_with(clock)
    window(limit, clock, answers=20, late=2)  # a tenth: an fsync that took long, not an overload
    assert limit.value == 100


def test_on_time_answers_grow_the_limit_back_only_while_it_is_reached() -> None:
    clock = Clock()
    limit = limit_with(clock)
    window(limit, clock, answers=10, late=10)
    assert limit.value == 50
    window(limit, clock, answers=10, late=0, in_flight=20)  # on time, but nobody waited at the limit
    assert limit.value == 50
    window(limit, clock, answers=10, late=0)
    assert limit.value == 55  # a tenth more
    for _ in range(30):
        window(limit, clock, answers=10, late=0)
    assert limit.value == 100  # never past max_inflight_requests


def test_one_backlog_shrinks_the_limit_once() -> None:
    clock = Clock()
    limit = limit_with(clock)
    window(limit, clock, answers=10, late=10)
    assert limit.value == 50
    decreased_at = clock.now
    # The requests whose bodies had arrived before that decrease are answered late too, for a
    # while: they are not judged.
    for _ in range(4):
        limit.admitting(limit.value)
        for _ in range(10):
            clock.now += 0.03
            limit.answered(decreased_at - 0.01)
    assert limit.value == 50
    clock.now += 1.0
    window(limit, clock, answers=10, late=10)  # requests let in since are late as well: that counts
    assert limit.value == 25


def test_a_zero_target_keeps_the_limit_fixed() -> None:
    clock = Clock()
    limit = limit_with(clock, answer_target_ms=0)
    window(limit, clock, answers=10, late=10)
    assert limit.value == 100


def test_admission_refuses_past_the_current_limit() -> None:
    s = AdmissionSettings(max_inflight_requests=100, min_inflight_requests=10, answer_target_ms=200)
    refused: list[str] = []
    admission = Admission(lambda: s, refused.append)
    clock = Clock()
    admission.limit = InflightLimit(lambda: s, clock)
    window(admission.limit, clock, answers=10, late=10)
    limit = admission.limit.value
    assert limit == 50
    admission.check(inflight_requests=limit, declared_bytes=0, wal_bytes=0, wal_capacity=0, wal_retry_after_secs=1, loop_lag_secs=0)
    with pytest.raises(Unavailable, match="overloaded"):
        admission.check(
            inflight_requests=limit + 1, declared_bytes=0, wal_bytes=0, wal_capacity=0, wal_retry_after_secs=1, loop_lag_secs=0
        )
    assert refused == ["inflight_requests"]


def refusal_retry_after(admission: Admission, **check) -> int:
    args = dict(inflight_requests=2, declared_bytes=0, wal_bytes=0, wal_capacity=0, wal_retry_after_secs=5, loop_lag_secs=0) | check
    with pytest.raises(Unavailable) as refused:
        admission.check(**args)
    return refused.value.retry_after_secs


def test_overload_refusals_spread_their_retry_after_and_the_wal_full_keeps_its_own() -> None:
    s = AdmissionSettings(max_inflight_requests=1, answer_target_ms=0, retry_after_secs=2, retry_after_spread_secs=3)
    drawn = Admission(lambda: s, lambda reason: None)
    seen = {refusal_retry_after(drawn) for _ in range(400)}
    assert seen == {2, 3, 4, 5}, "every whole second from retry_after_secs to retry_after_secs + spread"
    highest = Admission(lambda: s, lambda reason: None, draw=lambda low, high: high)
    assert refusal_retry_after(highest) == 5
    # A full WAL is not a moment's overload: its refusal asks for wal.retry_after_secs, as it did.
    assert refusal_retry_after(highest, inflight_requests=1, wal_bytes=10, wal_capacity=10) == 5
    assert refusal_retry_after(highest, inflight_requests=1, wal_bytes=10, wal_capacity=10, wal_retry_after_secs=9) == 9
    fixed = AdmissionSettings(max_inflight_requests=1, answer_target_ms=0, retry_after_secs=2, retry_after_spread_secs=0)
    assert {refusal_retry_after(Admission(lambda: fixed, lambda reason: None)) for _ in range(50)} == {2}


async def test_a_gateway_whose_answers_come_late_lets_fewer_requests_in(tmp_path, start, http, monkeypatch) -> None:
    env = make_env(tmp_path, n_devices=1, admission={"max_inflight_requests": 32, "min_inflight_requests": 2, "answer_target_ms": 100})
    gw = await start(env)
    # Every body "arrived" 0.2 s before it did: each answer comes 0.2 s after it, past the target.
    monkeypatch.setattr(handler, "time", types.SimpleNamespace(monotonic=lambda: time.monotonic() - 0.2, perf_counter=time.perf_counter))
    def gauge() -> float:
        return gw.gateway.metrics.inflight_limit.collect()[0].samples[0].value

    assert gauge() == 32
    deadline = time.monotonic() + 10
    while gauge() >= 32 and time.monotonic() < deadline:
        assert (await send(http, gw, env, "dev-1", n=5))[0] == 202
    # One request at a time, each answered twice as late as the target: one in flight is what
    # answers on time, and the limit never goes below min_inflight_requests.
    assert gauge() == 2
