"""The statistics helpers behind every figure in the report."""

from __future__ import annotations

import math

import pytest

from benchmarks.stats import clean, growth, percentile, percentiles, quantile_name, ratio, summarize, summarize_reps


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.0) == 1
    assert percentile([7.0], 0.999) == 7.0


def test_percentile_does_not_need_sorted_input() -> None:
    assert percentile([5, 1, 4, 2, 3], 0.5) == 3


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_percentiles_scale_and_names() -> None:
    out = percentiles([0.001, 0.002, 0.003, 0.004], (0.5, 0.999), scale=1000.0)
    assert out == {"p50": 2.0, "p99.9": 4.0}
    assert quantile_name(0.99) == "p99"
    assert quantile_name(0.9999) == "p99.99"


def test_summarize_gives_median_min_max_and_skips_non_finite() -> None:
    assert summarize([3.0, 1.0, 2.0, float("nan"), None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([1.0, 2.0, 3.0, 4.0])["median"] == 2.5


def test_summarize_of_nothing_is_nan_with_n_zero() -> None:
    s = summarize([])
    assert s["n"] == 0 and all(math.isnan(s[k]) for k in ("median", "min", "max"))


def test_summarize_reps_keeps_every_key_in_first_seen_order() -> None:
    out = summarize_reps([{"a": 1.0, "b": 10.0}, {"a": 3.0}, {"a": 2.0, "c": 5.0}])
    assert list(out) == ["a", "b", "c"]
    assert out["a"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert out["b"]["n"] == 1 and out["c"]["median"] == 5.0


def test_ratio_refuses_to_divide_by_zero_or_nan() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(float("nan"), 2.0))
    assert math.isnan(ratio(1.0, float("inf")))


def test_growth_compares_window_medians_not_single_samples() -> None:
    samples = [100.0] * 10 + [500.0] + [100.0] * 8 + [110.0] * 10  # one spike in the middle
    start, end = growth(samples, window_share=0.25)
    assert start == 100.0 and end == 110.0
    assert growth([42.0]) == (42.0, 42.0)
    assert all(math.isnan(x) for x in growth([]))


def test_clean_makes_strict_json() -> None:
    assert clean({"a": float("nan"), "b": [1.0, float("inf")], 3: {"c": 2}}) == {"a": None, "b": [1.0, None], "3": {"c": 2}}
