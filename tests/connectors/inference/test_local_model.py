"""The shipped anomaly model, its training script and LocalModelInferencer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from connectors.inference.base import inference_fields
from connectors.inference.local_model import LocalModelInferencer
from connectors.inference.models import train_anomaly_model as training
from connectors.inference.models.anomaly import DEFAULT_WEIGHTS_PATH, FEATURES, MODEL_NAME, AnomalyModel
from gateway.lake.curated import _typical_values, shape
from tests.connectors.inference.test_feature_shaping import curated_lines


@pytest.fixture(scope="module")
def model() -> AnomalyModel:
    return AnomalyModel.load()


def test_shipped_weights_are_small_and_describe_the_documented_features(model):
    assert os.path.getsize(DEFAULT_WEIGHTS_PATH) < 16 * 1024
    assert model.name == MODEL_NAME
    assert model.features == FEATURES
    assert len(FEATURES) == 8
    assert model.w1.dtype == np.float32 and model.w1.shape == (8, training.HIDDEN)


def test_training_reproduces_the_shipped_weights(model, tmp_path):
    path = tmp_path / "retrained.npz"
    assert training.main(["--out", str(path)]) == 0
    retrained = AnomalyModel.load(str(path))
    for field in ("center", "scale", "w1", "b1", "w2"):
        # Same seed, same data; only BLAS summation order could differ between machines.
        np.testing.assert_allclose(getattr(retrained, field), getattr(model, field), rtol=1e-4, atol=1e-5)
    assert retrained.b2 == pytest.approx(model.b2, abs=1e-5)


def test_scores_are_deterministic_float32_in_unit_interval(model):
    x, _ = training.generate(np.random.default_rng(7), 500)
    first = model.scores(x.astype(np.float32))
    second = AnomalyModel.load().scores(x.astype(np.float32))
    assert first.dtype == np.float32 and first.shape == (500,)
    np.testing.assert_array_equal(first, second)
    assert np.all((first >= 0) & (first <= 1))


def test_anomalous_rows_score_higher_than_normal_rows(model):
    x, y = training.generate(np.random.default_rng(11), 4000)
    scores = model.scores(x.astype(np.float32))
    normal, anomalous = scores[y == 0], scores[y == 1]
    assert np.median(anomalous) > 0.9 > 0.1 > np.median(normal)
    # Rank quality (AUC): the chance that a random anomalous row outscores a random normal one.
    ranks = np.argsort(np.argsort(scores)) + 1
    auc = (ranks[y == 1].sum() - len(anomalous) * (len(anomalous) + 1) / 2) / (len(anomalous) * len(normal))
    assert auc > 0.97


def test_each_kind_of_fault_raises_the_score(model):
    typical = model.neutral_values()
    base = np.array([[typical[f] for f in FEATURES]], dtype=np.float32)
    assert model.scores(base)[0] < 0.1
    faults = {"temperature_c": 80.0, "battery_v": 3.0, "rssi_dbm": -115.0, "cpu_pct": 99.5, "uptime_s": 30.0}
    for name, value in faults.items():
        row = base.copy()
        row[0, FEATURES.index(name)] = value
        assert model.scores(row)[0] > 0.5, name


def test_model_rejects_wrong_width(model):
    with pytest.raises(ValueError, match="expected float32"):
        model.scores(np.zeros((2, 7), dtype=np.float32))


def _typical(features=FEATURES) -> np.ndarray:
    typical = _typical_values(features)
    return np.array([typical[f] for f in features], dtype=np.float32)


async def test_records_to_inference_fields_end_to_end():
    local = LocalModelInferencer()
    lines = curated_lines(
        {"temperature_c": 21.0, "humidity_pct": 40.0, "pressure_hpa": 1010.0, "battery_v": 3.9,
         "rssi_dbm": -60.0, "cpu_pct": 15.0, "mem_pct": 45.0, "uptime_s": 86400.0},
        {"temperature_c": 85.0},  # overheating; everything else filled with typical values
    )
    batch = shape(lines, FEATURES, _typical(), reject_missing=False)
    fields = inference_fields(batch, await local.infer(batch.features))
    assert [f["label"] for f in fields] == ["normal", "anomaly"]
    assert [f["missing"] for f in fields] == [0, 7]
    assert fields[0]["score"] < 0.1 < 0.9 < fields[1]["score"]


def test_missing_metrics_are_filled_with_the_models_typical_values(model):
    assert _typical_values(FEATURES) == model.neutral_values()
    batch = shape(curated_lines({"unrelated": 1.0}), FEATURES, _typical(), reject_missing=False)
    assert batch.missing.all()
    assert model.scores(batch.features)[0] < 0.1
