"""The inference seam: records in, a float32 tensor to a model, an ``inference`` field per record out.

Three pieces, each usable on its own:

- ``Inferencer``: the protocol every scoring backend implements (``LocalModelInferencer`` in process,
  ``TritonInferencer`` over gRPC or HTTP, ``InferencePool`` over several of them). It takes a float32
  ``[n, k]`` tensor and returns an ``InferenceOutput`` (a score and a label per row). Errors are the
  ones in ``connectors.errors``.
- ``ShapedBatch``: that tensor and how its rows map back to the records it came from (the gateway's
  curated zone builds it in ``gateway.lake.curated.shape``). A missing metric is never silently
  zero: it is either filled and reported as filled, or its row is rejected with a reason.
- ``inference_fields``: joins a shaped batch and the model's output back into one ``inference`` dict
  per record, in input order, e.g. ``{"status": "ok", "model": "telemetry_anomaly", "version": "1",
  "score": 0.03, "label": "normal", "latency_ms": 2.1, "missing": 0}``.
"""

from __future__ import annotations

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
    failures, ``PermanentError`` for requests that can never succeed. ``timeout_secs`` bounds one call
    (default: the backend's configured client timeout).
    """

    name: str

    async def start(self) -> None: ...

    async def ready(self) -> bool: ...

    async def warm_up(self) -> None: ...

    async def infer(self, features: np.ndarray, *, timeout_secs: float | None = None) -> InferenceOutput: ...

    async def close(self) -> None: ...


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
