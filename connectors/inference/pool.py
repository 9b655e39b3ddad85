"""``InferencePool``: failover across several inference endpoints, itself an ``Inferencer``.

For each call the pool:

1. picks, among endpoints whose circuit breaker lets traffic through and that this call has not
   tried yet, the one with the earliest predicted completion (``predict_completion(endpoint, n)``;
   the default is in-flight based: ``(in_flight + 1) x smoothed latency``; the batching library's
   service-time model can be plugged in instead). Ties go to the endpoint listed first;
2. if that endpoint has been idle for ``idle_after_secs`` (or has never served, or failed last time),
   checks its readiness (KServe v2 server and model ready) and warms it up with one real inference
   before sending live traffic; concurrent calls share that one check. An endpoint that answers
   "not ready" is skipped without any breaker penalty (see ``connectors.inference.endpoint_health``) until a
   later readiness check, every 1 to 2 seconds, finds it ready;
3. sends the call; on an endpoint failure (``TransientError``: timeout, connection lost, server error)
   or backpressure (``ThrottledError``) it fails over to the next endpoint, if the ``RetryBudget``
   allows one more retry and the caller's ``timeout_secs`` has time left. A ``PermanentError`` (a request
   that no endpoint could serve) is raised at once;
4. raises ``NoEndpointError`` (a ``TransientError``) when no endpoint can take the call, naming each
   endpoint and why; its ``retry_after`` says when the first open breaker will admit a probe, and
   ``calls_failed`` how many live calls actually failed (0: nothing could be sent at all).

``start`` also starts a monitor task that checks endpoints that are not ready on that schedule (so the
first one to become ready is found without waiting for traffic), notices breakers whose open period
ended, and tells ``on_availability`` listeners whenever the pool goes from "some endpoint can take a
call" to "none can" and back: the gateway's batcher holds records meanwhile instead of failing them.

Idle tracking: the pool sends no keep-alive pings (only readiness checks of endpoints that are not
ready), so an idle endpoint is left alone to cool down or scale in; ``status()`` reports each endpoint's idle seconds for metrics and for
the warmness controller. Breakers count only endpoint failures: backpressure and bad requests say
nothing about an endpoint's health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from connectors.inference.breaker import BreakerSettings, BreakerState, CircuitBreaker, CallPermit
from connectors.inference.endpoint_health import MAX_PROBE_SECS, PROBE_SECS, Health, ProbeSchedule, log, log_change
from connectors.errors import NoEndpointError, PermanentError, ThrottledError, TransientError
from connectors.inference.base import Inferencer, InferenceOutput
from connectors.inference.retry_budget import RetryBudget

PredictCompletion = Callable[[str, int], float]
AvailabilityListener = Callable[[bool], None]

# Smoothed latency before an endpoint has answered anything; only the order of predictions matters.
_LATENCY_PRIOR_S = 0.005
_EWMA_ALPHA = 0.2


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """A snapshot of one endpoint, for metrics and logs."""

    name: str
    breaker: BreakerState
    health: Health
    in_flight: int
    warm: bool
    idle_secs: float  # since the last successful call (or since the pool started)
    calls: int
    failures: int
    throttled: int
    latency_ewma_secs: float


class _Endpoint:
    def __init__(self, inferencer: Inferencer, breaker: CircuitBreaker, now: float, probe: ProbeSchedule) -> None:
        self.inferencer = inferencer
        self.name = inferencer.name
        self.breaker = breaker
        self.in_flight = 0
        self.warm = False
        self.last_success = now
        self.latency_ewma_secs = _LATENCY_PRIOR_S
        self.calls = 0
        self.failures = 0
        self.throttled = 0
        self.warming: asyncio.Task[bool] | None = None
        self.last_error = ""
        self.health = Health.STARTING
        self.probe = probe

    def serving(self) -> bool:
        """Whether live calls may go here now, without waiting for a readiness check."""
        return self.health in (Health.READY, Health.FAILING) and self.breaker.allows()


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
        probe_secs: float = PROBE_SECS,
        max_probe_secs: float = MAX_PROBE_SECS,
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
        self._max_probe_secs = max_probe_secs
        now = clock()
        self._endpoints = [
            _Endpoint(
                e,
                CircuitBreaker(e.name, breaker_settings, clock=clock, on_change=self._breaker_changed),
                now,
                ProbeSchedule(probe_secs, max_probe_secs),
            )
            for e in endpoints
        ]
        self._by_name = {e.name: e for e in self._endpoints}
        self._predict = predict_completion or self.predict_in_flight
        self._listeners: list[AvailabilityListener] = []
        self._available = False
        self._monitor: asyncio.Task[None] | None = None
        self._nudge = asyncio.Event()

    # -- Inferencer ----------------------------------------------------------------------------

    async def start(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.inferencer.start()
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch(), name=f"{self.name} readiness monitor")

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
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        for endpoint in self._endpoints:
            if endpoint.warming is not None and not endpoint.warming.done():
                endpoint.warming.cancel()
        for endpoint in self._endpoints:
            await endpoint.inferencer.close()

    async def infer(self, features: np.ndarray, *, timeout_secs: float | None = None) -> InferenceOutput:
        """Score ``features`` on the best available endpoint, failing over on errors."""
        try:
            return await self._infer(features, timeout_secs)
        finally:
            self._notify()

    async def _infer(self, features: np.ndarray, timeout_secs: float | None) -> InferenceOutput:
        n = int(np.shape(features)[0])
        deadline = None if timeout_secs is None else self._clock() + timeout_secs
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
                    # Nothing was sent; the warm-up path already recorded why.
                    endpoint.breaker.release(permit)
                    tried[endpoint.name] = endpoint.last_error
                    continue

            endpoint.in_flight += 1
            started = self._clock()
            try:
                output = await endpoint.inferencer.infer(features, timeout_secs=remaining)
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
        return (endpoint.in_flight + 1) * endpoint.latency_ewma_secs

    def _choose(self, n: int, exclude: dict[str, str]) -> tuple[_Endpoint, CallPermit] | None:
        now = self._clock()
        candidates = [
            (self._predict(e.name, n), index, e)
            for index, e in enumerate(self._endpoints)
            if e.name not in exclude and self._routable(e, now)
        ]
        for _, _, endpoint in sorted(candidates, key=lambda c: (c[0], c[1])):
            permit = endpoint.breaker.acquire()
            if permit is not None:
                return endpoint, permit
        return None

    def _routable(self, endpoint: _Endpoint, now: float) -> bool:
        """Serving, or not ready with a readiness check due (a call may run that check itself)."""
        if endpoint.health in (Health.STARTING, Health.NOT_READY) and not endpoint.probe.due(now):
            return False
        return endpoint.breaker.allows()

    def _no_endpoint(self, tried: dict[str, str]) -> NoEndpointError:
        reasons = []
        waits = []
        now = self._clock()
        for e in self._endpoints:
            if e.name in tried:
                reasons.append(f"{e.name}: {tried[e.name]}")
                continue
            state = e.breaker.state
            if e.health in (Health.STARTING, Health.NOT_READY) and not e.probe.due(now):
                wait = e.probe.due_at - now
                waits.append(wait)
                reasons.append(f"{e.name}: {e.health}, next readiness check in {wait:.1f} s")
            elif state is BreakerState.OPEN:
                wait = e.breaker.retry_after()
                waits.append(wait)
                reasons.append(f"{e.name}: breaker open, probe in {wait:.1f} s")
            else:
                reasons.append(f"{e.name}: breaker {state}, probe already in flight")
        return NoEndpointError(
            f"{self.name}: no inference endpoint can take the call ({'; '.join(reasons)})",
            retry_after=min(waits) if waits else 0.0,
            calls_failed=sum(reason.startswith("failed") for reason in tried.values()),
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
                # Not ready is not broken (a model still loading): no breaker penalty, check again soon.
                endpoint.last_error = "not ready"
                endpoint.probe.not_ready(self._clock())
                endpoint.warm = False
                self._set_health(endpoint, Health.NOT_READY, "readiness check answered not ready")
                return False
            await endpoint.inferencer.warm_up()
        except ThrottledError as exc:
            endpoint.last_error = f"throttled during warm-up: {exc}"
            endpoint.probe.retry_soon(self._clock())
            return False  # alive but busy: no breaker penalty, checked again soon
        except Exception as exc:  # noqa: BLE001 - a misconfigured endpoint is as unusable as a dead one
            endpoint.last_error = f"warm-up failed: {exc}"
            endpoint.failures += 1
            self._set_health(endpoint, Health.FAILING, endpoint.last_error)
            endpoint.breaker.trip()
            return False
        endpoint.warm = True
        endpoint.last_success = self._clock()
        endpoint.last_error = ""
        endpoint.probe.ready()
        self._set_health(endpoint, Health.READY)
        return True

    # -- health and availability ---------------------------------------------------------------

    def on_availability(self, listener: AvailabilityListener) -> None:
        """Call ``listener(available)`` now and whenever some endpoint can take calls where none could,
        or the other way round."""
        self._notify()
        self._listeners.append(listener)
        listener(self._available)

    def available(self) -> bool:
        """Whether some endpoint is ready (or failing but still in rotation) and its breaker lets calls in."""
        return any(e.serving() for e in self._endpoints)

    def _set_health(self, endpoint: _Endpoint, health: Health, reason: str = "") -> None:
        old, endpoint.health = endpoint.health, health
        if old is not health:
            log_change(endpoint.name, old, health, reason)
            self._nudge.set()
        self._notify()

    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        breaker = self._by_name[name].breaker
        wait = f", next probe in {breaker.retry_after():.1f} s" if new is BreakerState.OPEN else ""
        log.log(logging.WARNING if new is BreakerState.OPEN else logging.INFO,
                "inference endpoint %s: breaker %s -> %s%s", name, old, new, wait)
        self._nudge.set()  # the monitor re-evaluates availability outside the breaker's own call

    def _notify(self) -> None:
        available = self.available()
        if available is not self._available:
            self._available = available
            for listener in tuple(self._listeners):
                listener(available)

    async def _watch(self) -> None:
        """Check endpoints that are not ready when due, and notice breakers that left the open state."""
        while True:
            now = self._clock()
            due = [
                self._ensure_warm(e)
                for e in self._endpoints
                if e.health in (Health.STARTING, Health.NOT_READY) and e.probe.due(now) and e.breaker.allows()
            ]
            if due:
                await asyncio.gather(*due, return_exceptions=True)
            self._notify()
            self._nudge.clear()
            try:
                async with asyncio.timeout(self._next_check_in()):
                    await self._nudge.wait()
            except TimeoutError:
                pass

    def _next_check_in(self) -> float:
        now = self._clock()
        times = [
            e.probe.due_at
            for e in self._endpoints
            if e.health in (Health.STARTING, Health.NOT_READY) and e.breaker.allows()
        ]
        times += [now + e.breaker.retry_after() for e in self._endpoints if e.breaker.state is BreakerState.OPEN]
        # Bounded both ways: a clock that does not move (tests) must not spin, nor sleep for ever.
        return min(self._max_probe_secs, max(0.01, min(times, default=now + self._max_probe_secs) - now))

    # -- bookkeeping ---------------------------------------------------------------------------

    def _succeeded(self, endpoint: _Endpoint, latency_secs: float) -> None:
        endpoint.calls += 1
        endpoint.last_success = self._clock()
        endpoint.latency_ewma_secs += _EWMA_ALPHA * (latency_secs - endpoint.latency_ewma_secs)

    def _failed(self, endpoint: _Endpoint, permit: CallPermit, exc: Exception) -> None:
        endpoint.failures += 1
        endpoint.warm = False  # check readiness again before the next live batch
        endpoint.last_error = str(exc)
        self._set_health(endpoint, Health.FAILING, endpoint.last_error)
        endpoint.breaker.record_failure(permit)

    def status(self) -> list[EndpointStatus]:
        now = self._clock()
        return [
            EndpointStatus(
                name=e.name,
                breaker=e.breaker.state,
                health=e.health,
                in_flight=e.in_flight,
                warm=e.warm and now - e.last_success < self._idle_after,
                idle_secs=max(0.0, now - e.last_success),
                calls=e.calls,
                failures=e.failures,
                throttled=e.throttled,
                latency_ewma_secs=e.latency_ewma_secs,
            )
            for e in self._endpoints
        ]

    def breaker(self, name: str) -> CircuitBreaker:
        return self._by_name[name].breaker
