"""Errors of the batching library.

    BatchingError
    ├── QueueFullError       submit could not get room in the queue before its wait ran out
    ├── BatcherClosedError   submit after the batcher began to close
    ├── BackpressureError    raised by a dispatch callable: the endpoint is shedding load
    └── UnavailableError     raised by a dispatch callable: nothing behind the endpoint can take a call

Per-item results never travel as exceptions: each submitted item resolves to an
:class:`~batching.outcome.Ok`, :class:`~batching.outcome.Deferred` or :class:`~batching.outcome.Failed`.
"""


class BatchingError(Exception):
    """Base of every error the batching library raises."""


class QueueFullError(BatchingError):
    """The queue stayed full for as long as the submitter was willing to wait."""


class BatcherClosedError(BatchingError):
    """The batcher is closing or closed and takes no new items."""


class BackpressureError(BatchingError):
    """The endpoint asked us to slow down (HTTP 429/503, gRPC UNAVAILABLE, queue full, timeout).

    A dispatch callable raises this (or an error its ``is_backpressure`` predicate accepts) so that
    the batcher cuts the endpoint's concurrency and puts the items back in the queue.
    """


class UnavailableError(BatchingError):
    """Nothing behind the endpoint can take a call now (no server ready yet, every breaker open).

    Nothing was sent, so nothing failed: the batcher puts the items back in the queue, rests the
    endpoint for ``retry_after_secs`` (or until ``set_available(name, True)``), and defers the items
    whose deadline passes meanwhile.
    """

    def __init__(self, message: str = "", *, retry_after_secs: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_secs = retry_after_secs


def is_backpressure_error(error: BaseException) -> bool:
    """The default backpressure test: only :class:`BackpressureError` counts."""
    return isinstance(error, BackpressureError)
