"""The one place botocore and aiohttp errors become ``connectors.errors`` kinds.

Every AWS connector's requests pass through ``AwsConnector`` (``connectors.aws.connector``), which
calls ``translate`` on whatever a request raised, so the gateway only ever sees these kinds:

    ClientError  SlowDown / Throttling* / 429 / 503        -> ThrottledError
                 500, 502, 504, RequestTimeout, BadDigest   -> TransientError
                 anything else (403, 404, 400 ...)          -> PermanentError
    connection refused / reset, endpoint unreachable        -> TransientError
    connect or read timeout                                 -> TransientError (a congestion signal)
    missing credentials, invalid parameters                 -> PermanentError
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from connectors.errors import ConnectorError, PermanentError, ThrottledError, TransientError

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra: imported when an AWS connector is first used
    import botocore.exceptions as bce


def _botocore_exceptions():
    import botocore.exceptions

    return botocore.exceptions


def _aiohttp_client_error() -> type[Exception]:
    # Imported when an error is first translated: loading the settings (the supervisor, check-config)
    # must not pay for the HTTP client.
    from aiohttp import ClientError

    return ClientError


# Error codes AWS services use to say "slow down"; S3 sends SlowDown with a 503.
THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "EC2ThrottledException",
    }
)

# Codes that may succeed on retry although their status is not 5xx.
TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "InternalServiceException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "PriorRequestNotComplete",
        # A checksum mismatch means the bytes were damaged in transit; sending them again is the fix.
        "BadDigest",
        "XAmzContentSHA256Mismatch",
        # Rotated or refreshed credentials: the chain fetches new ones on the next attempt.
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "RequestTimeTooSkewed",
        "IDPCommunicationError",
        "ConcurrentModificationException",
    }
)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (``""`` for anything else)."""
    bce = _botocore_exceptions()
    if isinstance(exc, bce.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def cause_code(error: BaseException) -> str:
    """The AWS error code behind a translated error (follows ``__cause__``), ``""`` if none."""
    seen: BaseException | None = error
    while seen is not None:
        code = error_code(seen)
        if code:
            return code
        seen = seen.__cause__
    return ""


def _status(exc: bce.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_vendor_error(exc: BaseException) -> bool:
    """Whether ``translate`` understands this exception (else it is a bug and must propagate)."""
    bce = _botocore_exceptions()
    return isinstance(exc, (bce.BotoCoreError, bce.ClientError, _aiohttp_client_error(), TimeoutError, OSError))


def is_timeout(exc: BaseException) -> bool:
    bce = _botocore_exceptions()
    return isinstance(exc, (bce.ConnectTimeoutError, bce.ReadTimeoutError, TimeoutError, asyncio.TimeoutError))


def is_congestion(exc: BaseException) -> bool:
    """Throttles, 503s and timeouts: signals that the remote side wants less concurrency."""
    bce = _botocore_exceptions()
    if is_timeout(exc):
        return True
    if isinstance(exc, bce.ClientError):
        return error_code(exc) in THROTTLE_CODES or _status(exc) in (429, 503)
    return False


def translate(exc: BaseException, *, endpoint: str = "") -> ConnectorError:
    """Map a botocore / aiohttp exception onto ``connectors.errors``."""
    bce = _botocore_exceptions()
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, bce.ClientError):
        code = error_code(exc)
        status = _status(exc)
        message = f"{code or status}: {exc}"
        if code in THROTTLE_CODES or status in (429, 503):
            return ThrottledError(message, endpoint=endpoint)
        if code in TRANSIENT_CODES or status == 408 or status >= 500:
            return TransientError(message, endpoint=endpoint)
        return PermanentError(message, endpoint=endpoint)
    if isinstance(
        exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.ParamValidationError, bce.NoRegionError)
    ):
        return PermanentError(f"{type(exc).__name__}: {exc}", endpoint=endpoint)
    if is_timeout(exc):
        return TransientError(f"timed out: {type(exc).__name__}: {exc}", endpoint=endpoint)
    if isinstance(
        exc,
        (
            bce.HTTPClientError,  # connection closed, response streaming errors
            bce.ConnectionError,  # endpoint unreachable, connection refused, TLS failures
            bce.CredentialRetrievalError,  # instance metadata briefly unreachable
            bce.FlexibleChecksumError,
            bce.IncompleteReadError,
            _aiohttp_client_error(),
            OSError,
        ),
    ):
        return TransientError(f"{type(exc).__name__}: {exc}", endpoint=endpoint)
    return PermanentError(f"{type(exc).__name__}: {exc}", endpoint=endpoint)
