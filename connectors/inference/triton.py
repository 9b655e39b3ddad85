"""``TritonInferencer``: a Triton (KServe v2) endpoint over ``tritonclient``'s asyncio gRPC or HTTP client.

What it does beyond a bare client:

- **Readiness** through the KServe v2 endpoints: server live, server ready, model ready (gRPC
  ``ServerLive``/``ServerReady``/``ModelReady``, or HTTP ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{model}/ready``). An unreachable server is "not ready", never an exception.
- **Metadata check** before the first batch: the model has the configured FP32 ``[-1, k]`` input and
  the score (FP32) and label (BYTES) outputs, so a wrong model fails loudly once instead of on every
  batch. ``max_batch_size`` is read from the model config, and larger calls are split.
- **Warm-up**: one real single-row inference, so lazy initialisation happens before live traffic.
- **Timeouts**: every call is bounded by ``client_timeout_secs`` (or the caller's ``timeout_secs``).
- **Errors** from ``tritonclient``, grpc and aiohttp are translated here, once, by ``translate_error``:

    ThrottledError   UNAVAILABLE / RESOURCE_EXHAUSTED, HTTP 503 / 429, "Exceeds maximum queue size"
    TransientError   timeouts, connection refused/reset/closed, INTERNAL / HTTP 5xx from the model
    PermanentError   INVALID_ARGUMENT / NOT_FOUND / HTTP 4xx, model metadata that does not match

The client is created in ``start`` (inside the running event loop, where both ``grpc.aio`` channels and
aiohttp sessions must be created) and closed in ``close``. Only the chosen protocol's client module is
imported, since each costs 0.1-0.3 s at start-up.
"""

from __future__ import annotations

import asyncio
import functools
import time
import typing
from typing import Annotated, Any, Literal

import aiohttp
import msgspec
import numpy as np
from msgspec import Meta
from tritonclient.utils import InferenceServerException

from connectors.errors import ConnectorError, PermanentError, ThrottledError, TransientError
from connectors.inference.base import InferenceOutput

# gRPC UNAVAILABLE covers both "the server is shedding load" and "the transport is down"; the details
# text is the only way to tell them apart. These fragments come from grpc core's transport errors.
_TRANSPORT_MARKERS = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "connection aborted",
    "socket closed",
    "broken pipe",
    "goaway",
    "end of tcp stream",
    "network is unreachable",
    "dns resolution failed",
    "keepalive watchdog",
    "handshake",
    "connections to all backends failing",
)
_THROTTLE_MARKERS = ("exceeds maximum queue size", "request timeout expired")
_THROTTLE_GRPC = {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
_PERMANENT_GRPC = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "FAILED_PRECONDITION",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
}


def translate_error(exc: BaseException, endpoint: str) -> ConnectorError:
    """Map an exception raised by ``tritonclient`` (gRPC or HTTP), grpc or aiohttp to ours."""
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransientError(f"{endpoint}: timed out", endpoint=endpoint)
    if isinstance(exc, InferenceServerException):
        return _translate_server_exception(exc, endpoint)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return TransientError(f"{endpoint}: connection error: {exc!r}", endpoint=endpoint)
    return TransientError(f"{endpoint}: unexpected client error: {exc!r}", endpoint=endpoint)


def _translate_server_exception(exc: InferenceServerException, endpoint: str) -> ConnectorError:
    status = (exc.status() or "").strip()
    message = exc.message() or ""
    text = f"{endpoint}: {status or 'client'}: {message}"
    lowered = message.lower()
    code = status.removeprefix("StatusCode.")  # grpc statuses arrive as "StatusCode.UNAVAILABLE"
    if any(marker in lowered for marker in _THROTTLE_MARKERS):
        return ThrottledError(text, endpoint=endpoint)
    if code.isdigit():  # HTTP status
        http = int(code)
        if http in (429, 503):
            return ThrottledError(text, endpoint=endpoint)
        if http == 408 or http >= 500:
            return TransientError(text, endpoint=endpoint)
        return PermanentError(text, endpoint=endpoint)
    if code == "UNAVAILABLE" and any(marker in lowered for marker in _TRANSPORT_MARKERS):
        return TransientError(text, endpoint=endpoint)
    if code in _THROTTLE_GRPC:
        return ThrottledError(text, endpoint=endpoint)
    if code in _PERMANENT_GRPC:
        return PermanentError(text, endpoint=endpoint)
    if not status:
        # Raised by the client library itself before sending (bad argument, wrong dtype): a bug or a
        # misconfiguration, which retrying cannot fix.
        return PermanentError(text, endpoint=endpoint)
    return TransientError(text, endpoint=endpoint)  # INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, CANCELLED


class TritonSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One Triton endpoint and the model it serves.

    The constraints are the fields' ``Meta`` annotations. msgspec checks them when it decodes a
    section; ``__post_init__`` checks them for a struct built in code too, so a bad value raises a
    ``ValueError`` (``msgspec.ValidationError``) either way.
    """

    # host:port, no scheme (the gRPC port for grpc, the HTTP port for http)
    url: Annotated[str, Meta(pattern=r"^(?!.*://)", description="host:port without a scheme")]
    protocol: Literal["grpc", "http"] = "grpc"
    model: str = "telemetry_anomaly"
    model_version: str = ""  # "" lets the server pick its policy's version
    n_features: Annotated[int, Meta(ge=1)] = 8
    input_name: str = "features"
    score_output: str = "score"
    label_output: str = "label"
    client_timeout_secs: Annotated[float, Meta(gt=0)] = 1.0  # one inference call, end to end
    readiness_timeout_secs: Annotated[float, Meta(gt=0)] = 1.0  # each readiness / metadata request
    http_conn_limit: int = 64
    name: str = ""  # how logs, metrics and errors name it; default "<protocol>://<url>"

    def __post_init__(self) -> None:
        for field, annotation in _field_types().items():
            try:
                msgspec.convert(getattr(self, field), annotation)
            except msgspec.ValidationError as exc:
                raise msgspec.ValidationError(f"{exc} - at `{field}`") from None

    @property
    def endpoint_name(self) -> str:
        return self.name or f"{self.protocol}://{self.url}"


@functools.cache
def _field_types() -> dict[str, Any]:
    """Each ``TritonSettings`` field and its annotation, ``Meta`` constraints included."""
    hints = typing.get_type_hints(TritonSettings, include_extras=True)
    return {name: hints[name] for name in TritonSettings.__struct_fields__}


class TritonInferencer:
    """Implements ``connectors.inference.base.Inferencer`` against one Triton server."""

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self.name = settings.endpoint_name
        self._client: Any = None
        self._module: Any = None  # tritonclient.grpc or tritonclient.http
        self._checked = False
        self._max_batch = 0  # 0: unknown or no limit

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        s = self.settings
        if s.protocol == "grpc":
            import tritonclient.grpc as module
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(url=s.url)
        else:
            import tritonclient.http as module
            import tritonclient.http.aio as aio

            # The session-wide timeout is only a backstop; each call has its own, shorter one.
            backstop = 2.0 * max(s.client_timeout_secs, s.readiness_timeout_secs) + 1.0
            self._client = aio.InferenceServerClient(
                url=s.url, conn_limit=s.http_conn_limit, conn_timeout=backstop
            )
        self._module = module

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- readiness and metadata ----------------------------------------------------------------

    def _grpc_only(self, **extra) -> dict:
        """Keyword arguments only the gRPC client takes (its own deadline, JSON answers); none for HTTP."""
        return {"client_timeout": self.settings.readiness_timeout_secs, **extra} if self.settings.protocol == "grpc" else {}

    async def ready(self) -> bool:
        """Server live, server ready and model ready; False (never an error) when unreachable."""
        client = self._require_client()
        s = self.settings
        kw = self._grpc_only()
        try:
            async with asyncio.timeout(s.readiness_timeout_secs):
                return (
                    await client.is_server_live(**kw)
                    and await client.is_server_ready(**kw)
                    and await client.is_model_ready(s.model, s.model_version, **kw)
                )
        except (InferenceServerException, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    async def check_metadata(self) -> None:
        """Verify the model's inputs and outputs match the settings; PermanentError if they do not."""
        client = self._require_client()
        s = self.settings
        kw = self._grpc_only(as_json=True)
        try:
            async with asyncio.timeout(s.readiness_timeout_secs):
                meta = await client.get_model_metadata(s.model, s.model_version, **kw)
                config = await client.get_model_config(s.model, s.model_version, **kw)
                if s.protocol == "grpc":
                    config = config.get("config", {})  # gRPC's JSON wraps it; HTTP's answer is the config
        except Exception as exc:  # noqa: BLE001 - every client failure is translated
            raise translate_error(exc, self.name) from exc
        problems = _metadata_problems(meta, s)
        if problems:
            detail = "; ".join(problems)
            raise PermanentError(f"{self.name}: model {s.model!r} does not match: {detail}", endpoint=self.name)
        # gRPC's JSON form renders int64 fields as strings.
        self._max_batch = int(config.get("max_batch_size", 0) or 0)
        self._checked = True

    async def warm_up(self) -> None:
        """Check metadata (once) and run one single-row inference."""
        if not self._checked:
            await self.check_metadata()
        await self.infer(np.zeros((1, self.settings.n_features), dtype=np.float32))

    # -- inference -----------------------------------------------------------------------------

    async def infer(self, features: np.ndarray, *, timeout_secs: float | None = None) -> InferenceOutput:
        """Score float32 ``[n, k]`` features; ``timeout_secs`` bounds the whole call."""
        s = self.settings
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != s.n_features:
            raise PermanentError(
                f"{self.name}: expected features [n, {s.n_features}], got {list(x.shape)}", endpoint=self.name
            )
        timeout = s.client_timeout_secs if timeout_secs is None else timeout_secs
        if timeout <= 0:
            raise TransientError(f"{self.name}: no time left for the call", endpoint=self.name)
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        chunk = self._max_batch if self._max_batch > 0 else max(1, len(x))
        scores: list[np.ndarray] = []
        labels: list[str] = []
        version = s.model_version
        for begin in range(0, len(x), chunk):  # no rows: no call (Triton rejects empty tensors)
            part = x[begin : begin + chunk]
            part_scores, part_labels, version = await self._infer_once(part, deadline - time.monotonic())
            scores.append(part_scores)
            labels.extend(part_labels)
        return InferenceOutput(
            scores=np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32),
            labels=labels,
            model=s.model,
            version=version,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            endpoint=self.name,
        )

    async def _infer_once(self, x: np.ndarray, timeout: float) -> tuple[np.ndarray, list[str], str]:
        client = self._require_client()
        s = self.settings
        module = self._module
        if timeout <= 0:
            raise TransientError(f"{self.name}: timed out", endpoint=self.name)
        tensor = module.InferInput(s.input_name, list(x.shape), "FP32")
        try:
            if s.protocol == "grpc":
                tensor.set_data_from_numpy(x)
                outputs = [module.InferRequestedOutput(s.score_output), module.InferRequestedOutput(s.label_output)]
                # gRPC carries the deadline to the server; the asyncio bound is a slightly later backstop.
                async with asyncio.timeout(timeout + 0.05):
                    result = await client.infer(
                        s.model, [tensor], model_version=s.model_version, outputs=outputs, client_timeout=timeout
                    )
                response_version = result.get_response().model_version
            else:
                tensor.set_data_from_numpy(x, binary_data=True)
                outputs = [
                    module.InferRequestedOutput(s.score_output, binary_data=True),
                    module.InferRequestedOutput(s.label_output, binary_data=True),
                ]
                async with asyncio.timeout(timeout):
                    result = await client.infer(s.model, [tensor], model_version=s.model_version, outputs=outputs)
                response_version = result.get_response().get("model_version", "")
            raw_scores = result.as_numpy(s.score_output)
            raw_labels = result.as_numpy(s.label_output)
        except Exception as exc:  # noqa: BLE001 - CancelledError is not an Exception, so cancellation passes through
            raise translate_error(exc, self.name) from exc
        if raw_scores is None or raw_labels is None:
            missing = f"{s.score_output!r} or {s.label_output!r}"
            raise PermanentError(f"{self.name}: the response lacks {missing}", endpoint=self.name)
        scores = np.asarray(raw_scores, dtype=np.float32).reshape(-1)
        labels = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(raw_labels).reshape(-1)]
        if len(scores) != len(x) or len(labels) != len(x):
            raise PermanentError(
                f"{self.name}: {len(x)} rows in, {len(scores)} scores and {len(labels)} labels out", endpoint=self.name
            )
        return scores, labels, str(response_version or s.model_version)

    def _require_client(self) -> Any:
        if self._client is None:
            raise RuntimeError(f"{self.name}: call start() first")
        return self._client


def _metadata_problems(meta: dict[str, Any], s: TritonSettings) -> list[str]:
    problems = []
    inputs = {t.get("name"): t for t in meta.get("inputs", [])}
    outputs = {t.get("name"): t for t in meta.get("outputs", [])}
    tensor = inputs.get(s.input_name)
    if tensor is None:
        problems.append(f"no input {s.input_name!r} (inputs: {sorted(inputs)})")
    else:
        shape = [int(d) for d in tensor.get("shape", [])]
        if tensor.get("datatype") != "FP32":
            problems.append(f"input {s.input_name!r} is {tensor.get('datatype')}, not FP32")
        if len(shape) != 2 or shape[1] not in (-1, s.n_features):
            problems.append(f"input {s.input_name!r} has shape {shape}, not [-1, {s.n_features}]")
    for name, datatype in ((s.score_output, "FP32"), (s.label_output, "BYTES")):
        tensor = outputs.get(name)
        if tensor is None:
            problems.append(f"no output {name!r} (outputs: {sorted(outputs)})")
        elif tensor.get("datatype") != datatype:
            problems.append(f"output {name!r} is {tensor.get('datatype')}, not {datatype}")
    return problems
