"""The botocore / aiohttp error translation every AWS connector goes through."""

from __future__ import annotations

import asyncio

import botocore.exceptions as bce
import pytest

from connectors.aws import translate
from connectors.errors import PermanentError, ThrottledError, TransientError


def client_error(code: str, status: int) -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    ("exc", "expected", "congestion"),
    [
        (client_error("SlowDown", 503), ThrottledError, True),
        (client_error("ThrottlingException", 400), ThrottledError, True),
        (client_error("ServiceUnavailable", 503), ThrottledError, True),
        (client_error("InternalError", 500), TransientError, False),
        (client_error("BadGateway", 502), TransientError, False),
        (client_error("RequestTimeout", 400), TransientError, False),
        (client_error("AccessDenied", 403), PermanentError, False),
        (client_error("NoSuchBucket", 404), PermanentError, False),
        (bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), TransientError, False),
        (bce.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), TransientError, True),
        (bce.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), TransientError, True),
        (asyncio.TimeoutError(), TransientError, True),
        (bce.NoCredentialsError(), PermanentError, False),
    ],
)
def test_translation(exc: BaseException, expected: type, congestion: bool) -> None:
    error = translate.translate(exc, endpoint="s3")
    assert type(error) is expected
    assert error.endpoint == "s3"
    assert translate.is_congestion(exc) is congestion
