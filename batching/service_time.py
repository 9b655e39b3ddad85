"""Online service-time model of one (endpoint, model): ``S(b) = a + c*b`` plus a tail factor.

The fit is a ridge regression toward a prior ``(a0, c0)`` over a sliding window of measured calls,
with Huber weights so a stray GC pause cannot drag the line. The prior keeps the fit sane before data
arrives and when every batch has the same size (then ``a`` and ``c`` cannot be told apart). The tail
factor ``rho`` is the chosen quantile (p99 by default) of observed/predicted over the window, so
``predict_tail(b) = rho * S(b)`` is the time a batch of ``b`` finishes in, 99 times out of 100.

``b`` counts records, not items: a batch of three chunks of 100 records is ``b = 300``, so ``c`` is
the cost of one record however the records were grouped into items.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

# A prior from the measured Triton call cost (about 2 ms per call) and a light model's per-record
# cost; replace it with an offline perf_analyzer profile of the real model when one exists.
DEFAULT_PRIOR_A_S = 0.002
DEFAULT_PRIOR_C_S = 0.00002
DEFAULT_PRIOR_RHO = 1.3
# Floors that keep divisions by the slope and the intercept finite.
_MIN_A_S = 1e-6
_MIN_C_S = 1e-9
_HUBER_K = 1.345
_MIN_PRIOR_WEIGHT = 0.25
# The tail factor describes an endpoint that is slower than usual in proportion to the work. A call
# stalled for reasons that do not scale with the batch (the process descheduled, a GC pause) would
# otherwise read as "every call is 50x slower" and shrink every batch to one record, the least
# efficient size there is, which starves the process further. So one call can at most double it,
# and it never exceeds this bound.
MAX_RHO = 8.0
_MAX_RHO_STEP = 2.0


class ServiceTimeModel:
    """Predicts how long one call with a batch of ``b`` records takes, learned from measured calls."""

    def __init__(
        self,
        prior_a_secs: float = DEFAULT_PRIOR_A_S,
        prior_c_secs: float = DEFAULT_PRIOR_C_S,
        *,
        prior_rho: float = DEFAULT_PRIOR_RHO,
        prior_weight: float = 4.0,
        window: int = 128,
        refit_every: int = 8,
        min_samples: int = 16,
        tail_quantile: float = 0.99,
    ) -> None:
        if prior_a_secs <= 0 or prior_c_secs < 0:
            raise ValueError("the prior needs a > 0 and c >= 0")
        if prior_rho < 1.0:
            raise ValueError("the tail factor is a ratio of a tail to the mean: it must be >= 1")
        if not 0.5 <= tail_quantile < 1.0:
            raise ValueError("tail_quantile must be in [0.5, 1)")
        if min_samples < 2 or window < min_samples or refit_every < 1:
            raise ValueError("need 2 <= min_samples <= window and refit_every >= 1")
        self.prior_a_secs = prior_a_secs
        self.prior_c_secs = prior_c_secs
        self.prior_weight = prior_weight
        self.tail_quantile = tail_quantile
        self.min_samples = min_samples
        self.refit_every = refit_every
        self._a = prior_a_secs
        self._c = max(prior_c_secs, _MIN_C_S)
        self._rho = prior_rho
        self._window: deque[tuple[int, float]] = deque(maxlen=window)
        self._since_refit = 0
        self._observed = 0

    @property
    def a_secs(self) -> float:
        """Fixed cost per call, seconds."""
        return self._a

    @property
    def c_secs(self) -> float:
        """Cost per record in the batch, seconds."""
        return self._c

    @property
    def rho(self) -> float:
        """Tail factor: the chosen quantile of observed / predicted service time (>= 1)."""
        return self._rho

    @property
    def observed(self) -> int:
        """How many calls have been measured so far."""
        return self._observed

    def predict(self, batch_size: float) -> float:
        """Typical service time of a call with ``batch_size`` records."""
        return self._a + self._c * batch_size

    def predict_tail(self, batch_size: float) -> float:
        """Service time that a call with ``batch_size`` records stays within at the tail quantile."""
        return self._rho * self.predict(batch_size)

    def smallest_batch_keeping_up(self, rate_per_sec: float, limit: int) -> int:
        """The smallest batch (at most ``limit``) whose typical calls, back to back, serve ``rate_per_sec`` records/s."""
        if rate_per_sec <= 0:
            return 1
        if rate_per_sec * self._c >= 1.0:
            return limit
        return max(1, min(limit, math.ceil(rate_per_sec * self._a / (1.0 - rate_per_sec * self._c))))

    def largest_batch_within(self, budget_secs: float, limit: int) -> int:
        """The largest batch in records (at most ``limit``) whose tail service time fits ``budget_secs``; 0 if none."""
        if budget_secs < self.predict_tail(1):
            return 0
        fits = math.floor((budget_secs / self._rho - self._a) / self._c)
        return max(1, min(limit, fits))

    def observe(self, batch_size: int, service_secs: float) -> None:
        """Feed one measured call of ``batch_size`` records. Refits every ``refit_every`` calls once
        ``min_samples`` are in."""
        if batch_size < 1 or not math.isfinite(service_secs) or service_secs <= 0:
            return
        self._window.append((batch_size, service_secs))
        self._observed += 1
        self._since_refit += 1
        # React to a slowdown at once (bounded); the next refit brings rho back to the windowed quantile.
        ratio = service_secs / self.predict(batch_size)
        self._rho = min(MAX_RHO, max(self._rho, min(ratio, _MAX_RHO_STEP * self._rho)))
        if len(self._window) >= self.min_samples and self._since_refit >= self.refit_every:
            self._refit()

    def _refit(self) -> None:
        self._since_refit = 0
        sizes = np.fromiter((b for b, _ in self._window), dtype=float)
        times = np.fromiter((s for _, s in self._window), dtype=float)
        a, c = self._ridge(sizes, times, np.ones_like(times))
        for _ in range(3):
            predicted = np.maximum(a + c * sizes, _MIN_A_S)
            # Noise grows with the call's length, so judge residuals relative to the prediction.
            relative = (times - predicted) / predicted
            scale = 1.4826 * float(np.median(np.abs(relative - np.median(relative))))
            # Huber: points far off the line count less, so one stall cannot tilt it.
            robust = np.minimum(1.0, _HUBER_K * scale / np.maximum(np.abs(relative), 1e-12)) if scale > 0 else 1.0
            weights = robust / predicted**2
            a, c = self._ridge(sizes, times, weights * (len(times) / weights.sum()))
        self._a = max(_MIN_A_S, a)
        self._c = max(_MIN_C_S, c)
        ratios = times / (self._a + self._c * sizes)
        self._rho = min(MAX_RHO, max(1.0, float(np.quantile(ratios, self.tail_quantile))))

    def _ridge(self, sizes: np.ndarray, times: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
        n = float(weights.sum())
        sum_b = float(weights @ sizes)
        sum_bb = float(weights @ (sizes * sizes))
        sum_secs = float(weights @ times)
        sum_bs = float(weights @ (sizes * times))
        # The prior counts as ``prior_weight`` samples among all calls seen so far, so its pull fades
        # as evidence accumulates; the floor keeps a and c separable when every batch is one size.
        k_a = max(_MIN_PRIOR_WEIGHT, self.prior_weight * min(1.0, len(times) / self._observed))
        # The slope's prior weight is scaled by the typical b^2 so both priors count alike.
        k_c = k_a * (sum_bb / n)
        lhs = np.array([[n + k_a, sum_b], [sum_b, sum_bb + k_c]])
        rhs = np.array([sum_secs + k_a * self.prior_a_secs, sum_bs + k_c * self.prior_c_secs])
        a, c = np.linalg.solve(lhs, rhs)
        return float(a), float(c)
