"""The telemetry anomaly model: weights in a small ``.npz``, forward pass in plain numpy.

This module imports nothing but numpy and the standard library, and uses only numpy APIs that exist in
numpy 1.26 as well as numpy 2, because the same code runs in two places: in the gateway
(``connectors.inference.local_model``) and inside the PyTriton test server, whose virtualenv pins ``numpy<2``.
One forward pass in one file is what lets the tests demand that both give the same scores.

The model, for one row ``x`` of the eight features in ``FEATURES`` order:

    u = x, with log1p applied to the heavy-tailed columns (uptime_s)
    z = clip((u - center) / scale, -clip_z, +clip_z)        robust z-score (median, 1.4826 * MAD)
    h = tanh(z @ w1 + b1)                                    16 hidden units
    score = sigmoid(h @ w2 + b2)                             in [0, 1]
    label = "anomaly" if score >= threshold else "normal"

See ``connectors/inference/models/README.md`` for what the features are and what the score means.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# The standard metrics the shipped model is trained on, in input-tensor order.
FEATURES: tuple[str, ...] = (
    "temperature_c",
    "humidity_pct",
    "pressure_hpa",
    "battery_v",
    "rssi_dbm",
    "cpu_pct",
    "mem_pct",
    "uptime_s",
)
LABELS: tuple[str, str] = ("normal", "anomaly")
MODEL_NAME = "telemetry_anomaly"
DEFAULT_WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "telemetry_anomaly.npz")

_ARRAYS = ("log1p", "center", "scale", "w1", "b1", "w2", "b2")


@dataclass(frozen=True)
class AnomalyModel:
    """Weights of the anomaly model and its forward pass (float32 throughout)."""

    name: str
    version: str
    features: tuple[str, ...]
    log1p: np.ndarray  # bool [k]: columns scored on a log scale
    center: np.ndarray  # float32 [k], in the (log) scale the z-score uses
    scale: np.ndarray  # float32 [k]
    clip_z: float
    w1: np.ndarray  # float32 [k, h]
    b1: np.ndarray  # float32 [h]
    w2: np.ndarray  # float32 [h]
    b2: float
    threshold: float

    @classmethod
    def load(cls, path: str = DEFAULT_WEIGHTS_PATH) -> AnomalyModel:
        """Read weights written by ``save`` (no pickles: plain arrays only)."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in _ARRAYS}
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                features=tuple(str(f) for f in data["features"]),
                log1p=arrays["log1p"].astype(bool),
                center=arrays["center"].astype(np.float32),
                scale=arrays["scale"].astype(np.float32),
                clip_z=float(data["clip_z"]),
                w1=arrays["w1"].astype(np.float32),
                b1=arrays["b1"].astype(np.float32),
                w2=arrays["w2"].astype(np.float32),
                b2=float(data["b2"]),
                threshold=float(data["threshold"]),
            )

    def save(self, path: str) -> None:
        """Write the weights as a compressed ``.npz`` (a few kilobytes)."""
        np.savez_compressed(
            path,
            name=np.array(self.name),
            version=np.array(self.version),
            features=np.array(self.features),
            log1p=self.log1p,
            center=self.center,
            scale=self.scale,
            clip_z=np.float32(self.clip_z),
            w1=self.w1,
            b1=self.b1,
            w2=self.w2,
            b2=np.float32(self.b2),
            threshold=np.float32(self.threshold),
        )

    @property
    def n_features(self) -> int:
        return len(self.features)

    def neutral_values(self) -> dict[str, float]:
        """Raw metric values that score as perfectly typical (z = 0): a sensible fill for a missing metric."""
        raw = self.center.astype(np.float64)
        raw[self.log1p] = np.expm1(raw[self.log1p])
        return {name: float(value) for name, value in zip(self.features, raw)}

    def zscores(self, x: np.ndarray) -> np.ndarray:
        """Robust z-scores, clipped, float32 [n, k]."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected float32 [n, {self.n_features}] features, got shape {x.shape}")
        # log1p only where configured; clamp at 0 first so a negative uptime cannot produce NaN.
        u = np.where(self.log1p, np.log1p(np.maximum(x, 0.0)), x).astype(np.float32)
        z = (u - self.center) / self.scale
        return np.clip(z, -self.clip_z, self.clip_z).astype(np.float32)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Anomaly score per row, float32 [n] in [0, 1]."""
        z = self.zscores(x)
        h = np.tanh(z @ self.w1 + self.b1)
        logits = (h @ self.w2 + np.float32(self.b2)).astype(np.float32)
        # exp(-logit) on float32 overflows for very negative logits; clip keeps it quiet and exact enough.
        return (1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))).astype(np.float32)

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """Label per row, as a numpy array of str."""
        return np.where(np.asarray(scores) >= self.threshold, LABELS[1], LABELS[0])
