"""Statistics the report uses: percentiles of samples, and median/min/max over repetitions.

Every figure in ``results.json`` is a ``{"median", "min", "max", "n"}`` summary over the repetitions
of a scenario; within one repetition a latency figure is a percentile of that repetition's samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The nearest-rank percentile lives with the simulator so the gateway's demo reports with it too.
from gateway.simulator import percentile

__all__ = ["percentile", "percentiles", "quantile_name", "summarize", "summarize_reps", "ratio", "growth", "clean"]

Summary = dict[str, float]


def percentiles(values: Sequence[float], qs: Iterable[float], *, scale: float = 1.0) -> dict[str, float]:
    """Several quantiles at once, keyed ``p50``, ``p99``, ``p99.9``; ``scale`` converts units (s -> ms)."""
    ordered = sorted(values)
    out = {}
    for q in qs:
        out[quantile_name(q)] = percentile(ordered, q) * scale if ordered else float("nan")
    return out


def quantile_name(q: float) -> str:
    text = f"{q * 100:.3f}".rstrip("0").rstrip(".")
    return f"p{text}"


def summarize(values: Iterable[float]) -> Summary:
    """Median, min and max of the finite values (NaN when there are none); ``n`` counts them."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def summarize_reps(reps: Sequence[Mapping[str, float]]) -> dict[str, Summary]:
    """One summary per key over a list of per-repetition ``{name: value}`` dicts (keys in first-seen order)."""
    names: dict[str, None] = {}
    for rep in reps:
        for name in rep:
            names.setdefault(name, None)
    return {name: summarize(rep[name] for rep in reps if name in rep) for name in names}


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN instead of a division by zero or a NaN operand."""
    if not denominator or not math.isfinite(denominator) or not math.isfinite(numerator):
        return float("nan")
    return numerator / denominator


def growth(samples: Sequence[float], window_share: float = 0.1) -> tuple[float, float]:
    """(median of the first window, median of the last window) of a time series.

    Comparing windows, not single samples, keeps one GC pause or one sampling hiccup from reading as
    growth. Each window holds ``window_share`` of the samples, at least one.
    """
    if not samples:
        return float("nan"), float("nan")
    width = max(1, int(len(samples) * window_share))
    return statistics.median(samples[:width]), statistics.median(samples[-width:])


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value
