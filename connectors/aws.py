"""What every AWS connector shares: client construction and the one place botocore errors are translated.

Credentials always come from the standard AWS chain (environment, shared profile, container or
instance role); no settings struct has a field for them, so a key can never end up in a config file.

Retries are ours, not botocore's: clients are built with a single attempt so that ``RetryPolicy``
and the adaptive concurrency limiter see every throttle and timeout.

Translation (``translate``)::

    ClientError  SlowDown / Throttling* / 429 / 503        -> ThrottledError
                 500, 502, 504, RequestTimeout, BadDigest   -> TransientError
                 anything else (403, 404, 400 ...)          -> PermanentError
    connection refused / reset, endpoint unreachable        -> TransientError
    connect or read timeout                                 -> TransientError (a congestion signal)
    missing credentials, invalid parameters                 -> PermanentError
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra: imported when an AWS connector is first used
    import botocore.exceptions as bce
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

EXTRA_HINT = "the AWS connectors need the `s3` extra: pip install 'edge-gateway[s3]'"


def _botocore_exceptions():
    import botocore.exceptions

    return botocore.exceptions


def sdk_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("aiobotocore") is not None

from connectors.errors import ConnectorError, PermanentError, ThrottledError, TransientError

USER_AGENT_EXTRA = "edge-gateway"

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


def build_session() -> AioSession:
    """A session on the standard credential chain."""
    try:
        from aiobotocore.session import get_session
    except ImportError as exc:
        raise ImportError(EXTRA_HINT) from exc
    return get_session()


def client_config(
    *,
    connect_timeout_secs: float,
    read_timeout_secs: float,
    max_pool_connections: int = 10,
    s3: Mapping[str, Any] | None = None,
) -> AioConfig:
    """An ``AioConfig`` with botocore's own retries off and explicit timeouts."""
    try:
        from aiobotocore.config import AioConfig
    except ImportError as exc:
        raise ImportError(EXTRA_HINT) from exc
    return AioConfig(
        connect_timeout=connect_timeout_secs,
        read_timeout=read_timeout_secs,
        max_pool_connections=max_pool_connections,
        retries={"total_max_attempts": 1},
        # Connectors send the checksums they computed themselves (off the event loop); this stops
        # botocore from computing a second one on the loop.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra=USER_AGENT_EXTRA,
        s3=dict(s3) if s3 else None,
    )


def create_client(session: AioSession, service: str, config: AioConfig, *, region: str, endpoint_url: str) -> Any:
    """``session.create_client`` (an async context manager); empty settings defer to the AWS chain."""
    return session.create_client(service, config=config, **client_kwargs(region=region, endpoint_url=endpoint_url))


def client_kwargs(*, region: str, endpoint_url: str) -> dict[str, Any]:
    """Keyword arguments for ``session.create_client``: empty settings defer to the AWS chain."""
    kwargs: dict[str, Any] = {}
    if region:
        kwargs["region_name"] = region
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    return kwargs


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
    return isinstance(exc, (bce.BotoCoreError, bce.ClientError, aiohttp.ClientError, TimeoutError, OSError))


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
            aiohttp.ClientError,
            OSError,
        ),
    ):
        return TransientError(f"{type(exc).__name__}: {exc}", endpoint=endpoint)
    return PermanentError(f"{type(exc).__name__}: {exc}", endpoint=endpoint)
