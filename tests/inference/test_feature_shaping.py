"""FeatureShaper and inference_fields: records -> tensor -> one inference dict per record."""

from __future__ import annotations

import math

import numpy as np
import pytest

from connectors.inference import FeatureShaper, InferenceOutput, MissingPolicy, inference_fields

FEATURES = ("a", "b", "c")


def _records(*metrics: dict) -> list[dict]:
    return [{"device_id": f"d{i}", "metrics": m} for i, m in enumerate(metrics)]


def test_shapes_in_configured_order_as_float32():
    shaper = FeatureShaper(FEATURES)
    batch = shaper.shape(_records({"c": 3, "a": 1.5, "b": -2, "extra": 9.0}))
    assert batch.features.dtype == np.float32
    assert batch.features.tolist() == [[1.5, -2.0, 3.0]]
    assert batch.missing.tolist() == [[False, False, False]]
    assert batch.rows.tolist() == [0]
    assert batch.rejected == {}


def test_fill_policy_fills_and_reports_missing_cells():
    shaper = FeatureShaper(FEATURES, missing="fill", fill_value={"a": 10.0, "b": 20.0, "c": 30.0})
    batch = shaper.shape(_records({"a": 1, "b": 2, "c": 3}, {"a": 1}, {}, {"a": 1, "b": "7", "c": True}))
    assert batch.features.tolist() == [[1, 2, 3], [1, 20, 30], [10, 20, 30], [1, 20, 30]]
    assert batch.missing_count.tolist() == [0, 2, 3, 2]
    assert batch.missing_names(1) == ["b", "c"]
    assert batch.rejected == {}


def test_scalar_fill_value_applies_to_every_feature():
    batch = FeatureShaper(FEATURES, fill_value=-1.0).shape(_records({"b": 5}))
    assert batch.features.tolist() == [[-1, 5, -1]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39, 10**400, None, [1.0], {"x": 1}])
def test_non_finite_or_non_numeric_values_count_as_missing(bad):
    batch = FeatureShaper(FEATURES, fill_value=0.0).shape(_records({"a": bad, "b": 1, "c": 2}))
    assert batch.missing.tolist() == [[True, False, False]]
    assert batch.features.tolist() == [[0, 1, 2]]


def test_numpy_scalars_are_numbers():
    batch = FeatureShaper(FEATURES).shape(_records({"a": np.float64(1.5), "b": np.int32(2), "c": np.float32(3)}))
    assert batch.features.tolist() == [[1.5, 2, 3]]
    assert not batch.missing.any()


def test_reject_policy_leaves_rows_out_with_a_reason():
    shaper = FeatureShaper(FEATURES, missing=MissingPolicy.REJECT)
    batch = shaper.shape(_records({"a": 1, "b": 2, "c": 3}, {"a": 1}, {"a": 4, "b": 5, "c": 6}))
    assert batch.rows.tolist() == [0, 2]
    assert batch.features.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch.rejected == {1: "missing metrics: b, c"}


def test_records_without_a_metrics_mapping_are_all_missing():
    batch = FeatureShaper(FEATURES, missing="reject").shape([{"device_id": "x"}, {"metrics": [1, 2]}])
    assert batch.features.shape == (0, 3)
    assert set(batch.rejected) == {0, 1}


def test_empty_input():
    batch = FeatureShaper(FEATURES).shape([])
    assert batch.features.shape == (0, 3)
    assert batch.n_records == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"features": ()}, "empty"),
        ({"features": ("a", "a")}, "repeats"),
        ({"features": FEATURES, "fill_value": {"a": 1.0}}, "no fill value"),
        ({"features": FEATURES, "fill_value": {"a": 1, "b": 1, "c": 1, "zz": 1}}, "does not use"),
        ({"features": FEATURES, "fill_value": math.nan}, "finite"),
        ({"features": FEATURES, "missing": "guess"}, "guess"),
    ],
)
def test_configuration_errors_are_explicit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureShaper(**kwargs)


def _output(scores: list[float], labels: list[str]) -> InferenceOutput:
    return InferenceOutput(
        scores=np.asarray(scores, dtype=np.float32),
        labels=labels,
        model="m",
        version="3",
        latency_ms=1.23456,
        endpoint="e",
    )


def test_inference_fields_join_outputs_back_in_record_order():
    shaper = FeatureShaper(FEATURES, missing="reject")
    batch = shaper.shape(_records({"a": 1, "b": 2, "c": 3}, {"a": 1}, {"a": 4, "b": 5, "c": 6}))
    fields = inference_fields(batch, _output([0.25, 0.75], ["normal", "anomaly"]))
    common = {"status": "ok", "model": "m", "version": "3", "latency_ms": 1.235, "missing": 0}
    assert fields == [
        {**common, "score": 0.25, "label": "normal"},
        {"status": "failed", "reason": "missing metrics: b, c"},
        {**common, "score": 0.75, "label": "anomaly"},
    ]
    assert all(type(f.get("score", 0.0)) is float for f in fields)


def test_inference_fields_report_filled_metrics():
    batch = FeatureShaper(FEATURES).shape(_records({"a": 1}))
    (field,) = inference_fields(batch, _output([0.5], ["normal"]))
    assert field["missing"] == 2


def test_inference_fields_when_every_row_was_rejected():
    batch = FeatureShaper(FEATURES, missing="reject").shape(_records({}))
    assert inference_fields(batch, None) == [{"status": "failed", "reason": "missing metrics: a, b, c"}]


def test_inference_fields_refuse_mismatched_output():
    batch = FeatureShaper(FEATURES).shape(_records({"a": 1}, {"a": 2}))
    with pytest.raises(ValueError, match="1 scores for 2 rows"):
        inference_fields(batch, _output([0.5], ["normal"]))
    with pytest.raises(ValueError):
        inference_fields(batch, None)


def test_output_needs_one_label_per_score():
    with pytest.raises(ValueError, match="labels"):
        _output([0.1, 0.2], ["normal"])
