"""The inference seam: records in, a float32 tensor to a model, an ``inference`` field per record out.

Three pieces, each usable on its own:

- ``Inferencer``: the protocol every scoring backend implements (``LocalModelInferencer`` in process,
  ``TritonInferencer`` over gRPC or HTTP, ``InferencePool`` over several of them). It takes a float32
  ``[n, k]`` tensor and returns an ``InferenceOutput`` (a score and a label per row). Errors are the
  ones in ``connectors.errors``.
- ``FeatureShaper``: turns records (dicts with a ``"metrics"`` mapping of name -> number) into that
  tensor from a configured, ordered feature list. A missing (or non-numeric, or non-finite) metric is
  never silently zero: the policy either fills a configured value and reports which cells were filled,
  or rejects the row with a reason.
- ``inference_fields``: joins a shaped batch and the model's output back into one ``inference`` dict
  per record, in input order, e.g. ``{"status": "ok", "model": "telemetry_anomaly", "version": "1",
  "score": 0.03, "label": "normal", "latency_ms": 2.1, "missing": 0}``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class InferenceOutput:
    """What one model call returns: one score and one label per input row."""

    scores: np.ndarray  # float32 [n]
    labels: Sequence[str]  # n labels
    model: str
    version: str
    latency_ms: float  # wall time of the call as the caller saw it
    endpoint: str = ""  # which backend answered (set by every Inferencer)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.scores):
            raise ValueError(f"{len(self.scores)} scores but {len(self.labels)} labels")


@runtime_checkable
class Inferencer(Protocol):
    """A scoring backend.

    ``ready`` answers whether the backend can take traffic now (server live and ready, model ready);
    it never raises for an unreachable backend, it answers False. ``warm_up`` sends one small real
    inference so that the first live batch does not pay for lazy initialisation. ``infer`` raises
    ``ThrottledError`` when the backend sheds load, ``TransientError`` for timeouts and connection
    failures, ``PermanentError`` for requests that can never succeed. ``timeout_s`` bounds one call
    (default: the backend's configured client timeout).
    """

    name: str

    async def start(self) -> None: ...

    async def ready(self) -> bool: ...

    async def warm_up(self) -> None: ...

    async def infer(self, features: np.ndarray, *, timeout_s: float | None = None) -> InferenceOutput: ...

    async def close(self) -> None: ...


class MissingPolicy(enum.StrEnum):
    """What the shaper does with a row that lacks one of the model's metrics."""

    FILL = "fill"  # put the configured fill value in, and report the cell as missing
    REJECT = "reject"  # leave the row out of the tensor; its inference status is "failed"


@dataclass(frozen=True, slots=True)
class ShapedBatch:
    """A model input tensor and how its rows map back to the records it came from."""

    features: np.ndarray  # float32 [m, k], m <= number of records
    rows: np.ndarray  # int64 [m]: index of the record each tensor row came from
    missing: np.ndarray  # bool [m, k]: cells that were filled in rather than measured
    rejected: Mapping[int, str]  # record index -> reason, for records left out of the tensor
    n_records: int
    feature_names: tuple[str, ...]

    @property
    def missing_count(self) -> np.ndarray:
        """Number of filled-in metrics per tensor row, int64 [m]."""
        return self.missing.sum(axis=1)

    def missing_names(self, row: int) -> list[str]:
        """Names of the filled-in metrics of one tensor row."""
        return [name for name, gap in zip(self.feature_names, self.missing[row]) if gap]


_NUMBER_TYPES = (int, float, np.integer, np.floating)


def _as_float(value: Any) -> float:
    """The metric as a float, or NaN when it is absent or not a number (the caller treats NaN as missing)."""
    # bool is an int in Python but never a measurement; strings are not numbers even if they look like one.
    if isinstance(value, bool) or not isinstance(value, _NUMBER_TYPES):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        return math.nan


class FeatureShaper:
    """Builds the model's float32 ``[n, k]`` input from records' ``metrics``, in a fixed feature order."""

    def __init__(
        self,
        features: Sequence[str],
        *,
        missing: MissingPolicy | str = MissingPolicy.FILL,
        fill_value: float | Mapping[str, float] = 0.0,
    ) -> None:
        if not features:
            raise ValueError("the feature list is empty")
        if len(set(features)) != len(features):
            raise ValueError(f"the feature list repeats a name: {list(features)}")
        self.features = tuple(features)
        self.policy = MissingPolicy(missing)
        if isinstance(fill_value, Mapping):
            unknown = set(fill_value) - set(self.features)
            if unknown:
                raise ValueError(f"fill values for metrics the model does not use: {sorted(unknown)}")
            absent = [f for f in self.features if f not in fill_value]
            if self.policy is MissingPolicy.FILL and absent:
                raise ValueError(f"no fill value for: {absent}")
            fills = [float(fill_value.get(f, math.nan)) for f in self.features]
        else:
            fills = [float(fill_value)] * len(self.features)
        if self.policy is MissingPolicy.FILL and not all(math.isfinite(v) for v in fills):
            raise ValueError("fill values must be finite numbers")
        self._fill = np.asarray(fills, dtype=np.float32)

    @property
    def width(self) -> int:
        return len(self.features)

    def shape(self, records: Sequence[Mapping[str, Any]]) -> ShapedBatch:
        """Shape ``records`` into a tensor; rows the policy rejects are listed in ``rejected``."""
        n = len(records)
        features = self.features
        rows: list[list[float]] = []
        for record in records:
            metrics = record.get("metrics")
            if not isinstance(metrics, Mapping):
                metrics = {}
            row = [metrics.get(name) for name in features]
            # Fast path: exact int/float values go to numpy as they are; anything else is checked cell by cell.
            if not all(type(v) is float or type(v) is int for v in row):
                row = [_as_float(v) for v in row]
            rows.append(row)
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                values = np.array(rows, dtype=np.float32).reshape(n, len(features))
            except OverflowError:  # an integer beyond float range slipped through the fast path
                values = np.array([[_as_float(v) for v in row] for row in rows], dtype=np.float32)
                values = values.reshape(n, len(features))
        # NaN (absent), +-inf (non-finite, or too large for float32): all count as missing.
        missing = ~np.isfinite(values)
        if missing.any():
            values = np.where(missing, self._fill, values).astype(np.float32)
        rejected: dict[int, str] = {}
        if self.policy is MissingPolicy.REJECT:
            bad = np.flatnonzero(missing.any(axis=1))
            for i in bad:
                names = [f for f, gap in zip(self.features, missing[i]) if gap]
                rejected[int(i)] = "missing metrics: " + ", ".join(names)
            keep = np.flatnonzero(~missing.any(axis=1))
            values, missing = values[keep], missing[keep]
        else:
            keep = np.arange(n)
        return ShapedBatch(
            features=np.ascontiguousarray(values),
            rows=keep.astype(np.int64),
            missing=missing,
            rejected=rejected,
            n_records=n,
            feature_names=self.features,
        )


def inference_status(status: str, reason: str) -> dict[str, Any]:
    """The ``inference`` field of a record that was not scored (``failed`` or ``deferred``)."""
    return {"status": status, "reason": reason}


def inference_fields(batch: ShapedBatch, output: InferenceOutput | None) -> list[dict[str, Any]]:
    """One ``inference`` dict per record of ``batch``, in record order.

    Scored rows get ``status: "ok"`` with the model's score and label; ``missing`` counts the metrics
    that were filled in rather than measured (0 for a complete row). Rows the shaper rejected get
    ``status: "failed"`` with the reason. ``output`` may be None only when every row was rejected.
    """
    if output is None:
        if len(batch.rows):
            raise ValueError(f"no model output for {len(batch.rows)} shaped rows")
        return [inference_status("failed", batch.rejected[i]) for i in range(batch.n_records)]
    if len(output.scores) != len(batch.rows):
        raise ValueError(f"the model returned {len(output.scores)} scores for {len(batch.rows)} rows")
    fields: list[dict[str, Any]] = [{} for _ in range(batch.n_records)]
    for index, reason in batch.rejected.items():
        fields[index] = inference_status("failed", reason)
    latency_ms = round(float(output.latency_ms), 3)
    counts = batch.missing_count.tolist()
    scores = output.scores.tolist()  # one conversion to Python floats instead of n numpy scalars
    for row, index in enumerate(batch.rows.tolist()):
        fields[index] = {
            "status": "ok",
            "model": output.model,
            "version": output.version,
            "score": scores[row],
            "label": str(output.labels[row]),
            "latency_ms": latency_ms,
            "missing": counts[row],
        }
    return fields
