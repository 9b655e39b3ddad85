"""Errors the device API answers with, each one a status, a stable code and a human sentence.

    ApiError                     -> {"error": code, "message": message}
    ├── MalformedBody        400 malformed framing, truncated compression, empty body
    │   └── MalformedRequest 400 the HTTP parser refused the request (414 a target, 431 headers too large)
    ├── Unauthorized         401 missing or bad signature, stale timestamp, unknown device
    │   └── Replayed         401 this signature was already accepted within the window
    ├── Forbidden            403 device disabled, or a record for another device
    ├── RequestTimeout       408 the request body arrived too slowly
    ├── TooLarge             413 a size or count limit was exceeded
    ├── KeyReused            409 an Idempotency-Key already used with another body
    ├── UnsupportedMedia     415 content type or content encoding we do not speak
    ├── NotImplementedCoding 501 a transfer coding other than chunked
    ├── VersionNotSupported  505 a request line naming HTTP other than 1.0 or 1.1
    ├── AllRecordsInvalid    422 not one record passed validation
    ├── RateLimited          429 slow down (Retry-After)
    ├── Unavailable          503 overloaded or draining (Retry-After)
    │   └── CannotPersist    503 this worker's WAL cannot take records now; the connection is closed
    └── AdminError           any  the admin API's answers, each with its own status and code
"""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    code = "internal"
    closes_connection = False  # the answer carries Connection: close

    def __init__(self, message: str, *, retry_after_secs: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_secs = retry_after_secs
        # For the operator only (metrics and logs), never in the answer: e.g. why a 401 was a 401.
        self.reason = reason or self.code


class MalformedBody(ApiError):
    status = 400
    code = "malformed"


class MalformedRequest(MalformedBody):
    """The HTTP parser refused the request itself (its framing or headers): the connection cannot be reused."""

    closes_connection = True


class UriTooLong(MalformedRequest):
    """414: the request line's target is longer than the parser takes."""

    status = 414
    code = "uri_too_long"


class HeadersTooLarge(MalformedRequest):
    """431: a header line is longer, or there are more header lines, than the parser takes."""

    status = 431
    code = "headers_too_large"


class VersionNotSupported(ApiError):
    """505: a request line naming an HTTP version other than 1.0 or 1.1 (HTTP/2 is not spoken in text)."""

    status = 505
    code = "http_version_not_supported"
    closes_connection = True


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Replayed(Unauthorized):
    """401: this signature was already accepted within the window.

    ``device`` is who signed it (a ``Principal``, the signature verified) and ``signature`` the
    signature: a request whose retry key makes it run once whoever sends it may still go on.
    """

    def __init__(self, message: str, *, device: object = None, signature: str = "", **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.device = device
        self.signature = signature


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class RequestTimeout(ApiError):
    status = 408
    code = "timeout"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class KeyReused(ApiError):
    status = 409
    code = "idempotency_key_reused"


class UnsupportedMedia(ApiError):
    status = 415
    code = "unsupported_media_type"


class NotImplementedCoding(ApiError):
    """501: RFC 9112 (section 6.1) answers a transfer coding the server does not understand so."""

    status = 501
    code = "not_implemented"


class AllRecordsInvalid(ApiError):
    status = 422
    code = "invalid_records"

    def __init__(self, message: str, errors: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.errors = errors


class RateLimited(ApiError):
    status = 429
    code = "rate_limited"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"


class CannotPersist(Unavailable):
    """503: this worker's WAL cannot take records (full, its disk full, failed). The connection is
    closed, so the retry connects again and can reach a sibling worker (or, behind the load
    balancer, another instance) that has room, instead of asking this one on a kept-alive
    connection until its WAL drains."""

    closes_connection = True


class AdminError(ApiError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
