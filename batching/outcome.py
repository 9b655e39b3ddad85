"""What became of one submitted item: scored, deferred, or failed. Every item gets exactly one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R")

# Why an item left for the deferred path instead of being scored.
DEFER_DEADLINE = "deadline"  # no endpoint could finish it before its deadline
DEFER_BACKPRESSURE = "backpressure"  # endpoints kept shedding load until attempts ran out
DEFER_SHUTDOWN = "shutdown"  # the batcher closed before it could be scored
DEFER_OVERLOAD = "overload"  # refused on arrival: the queue ahead of it would have made it late


@dataclass(frozen=True, slots=True)
class Ok(Generic[R]):
    """The endpoint returned a result for the item."""

    value: R
    endpoint: str
    batch_size: int  # records in the call that scored the item (its own included)
    latency_secs: float  # submit to result, on the batcher's clock
    late: bool  # finished after its deadline (the service-time tail was exceeded)


@dataclass(frozen=True, slots=True)
class Deferred:
    """The item was not scored in time and belongs on the deferred path; it was never sent late."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The endpoint call for the item's batch raised an error that is not backpressure."""

    error: BaseException
    endpoint: str


Outcome = Ok[R] | Deferred | Failed
