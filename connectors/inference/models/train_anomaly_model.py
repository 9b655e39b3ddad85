"""Train the telemetry anomaly model from synthetic data and write ``telemetry_anomaly.npz``.

Run ``python -m connectors.inference.models.train_anomaly_model [--out PATH] [--seed N]``. The data and the
initial weights come from one seeded generator and training is full-batch, so the same seed gives the
same weights (up to BLAS rounding, far below the float32 precision the weights are stored in).

Synthetic data: "normal" rows draw each metric from a plausible operating distribution of a
battery-powered sensor node; "anomalous" rows take a normal row and push one or two metrics into a
fault range (overheating, a stuck humidity sensor, brown-out, lost radio link, pegged CPU, memory
leak, reboot loop, ...). The model learns which robust z-score patterns are faults.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from connectors.inference.models.anomaly import DEFAULT_WEIGHTS_PATH, FEATURES, MODEL_NAME, AnomalyModel

SEED = 20240611
VERSION = "1"
HIDDEN = 16
CLIP_Z = 8.0
THRESHOLD = 0.5

_DAY_S = 86_400.0


def _normal_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows of a healthy fleet, float64 [n, 8] in FEATURES order."""
    cols = [
        rng.normal(21.0, 5.0, n),  # temperature_c
        np.clip(rng.normal(45.0, 12.0, n), 8.0, 92.0),  # humidity_pct
        rng.normal(1013.0, 9.0, n),  # pressure_hpa
        np.clip(rng.normal(3.9, 0.12, n), 3.55, 4.2),  # battery_v (one Li-ion cell)
        np.clip(rng.normal(-68.0, 9.0, n), -97.0, -35.0),  # rssi_dbm
        100.0 * rng.beta(2.0, 8.0, n),  # cpu_pct
        np.clip(rng.normal(48.0, 10.0, n), 15.0, 88.0),  # mem_pct
        np.exp(rng.uniform(np.log(3600.0), np.log(90 * _DAY_S), n)),  # uptime_s: an hour to 90 days
    ]
    return np.stack(cols, axis=1)


# Fault ranges per feature: (low, high) uniform intervals, one picked at random per injected fault.
_FAULTS: dict[str, tuple[tuple[float, float], ...]] = {
    "temperature_c": ((55.0, 95.0), (-40.0, -12.0)),
    "humidity_pct": ((97.0, 100.0), (0.0, 3.0)),
    "pressure_hpa": ((850.0, 945.0), (1060.0, 1100.0)),
    "battery_v": ((2.8, 3.4),),
    "rssi_dbm": ((-120.0, -101.0),),
    "cpu_pct": ((95.0, 100.0),),
    "mem_pct": ((94.0, 100.0),),
    "uptime_s": ((0.0, 120.0),),
}


def generate(rng: np.random.Generator, n: int, anomaly_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic rows and labels (1 = anomalous): float64 [n, 8], int8 [n]."""
    x = _normal_rows(rng, n)
    y = (rng.random(n) < anomaly_fraction).astype(np.int8)
    for i in np.flatnonzero(y):
        n_faults = 1 + int(rng.random() < 0.25)
        for j in rng.choice(len(FEATURES), size=n_faults, replace=False):
            ranges = _FAULTS[FEATURES[j]]
            low, high = ranges[int(rng.integers(len(ranges)))]
            x[i, j] = rng.uniform(low, high)
    return x, y


def _log_columns(x: np.ndarray, log1p: np.ndarray) -> np.ndarray:
    """log1p of the heavy-tailed columns only (the same transform ``AnomalyModel.zscores`` applies)."""
    u = x.copy()
    u[:, log1p] = np.log1p(np.maximum(x[:, log1p], 0.0))
    return u


def _robust_stats(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = np.median(u, axis=0)
    mad = np.median(np.abs(u - center), axis=0)
    return center, np.maximum(1.4826 * mad, 1e-6)


def train(seed: int = SEED, n_rows: int = 6_000, steps: int = 500, lr: float = 0.05) -> AnomalyModel:
    """Fit the robust z-score statistics on normal rows, then a 8-16-1 tanh MLP with Adam."""
    rng = np.random.default_rng(seed)
    log1p = np.array([name == "uptime_s" for name in FEATURES])

    # Robust statistics come from healthy rows only: they define "typical".
    healthy = _normal_rows(rng, n_rows)
    center, scale = _robust_stats(_log_columns(healthy, log1p))

    x, y = generate(rng, n_rows)
    u = _log_columns(x, log1p)
    z = np.clip((u - center) / scale, -CLIP_Z, CLIP_Z)

    k = len(FEATURES)
    params = {
        "w1": rng.normal(0.0, 0.5, (k, HIDDEN)),
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(0.0, 0.5, HIDDEN),
        "b2": np.zeros(1),
    }
    m = {key: np.zeros_like(v) for key, v in params.items()}
    v = {key: np.zeros_like(val) for key, val in params.items()}
    beta1, beta2, eps, l2 = 0.9, 0.999, 1e-8, 1e-4
    target = y.astype(np.float64)
    for step in range(1, steps + 1):
        h = np.tanh(z @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"][0]
        p = 1.0 / (1.0 + np.exp(-logits))
        dlogits = (p - target) / len(target)  # gradient of the mean binary cross-entropy
        dh = np.outer(dlogits, params["w2"]) * (1.0 - h * h)
        grads = {
            "w2": h.T @ dlogits + l2 * params["w2"],
            "b2": np.array([dlogits.sum()]),
            "w1": z.T @ dh + l2 * params["w1"],
            "b1": dh.sum(axis=0),
        }
        for key, g in grads.items():
            m[key] = beta1 * m[key] + (1 - beta1) * g
            v[key] = beta2 * v[key] + (1 - beta2) * g * g
            m_hat = m[key] / (1 - beta1**step)
            v_hat = v[key] / (1 - beta2**step)
            params[key] = params[key] - lr * m_hat / (np.sqrt(v_hat) + eps)

    return AnomalyModel(
        name=MODEL_NAME,
        version=VERSION,
        features=FEATURES,
        log1p=log1p,
        center=center.astype(np.float32),
        scale=scale.astype(np.float32),
        clip_z=CLIP_Z,
        w1=params["w1"].astype(np.float32),
        b1=params["b1"].astype(np.float32),
        w2=params["w2"].astype(np.float32),
        b2=float(np.float32(params["b2"][0])),
        threshold=THRESHOLD,
    )


def evaluate(model: AnomalyModel, seed: int, n_rows: int = 10_000) -> dict[str, float]:
    """Accuracy, recall and false-positive rate on fresh synthetic rows."""
    x, y = generate(np.random.default_rng(seed), n_rows)
    predicted = model.scores(x.astype(np.float32)) >= model.threshold
    positives = y == 1
    return {
        "accuracy": float(np.mean(predicted == positives)),
        "recall": float(np.mean(predicted[positives])),
        "false_positive_rate": float(np.mean(predicted[~positives])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_WEIGHTS_PATH, help="where to write the .npz")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    model = train(args.seed)
    model.save(args.out)
    metrics = evaluate(model, seed=args.seed + 1)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
