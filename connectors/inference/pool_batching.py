"""An ``InferencePool`` behind a ``batching.Batcher``: the two meanings the batcher needs from the pool.

- "nothing can take a call": the pool's availability drives ``batcher.set_available``, so records wait
  in the batcher (and are deferred at their deadline) while no endpoint is ready, instead of being
  sent to fail; a ``NoEndpointError`` for which no call was even sent becomes ``UnavailableError``.
- "slow down": Triton shedding load (``ThrottledError``) is backpressure to the batcher.

Calls that were sent and failed stay errors, so their records land as failed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batching import BackpressureError, Batcher, UnavailableError
from connectors.errors import NoEndpointError, ThrottledError
from connectors.inference.base import Inferencer, InferenceOutput
from connectors.inference.pool import InferencePool


def follow_availability(inferencer: Inferencer, batcher: Batcher[Any, Any], endpoint: str) -> None:
    """Take ``endpoint`` out of the batcher's rotation whenever the pool has no endpoint to offer."""
    if isinstance(inferencer, InferencePool):
        inferencer.on_availability(lambda available: batcher.set_available(endpoint, available))


async def infer(inferencer: Inferencer, features: np.ndarray, *, timeout_secs: float | None = None) -> InferenceOutput:
    """``inferencer.infer``, with "no endpoint could even be tried" raised as ``UnavailableError``."""
    try:
        return await inferencer.infer(features, timeout_secs=timeout_secs)
    except NoEndpointError as exc:
        if exc.calls_failed:
            raise  # calls were sent and failed
        raise UnavailableError(str(exc), retry_after_secs=exc.retry_after) from exc


def is_backpressure(error: BaseException) -> bool:
    """Endpoints shedding load: the batch goes back to the queue and the concurrency limit drops."""
    return isinstance(error, (BackpressureError, ThrottledError))
