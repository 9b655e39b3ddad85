"""One retry policy for every connector: exponential backoff with full jitter under a deadline.

The settings block mirrors the OpenTelemetry Collector exporters' (``initial_interval``,
``max_interval``, ``max_elapsed_time``), so an operator tunes every connector the same way.

Only ``TransientError`` (and its subclass ``ThrottledError``) is retried; a ``PermanentError`` or any
foreign exception goes straight through. Connectors translate vendor exceptions before they reach
the policy, so this module knows nothing about botocore or aiohttp.

The wait before retry ``n`` (counting from 0) is ``uniform(0, min(max_interval, initial * multiplier**n))``
("full jitter"): clients that failed together spread out instead of retrying in lock step. No new
attempt starts once ``max_elapsed_secs`` would be exceeded; the last error is raised instead, so a
dead endpoint surfaces as a ``TransientError`` after a bounded time rather than a hang.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta

from connectors.errors import TransientError

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[object]]
OnRetry = Callable[[int, float, TransientError], None]

DEFAULT_INITIAL_INTERVAL_SECS = 0.1
DEFAULT_MAX_INTERVAL_SECS = 5.0
DEFAULT_MAX_ELAPSED_SECS = 60.0
DEFAULT_MULTIPLIER = 2.0


class RetrySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a connector retries transient failures."""

    initial_interval_secs: Annotated[float, Meta(gt=0)] = DEFAULT_INITIAL_INTERVAL_SECS
    max_interval_secs: Annotated[float, Meta(gt=0)] = DEFAULT_MAX_INTERVAL_SECS
    # Total time budget for one operation, attempts and waits together; 0 disables retries.
    max_elapsed_secs: Annotated[float, Meta(ge=0)] = DEFAULT_MAX_ELAPSED_SECS
    multiplier: Annotated[float, Meta(ge=1)] = DEFAULT_MULTIPLIER

    def __post_init__(self) -> None:
        if self.initial_interval_secs > self.max_interval_secs:
            raise ValueError("initial_interval_secs must not exceed max_interval_secs")


class RetryPolicy:
    """Runs an operation, retrying ``TransientError`` with full-jitter backoff until a deadline.

    ``sleep``, ``rng`` (uniform in [0, 1)) and ``clock`` (monotonic seconds) are injectable so
    tests can observe every wait without sleeping.
    """

    def __init__(
        self,
        settings: RetrySettings,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._rng = rng
        self._clock = clock

    def backoff_ceiling_secs(self, retry: int) -> float:
        """The upper bound of the wait before retry number ``retry`` (0-based)."""
        s = self.settings
        # Cap the exponent so a long outage cannot overflow the float.
        return min(s.max_interval_secs, s.initial_interval_secs * s.multiplier ** min(retry, 64))

    def backoff_secs(self, retry: int) -> float:
        return self._rng() * self.backoff_ceiling_secs(retry)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        on_retry: OnRetry | None = None,
        max_elapsed_secs: float | None = None,
    ) -> T:
        """Await ``attempt()`` until it returns, retrying transient failures.

        ``max_elapsed_secs`` overrides the settings' budget for this one call (start-up work uses
        a shorter one). ``on_retry(retry, delay_secs, error)`` runs before each wait.
        """
        budget = self.settings.max_elapsed_secs if max_elapsed_secs is None else max_elapsed_secs
        started = self._clock()
        retry = 0
        while True:
            try:
                return await attempt()
            except TransientError as exc:
                delay = self.backoff_secs(retry)
                elapsed = self._clock() - started
                if elapsed + delay > budget:
                    if retry == 0:
                        raise
                    raise _gave_up(exc, retry + 1, elapsed) from exc
                if on_retry is not None:
                    on_retry(retry, delay, exc)
                await self._sleep(delay)
                retry += 1


def _gave_up(exc: TransientError, attempts: int, elapsed: float) -> TransientError:
    """The last error, same type (a throttle stays a throttle), saying how long we tried."""
    return type(exc)(f"{exc} (gave up after {attempts} attempts in {elapsed:.1f} s)", endpoint=exc.endpoint)
