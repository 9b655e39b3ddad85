"""Errors raised by connectors, translated from vendor exceptions at each connector's edge.

    ConnectorError
    ├── TransientError      retrying may succeed (throttling, 5xx, timeouts, connection errors)
    │   ├── ThrottledError  the service asked us to slow down (S3 SlowDown, HTTP 429/503, UNAVAILABLE)
    │   └── NoEndpointError no inference endpoint can take the call now
    └── PermanentError      retrying will not help (access denied, bad request, missing bucket)
"""


class ConnectorError(Exception):
    """Base of every error a connector raises."""

    def __init__(self, message: str, *, endpoint: str = "") -> None:
        super().__init__(message)
        self.endpoint = endpoint


class TransientError(ConnectorError):
    """A failure that may go away on retry."""


class ThrottledError(TransientError):
    """The remote service is shedding load; back off and lower concurrency."""


class NoEndpointError(TransientError):
    """No endpoint can take the call now: every breaker is open, or every endpoint tried has failed."""

    def __init__(self, message: str, *, retry_after: float = 0.0, calls_failed: int = 0) -> None:
        super().__init__(message, endpoint="")
        self.retry_after = retry_after
        self.calls_failed = calls_failed  # live calls that failed; 0 when nothing could be sent


class PermanentError(ConnectorError):
    """A failure that retrying will not fix."""
