"""Adaptive micro-batching and adaptive concurrency for calls to inference endpoints.

A small library with no knowledge of Triton: the caller supplies ``dispatch(endpoint, items)``. See
``batching/README.md`` for an example. The public API:

- :class:`Batcher`: deadline-aware batching over one or more endpoints, with outcomes
  :class:`Ok`, :class:`Deferred` and :class:`Failed`, and :class:`BatcherStats` for metrics;
- :class:`BatchPolicy`: its knobs (max batch, max wait, ...);
- :class:`ServiceTimeModel`: the online ``S(b) = a + c*b`` fit with a tail factor;
- :class:`AdaptiveConcurrency`: the per-endpoint concurrency limit (AIMD);
- :class:`Endpoint`: an endpoint's limiter, service-time models and drain estimate;
- :class:`MonotonicClock` and :class:`FakeClock`: the real clock and the one tests advance.
"""

from batching.batcher import Batcher
from batching.clock import Clock, FakeClock, MonotonicClock
from batching.concurrency import AdaptiveConcurrency, ConcurrencyPermit
from batching.endpoint import Endpoint
from batching.errors import BackpressureError, BatcherClosedError, BatchingError, QueueFullError, UnavailableError
from batching.outcome import DEFER_BACKPRESSURE, DEFER_DEADLINE, DEFER_OVERLOAD, DEFER_SHUTDOWN, Deferred, Failed, Ok, Outcome
from batching.policy import BatchPolicy
from batching.service_time import ServiceTimeModel
from batching.stats import BatcherStats, EndpointStats

__all__ = [
    "AdaptiveConcurrency",
    "BackpressureError",
    "BatchPolicy",
    "Batcher",
    "BatcherClosedError",
    "BatcherStats",
    "BatchingError",
    "Clock",
    "ConcurrencyPermit",
    "DEFER_BACKPRESSURE",
    "DEFER_DEADLINE",
    "DEFER_OVERLOAD",
    "DEFER_SHUTDOWN",
    "Deferred",
    "Endpoint",
    "EndpointStats",
    "Failed",
    "FakeClock",
    "MonotonicClock",
    "Ok",
    "Outcome",
    "QueueFullError",
    "ServiceTimeModel",
    "UnavailableError",
]
