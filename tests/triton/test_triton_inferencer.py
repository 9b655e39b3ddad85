"""TritonInferencer against real PyTriton servers, over gRPC and HTTP."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from connectors.errors import PermanentError, ThrottledError, TransientError
from connectors.inference.local_model import LocalModelInferencer
from connectors.inference.models.anomaly import MODEL_NAME
from connectors.inference.models.train_anomaly_model import generate
from connectors.inference.triton import TritonInferencer

pytestmark = pytest.mark.triton
PROTOCOLS = ["grpc", "http"]


def _rows(n: int, seed: int) -> np.ndarray:
    return generate(np.random.default_rng(seed), n)[0].astype(np.float32)


async def _started(settings) -> TritonInferencer:
    inferencer = TritonInferencer(settings)
    await inferencer.start()
    return inferencer


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_concurrent_calls_through_the_dynamic_batcher(primary, protocol):
    triton = await _started(primary.settings(protocol))
    try:
        await triton.check_metadata()
        config = await triton._client.get_model_config(MODEL_NAME, **({"as_json": True} if protocol == "grpc" else {}))
        config = config.get("config", config)
        assert "dynamic_batching" in config  # Triton may merge these concurrent calls into one execution
        batches = [_rows(n, seed=n) for n in (1, 3, 8, 17, 32, 64, 5, 2)]
        outs = await asyncio.gather(*(triton.infer(b) for b in batches))
        local = LocalModelInferencer()
        for batch, out in zip(batches, outs):
            np.testing.assert_allclose(out.scores, (await local.infer(batch)).scores, atol=1e-6)
    finally:
        await triton.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unknown_model_is_not_ready_and_fails_permanently(primary, protocol):
    triton = await _started(primary.settings(protocol, model="no_such_model"))
    try:
        assert not await triton.ready()
        with pytest.raises(PermanentError, match="no_such_model"):
            await triton.warm_up()
    finally:
        await triton.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_metadata_mismatch_is_permanent(primary, protocol):
    triton = await _started(primary.settings(protocol, n_features=7))
    try:
        with pytest.raises(PermanentError, match=r"shape \[-1, 8\], not \[-1, 7\]"):
            await triton.check_metadata()
        # Sent anyway, the server itself rejects the shape (INVALID_ARGUMENT / HTTP 400).
        with pytest.raises(PermanentError):
            await triton.infer(np.zeros((2, 7), dtype=np.float32))
    finally:
        await triton.close()
    triton = await _started(primary.settings(protocol, label_output="class"))
    try:
        with pytest.raises(PermanentError, match="no output 'class'"):
            await triton.check_metadata()
    finally:
        await triton.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_failing_model_errors_are_transient(failing_server, protocol):
    triton = await _started(failing_server.settings(protocol))
    try:
        assert await triton.ready()  # the server is up; its model fails every call
        with pytest.raises(TransientError, match="injected failure") as caught:
            await triton.infer(_rows(4, seed=1))
        assert not isinstance(caught.value, ThrottledError)
        assert caught.value.endpoint == f"failing-{protocol}"
    finally:
        await triton.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_slow_model_times_out_as_transient(slow_server, protocol):
    triton = await _started(slow_server.settings(protocol, client_timeout_secs=0.1))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransientError) as caught:
            await triton.infer(_rows(2, seed=2))
        assert not isinstance(caught.value, ThrottledError)
        assert asyncio.get_running_loop().time() - started < 1.0  # bounded by the timeout, not by the model
    finally:
        await triton.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_full_queue_is_throttling(slow_server, protocol):
    # The slow model sleeps 300 ms per execution and its queue holds 2 requests: of 8 concurrent
    # calls, the ones that find the queue full are rejected with "Exceeds maximum queue size".
    triton = await _started(slow_server.settings(protocol, client_timeout_secs=10.0))
    try:
        x = _rows(3, seed=3)
        results = await asyncio.gather(*(triton.infer(x) for _ in range(8)), return_exceptions=True)
        throttled = [r for r in results if isinstance(r, ThrottledError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        others = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ThrottledError)]
        assert not others, others
        assert throttled and served
        assert "Exceeds maximum queue size" in str(throttled[0])
        expected = (await LocalModelInferencer().infer(x)).scores
        for out in served:
            np.testing.assert_allclose(out.scores, expected, atol=1e-6)
    finally:
        await triton.close()
