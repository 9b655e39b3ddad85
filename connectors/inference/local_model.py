"""``LocalModelInferencer``: the telemetry anomaly model run in process on the CPU (the default run).

It implements ``connectors.inference.base.Inferencer`` exactly like ``TritonInferencer``, so the pipeline,
the pool and the tests treat the two alike. The forward pass is ``connectors.inference.models.anomaly``, the
same code the Triton test server runs, so both give the same scores for the same input.
"""

from __future__ import annotations

import time

import numpy as np

from connectors.errors import PermanentError
from connectors.inference.base import InferenceOutput
from connectors.inference.models.anomaly import DEFAULT_WEIGHTS_PATH, AnomalyModel


class LocalModelInferencer:
    """Scores batches with an ``AnomalyModel`` on the event loop's thread.

    The model is a few small matrix products (about 50 µs for 1024 rows), cheaper than a hop to an
    executor thread, so it runs inline; a heavier local model would belong in ``asyncio.to_thread``.
    """

    def __init__(self, model: AnomalyModel | None = None, *, name: str = "local") -> None:
        self.name = name
        self.model = model if model is not None else AnomalyModel.load(DEFAULT_WEIGHTS_PATH)

    @classmethod
    def from_file(cls, path: str, *, name: str = "local") -> LocalModelInferencer:
        return cls(AnomalyModel.load(path), name=name)

    async def start(self) -> None:
        """Nothing to connect: the weights were loaded in ``__init__``."""

    async def ready(self) -> bool:
        return True

    async def warm_up(self) -> None:
        await self.infer(np.zeros((1, self.model.n_features), dtype=np.float32))

    async def infer(self, features: np.ndarray, *, timeout_secs: float | None = None) -> InferenceOutput:
        """Score ``features`` (float32 [n, k]); ``timeout_secs`` is accepted for the protocol and unused."""
        started = time.perf_counter()
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.model.n_features:
            raise PermanentError(
                f"{self.name}: expected features of shape [n, {self.model.n_features}], got {list(x.shape)}",
                endpoint=self.name,
            )
        scores = self.model.scores(x.astype(np.float32, copy=False))
        labels = self.model.labels(scores).tolist()
        return InferenceOutput(
            scores=scores,
            labels=labels,
            model=self.model.name,
            version=self.model.version,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            endpoint=self.name,
        )

    async def close(self) -> None:
        """Nothing to release."""
