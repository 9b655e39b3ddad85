"""curated.shape and inference_fields: records -> tensor -> one inference dict per record."""

from __future__ import annotations

import numpy as np
import pytest

from connectors.inference.base import InferenceOutput, inference_fields
from gateway.ingest.records import CuratedSource, RecordBody
from gateway.lake.curated import shape

FEATURES = ("a", "b", "c")
TYPICAL = np.array([10.0, 20.0, 30.0], dtype=np.float32)


def curated_lines(*metrics: dict) -> list[CuratedSource]:
    return [
        CuratedSource(index=i, device_id=f"d{i}", event_time_ms=0, record=RecordBody(metrics=m))
        for i, m in enumerate(metrics)
    ]


def _shape(*metrics: dict, reject: bool = False):
    return shape(curated_lines(*metrics), FEATURES, TYPICAL, reject)


def test_shapes_in_configured_order_as_float32():
    batch = _shape({"c": 3, "a": 1.5, "b": -2, "extra": 9.0})
    assert batch.features.dtype == np.float32
    assert batch.features.tolist() == [[1.5, -2.0, 3.0]]
    assert batch.missing.tolist() == [[False, False, False]]
    assert batch.rows.tolist() == [0]
    assert batch.rejected == {}
    assert batch.feature_names == FEATURES


def test_fill_policy_fills_typical_values_and_reports_missing_cells():
    batch = _shape({"a": 1, "b": 2, "c": 3}, {"a": 1}, {"zz": 1})
    assert batch.features.dtype == np.float32
    assert batch.features.tolist() == [[1, 2, 3], [1, 20, 30], [10, 20, 30]]
    assert batch.missing_count.tolist() == [0, 2, 3]
    assert batch.missing_names(1) == ["b", "c"]
    assert batch.rejected == {}


@pytest.mark.parametrize("huge", [1e39, -1e39])
def test_values_beyond_float32_range_count_as_missing(huge):
    batch = _shape({"a": huge, "b": 1, "c": 2})
    assert batch.missing.tolist() == [[True, False, False]]
    assert batch.features.tolist() == [[10, 1, 2]]


def test_reject_policy_leaves_rows_out_with_a_reason():
    batch = _shape({"a": 1, "b": 2, "c": 3}, {"a": 1}, {"a": 4, "b": 5, "c": 6}, reject=True)
    assert batch.rows.tolist() == [0, 2]
    assert batch.features.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch.rejected == {1: "missing metrics: b, c"}
    assert batch.n_records == 3


def test_empty_input():
    batch = _shape()
    assert batch.features.shape == (0, 3)
    assert batch.n_records == 0


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
    batch = _shape({"a": 1, "b": 2, "c": 3}, {"a": 1}, {"a": 4, "b": 5, "c": 6}, reject=True)
    fields = inference_fields(batch, _output([0.25, 0.75], ["normal", "anomaly"]))
    common = {"status": "ok", "model": "m", "version": "3", "latency_ms": 1.235, "missing": 0}
    assert fields == [
        {**common, "score": 0.25, "label": "normal"},
        {"status": "failed", "reason": "missing metrics: b, c"},
        {**common, "score": 0.75, "label": "anomaly"},
    ]
    assert all(type(f.get("score", 0.0)) is float for f in fields)


def test_inference_fields_report_filled_metrics():
    batch = _shape({"a": 1})
    (field,) = inference_fields(batch, _output([0.5], ["normal"]))
    assert field["missing"] == 2


def test_inference_fields_when_every_row_was_rejected():
    batch = _shape({"zz": 1}, reject=True)
    assert inference_fields(batch, None) == [{"status": "failed", "reason": "missing metrics: a, b, c"}]


def test_inference_fields_refuse_mismatched_output():
    batch = _shape({"a": 1}, {"a": 2})
    with pytest.raises(ValueError, match="1 scores for 2 rows"):
        inference_fields(batch, _output([0.5], ["normal"]))
    with pytest.raises(ValueError):
        inference_fields(batch, None)


def test_output_needs_one_label_per_score():
    with pytest.raises(ValueError, match="labels"):
        _output([0.1, 0.2], ["normal"])


def test_the_feature_matrix_of_a_slice_is_that_of_its_own_records():
    import pyarrow as pa

    from gateway.lake.curated import _METRICS, feature_matrix

    metrics = pa.array([{"a": 1.0}, {"b": 2.0, "zz": 5.0}, {"c": 3.0, "a": 4.0}, {}], _METRICS)
    whole = feature_matrix(metrics, FEATURES)
    np.testing.assert_array_equal(whole[1:3], feature_matrix(metrics.slice(1, 2), FEATURES))
    np.testing.assert_array_equal(whole, [[1, np.nan, np.nan], [np.nan, 2, np.nan], [4, np.nan, 3], [np.nan] * 3])
