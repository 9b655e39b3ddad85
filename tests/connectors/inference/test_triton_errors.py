"""Translation of tritonclient / grpc / aiohttp failures into connectors.errors (no server needed).

The statuses and messages are the ones Triton and the clients produce: gRPC statuses arrive as
"StatusCode.X", HTTP ones as the numeric code. tests/triton/ checks the same mapping against a real
server.
"""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest
from tritonclient.utils import InferenceServerException

from connectors.errors import PermanentError, ThrottledError, TransientError
from connectors.inference.triton import TritonInferencer, TritonSettings, translate_error


def _server(status: str | None, message: str) -> InferenceServerException:
    return InferenceServerException(msg=message, status=status)


@pytest.mark.parametrize(
    "exc, expected",
    [
        (_server("StatusCode.UNAVAILABLE", "Exceeds maximum queue size"), ThrottledError),
        (_server("StatusCode.UNAVAILABLE", "Request timeout expired"), ThrottledError),
        (_server("StatusCode.UNAVAILABLE", "Server not ready"), ThrottledError),
        (_server("StatusCode.RESOURCE_EXHAUSTED", "too many"), ThrottledError),
        (_server("503", "Exceeds maximum queue size"), ThrottledError),
        (_server("429", "slow down"), ThrottledError),
        (_server("400", "Exceeds maximum queue size"), ThrottledError),  # the message wins
        (
            _server(
                "StatusCode.UNAVAILABLE",
                "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                "Failed to connect to remote host: Connection refused",
            ),
            TransientError,
        ),
        (_server("StatusCode.UNAVAILABLE", "Socket closed"), TransientError),
        (_server("StatusCode.UNAVAILABLE", "recvmsg:Connection reset by peer"), TransientError),
        (_server("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded"), TransientError),
        (_server("StatusCode.INTERNAL", "Failed to process the request(s)"), TransientError),
        (_server("StatusCode.CANCELLED", "Locally cancelled by application!"), TransientError),
        (_server("500", "Failed to process the request(s)"), TransientError),
        (_server("502", "bad gateway"), TransientError),
        (_server("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'features'"), PermanentError),
        (_server("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found"), PermanentError),
        (_server("400", "unexpected shape"), PermanentError),
        (_server("404", "Request for unknown model"), PermanentError),
        (_server(None, "got unexpected datatype FP64 from numpy array, expected FP32"), PermanentError),
        (asyncio.TimeoutError(), TransientError),
        (ConnectionRefusedError(111, "refused"), TransientError),
        (aiohttp.ServerDisconnectedError(), TransientError),
        (aiohttp.ClientPayloadError("truncated"), TransientError),
        (RuntimeError("surprise"), TransientError),
    ],
)
def test_translation(exc, expected):
    translated = translate_error(exc, "grpc://h:1")
    assert type(translated) is expected
    assert translated.endpoint == "grpc://h:1"
    assert str(translated).startswith("grpc://h:1: ")


def test_our_own_errors_pass_through():
    err = PermanentError("bad", endpoint="x")
    assert translate_error(err, "y") is err


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "http://h:1"},
        {"url": "h:1", "protocol": "websocket"},
        {"url": "h:1", "client_timeout_secs": 0},
        {"url": "h:1", "n_features": 0},
    ],
)
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        TritonSettings(**kwargs)


def test_settings_decode_like_every_other_section():
    settings = msgspec.convert({"url": "h:8000", "protocol": "http", "client_timeout_secs": 2}, TritonSettings)
    assert settings == TritonSettings(url="h:8000", protocol="http", client_timeout_secs=2.0)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"url": "h:1", "timeout": 1}, TritonSettings)
    with pytest.raises(msgspec.ValidationError, match="n_features"):
        TritonSettings(url="h:1", n_features=0)


def test_endpoint_name_defaults_to_protocol_and_url():
    assert TritonInferencer(TritonSettings(url="h:8001")).name == "grpc://h:8001"
    assert TritonInferencer(TritonSettings(url="h:8000", protocol="http", name="gpu-a")).name == "gpu-a"


async def test_calls_before_start_are_a_programming_error():
    with pytest.raises(RuntimeError, match="start"):
        await TritonInferencer(TritonSettings(url="127.0.0.1:1")).ready()
