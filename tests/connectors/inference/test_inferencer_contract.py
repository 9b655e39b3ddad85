"""The contract every ``Inferencer`` keeps, run against each backend.

Backends: the embedded model (``LocalModelInferencer``), an ``InferencePool`` over it, and Triton
(``TritonInferencer`` over gRPC and HTTP, against the real PyTriton server of
``tests/fixtures/triton_fleet.py``; marked ``triton``). The contract:

- the same scores as the reference model (``models.anomaly``) for the same input, within 1e-6, and
  the labels the model's threshold gives them;
- n rows in, n float32 scores and n labels out, named by model, version and endpoint;
- an empty batch is answered with an empty output, without an error;
- after ``start`` and ``warm_up`` the backend reports itself ready, and warming it again is harmless;
- failures are ``connectors.errors`` kinds: features of the wrong width or rank are a
  ``PermanentError``; an unreachable endpoint (remote backends only: the embedded model has none)
  answers not ready and fails with a ``TransientError`` that is not throttling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from connectors.errors import PermanentError, ThrottledError, TransientError
from connectors.inference.base import Inferencer
from connectors.inference.local_model import LocalModelInferencer
from connectors.inference.models.anomaly import DEFAULT_WEIGHTS_PATH, LABELS, MODEL_NAME, AnomalyModel
from connectors.inference.models.train_anomaly_model import generate
from connectors.inference.pool import InferencePool

BACKENDS = [
    "local",
    "pool",
    pytest.param("triton-grpc", marks=pytest.mark.triton),
    pytest.param("triton-http", marks=pytest.mark.triton),
]
REMOTE = ["triton-grpc", "triton-http", "pool-of-triton"]


def _rows(n: int, seed: int = 7) -> np.ndarray:
    return generate(np.random.default_rng(seed), n)[0].astype(np.float32)


def _triton(protocol: str, url: str):
    from connectors.inference.triton import TritonInferencer, TritonSettings  # the `triton` extra

    return TritonInferencer(TritonSettings(url=url, protocol=protocol, name=f"contract-{protocol}"))


def _build(kind: str, request: pytest.FixtureRequest) -> Inferencer:
    if kind == "local":
        return LocalModelInferencer()
    if kind == "pool":
        return InferencePool([LocalModelInferencer()], name="pool")
    protocol = kind.removeprefix("triton-")
    return _triton(protocol, request.getfixturevalue("primary").url(protocol))


@pytest.fixture(params=BACKENDS)
async def inferencer(request: pytest.FixtureRequest) -> AsyncIterator[Inferencer]:
    backend = _build(request.param, request)
    await backend.start()
    # The lifecycle every caller follows (the pool warms an endpoint before its first live batch):
    # TritonInferencer learns the model's max_batch_size here, and splits larger calls after it.
    await backend.warm_up()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture(scope="module")
def reference() -> AnomalyModel:
    return AnomalyModel.load(DEFAULT_WEIGHTS_PATH)


def test_implements_the_protocol(inferencer: Inferencer) -> None:
    assert isinstance(inferencer, Inferencer)
    assert inferencer.name


async def test_ready_after_start_and_warm_up(inferencer: Inferencer) -> None:
    assert await inferencer.ready()
    await inferencer.warm_up()  # again: warming a warm backend is harmless
    assert await inferencer.ready()


async def test_scores_match_the_reference_model(inferencer: Inferencer, reference: AnomalyModel) -> None:
    rows = _rows(256)
    rows[::17] *= 25.0  # far outside the training range: some rows are anomalies
    out = await inferencer.infer(rows)
    expected = reference.scores(rows)
    np.testing.assert_allclose(out.scores, expected, rtol=0, atol=1e-6)
    assert list(out.labels) == reference.labels(expected).tolist()
    assert set(out.labels) == set(LABELS)


# 1500: more than the Triton model's max_batch_size (1024), so TritonInferencer splits the call.
@pytest.mark.parametrize("n", [1, 7, 1500])
async def test_n_rows_in_n_scores_and_labels_out(inferencer: Inferencer, reference: AnomalyModel, n: int) -> None:
    out = await inferencer.infer(_rows(n, seed=n))
    assert out.scores.shape == (n,) and out.scores.dtype == np.float32
    assert len(out.labels) == n and set(out.labels) <= set(LABELS)
    assert (out.model, out.version) == (MODEL_NAME, reference.version)
    assert out.endpoint
    assert out.latency_ms >= 0


async def test_an_empty_batch_gives_an_empty_output(inferencer: Inferencer) -> None:
    out = await inferencer.infer(np.zeros((0, 8), dtype=np.float32))
    assert out.scores.shape == (0,) and list(out.labels) == []


@pytest.mark.parametrize("shape", [(3, 5), (3, 9), (8,)])
async def test_features_of_the_wrong_shape_are_permanent_errors(inferencer: Inferencer, shape) -> None:
    with pytest.raises(PermanentError):
        await inferencer.infer(np.zeros(shape, dtype=np.float32))
    assert await inferencer.ready()  # a bad request leaves the backend usable
    assert len((await inferencer.infer(_rows(2))).scores) == 2


@pytest.mark.parametrize("kind", REMOTE)
async def test_an_unreachable_endpoint_is_not_ready_and_fails_transiently(kind: str, unused_tcp_port: int) -> None:
    pytest.importorskip("tritonclient")
    url = f"127.0.0.1:{unused_tcp_port}"  # nothing listens there: connection refused
    if kind == "pool-of-triton":
        backend: Inferencer = InferencePool([_triton("grpc", url)], name="pool")
    else:
        backend = _triton(kind.removeprefix("triton-"), url)
    await backend.start()
    try:
        assert not await backend.ready()
        with pytest.raises(TransientError) as caught:
            await backend.infer(_rows(2), timeout_secs=2.0)
        assert not isinstance(caught.value, ThrottledError)
    finally:
        await backend.close()
