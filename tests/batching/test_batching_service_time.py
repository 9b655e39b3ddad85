"""The online service-time model: priors first, then convergence to the true line and its tail."""

from __future__ import annotations

import numpy as np
import pytest

from batching import ServiceTimeModel
from batching.service_time import MAX_RHO


def test_prior_answers_before_any_data() -> None:
    model = ServiceTimeModel(0.003, 0.0001, prior_rho=1.5)
    assert model.predict(10) == pytest.approx(0.004)
    assert model.predict_tail(10) == pytest.approx(0.006)
    assert model.observed == 0


def test_fit_converges_to_known_a_and_c_under_noise() -> None:
    rng = np.random.default_rng(7)
    true_a, true_c = 0.005, 0.0003
    # A prior that is off by 2.5x and 0.1x must be overcome by the data.
    model = ServiceTimeModel(0.002, 0.00003)
    for _ in range(400):
        b = int(rng.integers(1, 129))
        model.observe(b, (true_a + true_c * b) * rng.lognormal(0.0, 0.05))
    assert model.a_secs == pytest.approx(true_a, rel=0.1)
    assert model.c_secs == pytest.approx(true_c, rel=0.05)


def test_fit_shrugs_off_rare_huge_outliers() -> None:
    rng = np.random.default_rng(11)
    true_a, true_c = 0.002, 0.0001
    model = ServiceTimeModel(0.001, 0.00005)
    for i in range(256):
        b = int(rng.integers(1, 129))
        stall = 20.0 if i % 25 == 0 else 1.0  # a GC pause now and then
        model.observe(b, (true_a + true_c * b) * stall)
    assert model.a_secs == pytest.approx(true_a, rel=0.1)
    assert model.c_secs == pytest.approx(true_c, rel=0.1)


def test_tail_factor_tracks_the_p99_of_observed_over_predicted() -> None:
    rng = np.random.default_rng(3)
    model = ServiceTimeModel(0.002, 0.0001, window=128)
    ratios = rng.lognormal(0.0, 0.1, size=1000)
    for ratio in ratios:
        b = int(rng.integers(1, 65))
        model.observe(b, (0.002 + 0.0001 * b) * ratio)
    expected = np.quantile(ratios, 0.99) / np.median(ratios)
    assert model.rho == pytest.approx(expected, rel=0.15)
    assert model.rho > 1.1


def test_tail_factor_jumps_on_a_slow_call_before_the_next_refit() -> None:
    model = ServiceTimeModel(0.002, 0.0001, prior_rho=1.0)
    model.observe(10, 3 * model.predict(10))
    assert model.rho == pytest.approx(2.0)  # at most doubled by one call
    model.observe(10, 3 * model.predict(10))
    assert model.rho == pytest.approx(3.0)  # the next one gets there


def test_one_stalled_call_cannot_shrink_batches_to_one_record() -> None:
    # A call stalled 50x (the process descheduled) is not an endpoint 50x slower: the tail factor
    # moves at most x2 per call and stays bounded, so batches stay efficient.
    model = ServiceTimeModel(0.0002, 0.000002, prior_rho=1.3)
    model.observe(1, 50 * model.predict(1))
    assert model.rho == pytest.approx(2.6)
    for _ in range(10):
        model.observe(1, 50 * model.predict(1))
    assert model.rho == MAX_RHO
    assert model.largest_batch_within(0.020, 128) == 128


def test_smallest_batch_keeping_up_with_the_arrival_rate() -> None:
    model = ServiceTimeModel(0.001, 0.00001)  # 1 ms per call + 10 us per record
    assert model.smallest_batch_keeping_up(0.0, 128) == 1
    assert model.smallest_batch_keeping_up(50_000, 128) == 100  # 50 / (1 - 0.5)
    assert model.smallest_batch_keeping_up(20_000, 128) == 25  # 20 / (1 - 0.2)
    assert model.smallest_batch_keeping_up(200_000, 128) == 128  # cannot keep up at any size: the largest


def test_one_batch_size_only_keeps_the_slope_near_its_prior() -> None:
    # Every batch full at 128: a and c cannot be told apart, so the prior must hold c.
    model = ServiceTimeModel(0.001, 0.0001)
    for _ in range(200):
        model.observe(128, 0.001 + 0.0001 * 128)
    assert model.c_secs == pytest.approx(0.0001, rel=0.2)
    assert model.predict(128) == pytest.approx(0.0138, rel=0.02)


def test_largest_batch_within_a_budget() -> None:
    model = ServiceTimeModel(0.001, 0.0001, prior_rho=2.0)
    # 2 * (0.001 + 0.0001 b) <= 0.012  ->  b <= 50
    assert model.largest_batch_within(0.012, 128) == 50
    assert model.largest_batch_within(0.012, 16) == 16
    assert model.largest_batch_within(0.0021, 128) == 0  # even one item does not fit


def test_bad_priors_are_refused() -> None:
    with pytest.raises(ValueError):
        ServiceTimeModel(0.0, 0.001)
    with pytest.raises(ValueError):
        ServiceTimeModel(0.001, 0.001, prior_rho=0.5)
