"""Global admission control: refuse with 503 and Retry-After before the process degrades.

Checked when a telemetry request arrives, before its body is read: requests and body bytes in
flight, how full the WAL is (refusing before it is full keeps acks fast while the lake catches up),
and how late the event loop runs (a late loop means every device's latency is already suffering).
A refused device retries after ``Retry-After``; the ALB sends it to a less loaded instance meanwhile.

How many requests are let in at once adapts (``InflightLimit``): every request let in queues behind
the others for the same event loop and the same fsyncs, so past the point where the worker is busy,
letting in more only makes every answer later, refusals included (they wait for the loop too).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from gateway.errors import Unavailable
from gateway.edge.settings import AdmissionSettings


WINDOW_SECS = 0.25  # answers are judged in windows this long
SLOW_SHARE = 0.1  # a window with more than this share of late answers shrinks the limit
DECREASE_BOUNDS = (0.5, 0.9)  # the least and the most a late window keeps of the limit
INCREASE = 0.1  # of the limit, at least one request, per window in which the limit was reached


class InflightLimit:
    """How many telemetry requests a worker lets in at once: ``max_inflight_requests``, or fewer
    while its answers come later than ``answer_target_ms`` after their body arrived.

    Judged per quarter second, the way TCP sizes its window from how the path answers: a window in
    which more than a tenth of the answers were late shrinks the limit as much as the typical answer
    was late (Little's law: at the same throughput, the requests in flight that answer on time are
    ``in_flight * target / latency``), keeping between half and nine tenths of it and never going
    below ``min_inflight_requests``; a window in which the limit was reached and answers were on
    time grows it by a tenth. Only requests whose body arrived after the last decrease are judged,
    so one backlog does not shrink the limit again and again.
    """

    def __init__(self, settings: Callable[[], AdmissionSettings], clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._limit = float(settings().max_inflight_requests)
        self._window_ends = clock() + WINDOW_SECS
        self._latencies: list[float] = []  # of the window's judged answers, in seconds
        self._late = 0
        self._peak = 0  # the most requests in flight this window
        self._decreased_at = float("-inf")

    @property
    def value(self) -> int:
        s = self._settings()
        if not s.answer_target_ms:
            return s.max_inflight_requests
        return int(min(max(self._limit, s.min_inflight_requests), s.max_inflight_requests))

    def admitting(self, inflight_requests: int) -> None:
        """A request arrived with ``inflight_requests`` in flight, itself included."""
        self._peak = max(self._peak, inflight_requests)

    def answered(self, body_received_at: float) -> None:
        """A request let in was answered; its body had fully arrived at ``body_received_at``."""
        s = self._settings()
        now = self._clock()
        if body_received_at >= self._decreased_at:
            latency = now - body_received_at
            self._latencies.append(latency)
            if latency * 1000 > s.answer_target_ms:
                self._late += 1
        if now < self._window_ends:
            return
        floor, cap = min(s.min_inflight_requests, s.max_inflight_requests), s.max_inflight_requests
        limit = min(max(self._limit, floor), cap)  # a reload may have moved the bounds
        latencies = self._latencies
        if s.answer_target_ms and self._late > SLOW_SHARE * len(latencies):
            typical = max(sorted(latencies)[len(latencies) // 2], 1e-6)
            least, most = DECREASE_BOUNDS
            limit = max(floor, min(limit, self._peak) * min(most, max(least, s.answer_target_ms / 1000 / typical)))
            self._decreased_at = now
        elif latencies and self._peak >= int(limit):  # the limit held the load back, and answers were on time
            limit = min(cap, limit + max(1.0, limit * INCREASE))
        self._limit = limit
        self._latencies = []
        self._late = 0
        self._peak = 0
        self._window_ends = now + WINDOW_SECS


class Admission:
    def __init__(
        self,
        settings: Callable[[], AdmissionSettings],
        on_refuse: Callable[[str], None],
        *,
        draw: Callable[[int, int], int] = random.randint,
    ) -> None:
        self._settings = settings
        self._on_refuse = on_refuse
        self._draw = draw
        self.inflight_bytes = 0
        self.limit = InflightLimit(settings)
        self._per_source: dict[str, int] = {}

    def enter(self, source: str) -> None:
        """Count a request from ``source`` in flight (503 past its share); pair with ``leave``."""
        self.check_source(source)
        self._per_source[source] = self._per_source.get(source, 0) + 1

    def check_source(self, source: str) -> None:
        """503 while ``source`` holds its share of in-flight requests; counts nothing."""
        s = self._settings()
        held = self._per_source.get(source, 0)
        if held >= s.max_inflight_per_source:
            self._refuse("inflight_per_source", f"{held} requests from one source are in progress", s)

    def leave(self, source: str) -> None:
        held = self._per_source.get(source, 0) - 1
        if held > 0:
            self._per_source[source] = held
        else:
            self._per_source.pop(source, None)

    def check(
        self,
        *,
        inflight_requests: int,
        declared_bytes: int,
        wal_bytes: int,
        wal_capacity: int,
        wal_retry_after_secs: int,
        loop_lag_secs: float,
    ) -> None:
        """``inflight_requests`` counts this request; ``declared_bytes`` is its Content-Length (0 if chunked)."""
        s = self._settings()
        self.limit.admitting(inflight_requests)
        if inflight_requests > self.limit.value:
            self._refuse("inflight_requests", f"{inflight_requests - 1} requests are in progress", s)
        if self.inflight_bytes + declared_bytes > s.max_inflight_bytes:
            self._refuse("inflight_bytes", f"{self.inflight_bytes} body bytes are in progress", s)
        if wal_capacity and wal_bytes >= s.wal_high_watermark * wal_capacity:
            self._refuse("wal_depth", "the write-ahead log is full while the lake catches up", s, wal_retry_after_secs)
        if loop_lag_secs * 1000 > s.max_loop_lag_ms:
            self._refuse("loop_lag", f"the gateway is {loop_lag_secs * 1000:.0f} ms behind", s)

    def overload_retry_after(self) -> int:
        """The ``Retry-After`` of an overload refusal: ``retry_after_secs`` and up to
        ``retry_after_spread_secs`` more, drawn at random. Devices refused in the same moment would
        otherwise all come back in the same second: with one second for all, the benchmark's fleet
        came back in waves a second apart, each overloading the worker again."""
        s = self._settings()
        return s.retry_after_secs + self._draw(0, s.retry_after_spread_secs)

    def _refuse(self, reason: str, why: str, s: AdmissionSettings, retry_after_secs: int | None = None) -> None:
        self._on_refuse(reason)
        raise Unavailable(
            f"the gateway is overloaded ({why}); retry later", retry_after_secs=retry_after_secs or self.overload_retry_after()
        )
