"""``InferencePool``: failover across several inference endpoints, itself an ``Inferencer``.

For each call the pool:

1. picks, among endpoints whose circuit breaker lets traffic through and that this call has not
   tried yet, the one with the earliest predicted completion (``predict_completion(endpoint, n)``;
   the default is in-flight based: ``(in_flight + 1) x smoothed latency``; the batching library's
   service-time model can be plugged in instead). Ties go to the endpoint listed first;
2. if that endpoint has been idle for ``idle_after_secs`` (or has never served, or failed last time),
   checks its readiness (KServe v2 server and model ready) and warms it up with one real inference
   before sending live traffic; concurrent calls share that one check;
3. sends the call; on an endpoint failure (``TransientError``: timeout, connection lost, server error)
   or backpressure (``ThrottledError``) it fails over to the next endpoint, if the ``RetryBudget``
   allows one more retry and the caller's ``timeout_s`` has time left. A ``PermanentError`` (a request
   that no endpoint could serve) is raised at once;
4. raises ``NoEndpointError`` (a ``TransientError``) when no endpoint can take the call, naming each
   endpoint and why; its ``retry_after`` says when the first open breaker will admit a probe.

Idle tracking: the pool sends nothing on its own (no keep-alive pings), so an idle endpoint is left
alone to cool down or scale in; ``status()`` reports each endpoint's idle seconds for metrics and for
the warmness controller. Breakers count only endpoint failures: backpressure and bad requests say
nothing about an endpoint's health.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from connectors.breaker import BreakerSettings, BreakerState, CircuitBreaker, Permit
from connectors.errors import PermanentError, ThrottledError, TransientError
from connectors.inference import Inferencer, InferenceOutput
from connectors.retry_budget import RetryBudget

PredictCompletion = Callable[[str, int], float]

# Smoothed latency before an endpoint has answered anything; only the order of predictions matters.
_LATENCY_PRIOR_S = 0.005
_EWMA_ALPHA = 0.2


class NoEndpointError(TransientError):
    """No endpoint can take the call now: every breaker is open, or every endpoint tried has failed."""

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message, endpoint="")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """A snapshot of one endpoint, for metrics and logs."""

    name: str
    breaker: BreakerState
    in_flight: int
    warm: bool
    idle_secs: float  # since the last successful call (or since the pool started)
    calls: int
    failures: int
    throttled: int
    latency_ewma_s: float


class _Endpoint:
    def __init__(self, inferencer: Inferencer, breaker: CircuitBreaker, now: float) -> None:
        self.inferencer = inferencer
        self.name = inferencer.name
        self.breaker = breaker
        self.in_flight = 0
        self.warm = False
        self.last_success = now
        self.latency_ewma_s = _LATENCY_PRIOR_S
        self.calls = 0
        self.failures = 0
        self.throttled = 0
        self.warming: asyncio.Task[bool] | None = None
        self.last_error = ""


class InferencePool:
    """Routes each call to the endpoint predicted to finish it first, failing over on errors."""

    def __init__(
        self,
        endpoints: Sequence[Inferencer],
        *,
        name: str = "pool",
        breaker_settings: BreakerSettings | None = None,
        retry_budget: RetryBudget | None = None,
        predict_completion: PredictCompletion | None = None,
        idle_after_secs: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoints:
            raise ValueError("an inference pool needs at least one endpoint")
        names = [e.name for e in endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint names must be unique: {names}")
        if idle_after_secs <= 0:
            raise ValueError("idle_after_secs must be > 0")
        self.name = name
        self._clock = clock
        self._budget = retry_budget if retry_budget is not None else RetryBudget(clock=clock)
        self._idle_after = idle_after_secs
        now = clock()
        self._endpoints = [
            _Endpoint(e, CircuitBreaker(e.name, breaker_settings, clock=clock), now) for e in endpoints
        ]
        self._by_name = {e.name: e for e in self._endpoints}
        self._predict = predict_completion or self.predict_in_flight

    # -- Inferencer ----------------------------------------------------------------------------

    async def start(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.inferencer.start()

    async def ready(self) -> bool:
        """True when at least one endpoint whose breaker admits traffic reports ready."""
        for endpoint in self._endpoints:
            if endpoint.breaker.allows() and await endpoint.inferencer.ready():
                return True
        return False

    async def warm_up(self) -> None:
        """Check and warm every endpoint now (e.g. at start-up), concurrently."""
        await asyncio.gather(*(self._ensure_warm(e) for e in self._endpoints))

    async def close(self) -> None:
        for endpoint in self._endpoints:
            if endpoint.warming is not None and not endpoint.warming.done():
                endpoint.warming.cancel()
        for endpoint in self._endpoints:
            await endpoint.inferencer.close()

    async def infer(self, features: np.ndarray, *, timeout_s: float | None = None) -> InferenceOutput:
        """Score ``features`` on the best available endpoint, failing over on errors."""
        n = int(np.shape(features)[0])
        deadline = None if timeout_s is None else self._clock() + timeout_s
        self._budget.record_request()
        tried: dict[str, str] = {}
        last_error: TransientError | None = None
        only_throttled = True  # every endpoint that answered shed load: report backpressure as such
        while True:
            choice = self._choose(n, exclude=tried)
            if choice is None:
                if isinstance(last_error, ThrottledError) and only_throttled:
                    raise last_error
                raise self._no_endpoint(tried) from last_error
            endpoint, permit = choice
            if last_error is not None and not self._budget.try_withdraw():
                endpoint.breaker.release(permit)
                raise last_error
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                endpoint.breaker.release(permit)
                raise TransientError(f"{self.name}: no time left after trying {sorted(tried)}") from last_error

            if self._needs_warming(endpoint):
                try:
                    warm = await self._ensure_warm(endpoint)
                except asyncio.CancelledError:
                    endpoint.breaker.release(permit)  # a cancelled caller must not hold the probe slot
                    raise
                if not warm:
                    # Nothing was sent; the warm-up path already told the breaker.
                    endpoint.breaker.release(permit)
                    tried[endpoint.name] = f"not ready ({endpoint.last_error})"
                    continue

            endpoint.in_flight += 1
            started = self._clock()
            try:
                output = await endpoint.inferencer.infer(features, timeout_s=remaining)
            except ThrottledError as exc:
                endpoint.breaker.release(permit)
                endpoint.throttled += 1
                tried[endpoint.name] = f"throttled: {exc}"
                last_error = exc
                continue
            except PermanentError:
                endpoint.breaker.release(permit)
                raise
            except TransientError as exc:
                self._failed(endpoint, permit, exc)
                tried[endpoint.name] = f"failed: {exc}"
                last_error, only_throttled = exc, False
                continue
            except asyncio.CancelledError:
                endpoint.breaker.release(permit)
                raise
            except Exception as exc:  # noqa: BLE001 - an inferencer broke its contract: treat as an endpoint failure
                wrapped = TransientError(f"{endpoint.name}: {exc!r}", endpoint=endpoint.name)
                self._failed(endpoint, permit, wrapped)
                tried[endpoint.name] = f"failed: {exc!r}"
                last_error, only_throttled = wrapped, False
                continue
            finally:
                endpoint.in_flight -= 1
            endpoint.breaker.record_success(permit)
            self._succeeded(endpoint, self._clock() - started)
            return output

    # -- routing -------------------------------------------------------------------------------

    def predict_in_flight(self, name: str, n: int) -> float:
        """Default prediction: seconds until a call of ``n`` rows would finish, from in-flight calls."""
        endpoint = self._by_name[name]
        return (endpoint.in_flight + 1) * endpoint.latency_ewma_s

    def _choose(self, n: int, exclude: dict[str, str]) -> tuple[_Endpoint, Permit] | None:
        candidates = [
            (self._predict(e.name, n), index, e)
            for index, e in enumerate(self._endpoints)
            if e.name not in exclude and e.breaker.allows()
        ]
        for _, _, endpoint in sorted(candidates, key=lambda c: (c[0], c[1])):
            permit = endpoint.breaker.acquire()
            if permit is not None:
                return endpoint, permit
        return None

    def _no_endpoint(self, tried: dict[str, str]) -> NoEndpointError:
        reasons = []
        waits = []
        for e in self._endpoints:
            if e.name in tried:
                reasons.append(f"{e.name}: {tried[e.name]}")
                continue
            state = e.breaker.state
            if state is BreakerState.OPEN:
                wait = e.breaker.retry_after()
                waits.append(wait)
                reasons.append(f"{e.name}: breaker open, probe in {wait:.1f} s")
            else:
                reasons.append(f"{e.name}: breaker {state}, probe already in flight")
        return NoEndpointError(
            f"{self.name}: no inference endpoint can take the call ({'; '.join(reasons)})",
            retry_after=min(waits) if waits else 0.0,
        )

    # -- warmness ------------------------------------------------------------------------------

    def _needs_warming(self, endpoint: _Endpoint) -> bool:
        return not endpoint.warm or self._clock() - endpoint.last_success >= self._idle_after

    async def _ensure_warm(self, endpoint: _Endpoint) -> bool:
        """Readiness check plus one warm-up inference, shared by every call that arrives meanwhile."""
        if endpoint.warming is None or endpoint.warming.done():
            endpoint.warm = False
            endpoint.warming = asyncio.create_task(self._warm(endpoint), name=f"warm-up {endpoint.name}")
        # shield: a caller that is cancelled must not cancel the warm-up the others are waiting for.
        return await asyncio.shield(endpoint.warming)

    async def _warm(self, endpoint: _Endpoint) -> bool:
        try:
            if not await endpoint.inferencer.ready():
                endpoint.last_error = "readiness check failed"
                endpoint.breaker.trip()
                return False
            await endpoint.inferencer.warm_up()
        except ThrottledError as exc:
            endpoint.last_error = f"throttled during warm-up: {exc}"
            return False  # alive but busy: no breaker penalty, the next call checks again
        except Exception as exc:  # noqa: BLE001 - a misconfigured endpoint is as unusable as a dead one
            endpoint.last_error = f"warm-up failed: {exc}"
            endpoint.failures += 1
            endpoint.breaker.trip()
            return False
        endpoint.warm = True
        endpoint.last_success = self._clock()
        endpoint.last_error = ""
        return True

    # -- bookkeeping ---------------------------------------------------------------------------

    def _succeeded(self, endpoint: _Endpoint, latency_s: float) -> None:
        endpoint.calls += 1
        endpoint.last_success = self._clock()
        endpoint.latency_ewma_s += _EWMA_ALPHA * (latency_s - endpoint.latency_ewma_s)

    def _failed(self, endpoint: _Endpoint, permit: Permit, exc: Exception) -> None:
        endpoint.breaker.record_failure(permit)
        endpoint.failures += 1
        endpoint.warm = False  # check readiness again before the next live batch
        endpoint.last_error = str(exc)

    def status(self) -> list[EndpointStatus]:
        now = self._clock()
        return [
            EndpointStatus(
                name=e.name,
                breaker=e.breaker.state,
                in_flight=e.in_flight,
                warm=e.warm and now - e.last_success < self._idle_after,
                idle_secs=max(0.0, now - e.last_success),
                calls=e.calls,
                failures=e.failures,
                throttled=e.throttled,
                latency_ewma_s=e.latency_ewma_s,
            )
            for e in self._endpoints
        ]

    def breaker(self, name: str) -> CircuitBreaker:
        return self._by_name[name].breaker
