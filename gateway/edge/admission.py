"""Global admission control: refuse with 503 and Retry-After before the process degrades.

Checked when a telemetry request arrives, before its body is read: requests and body bytes in
flight, how full the WAL is (refusing before it is full keeps acks fast while the lake catches up),
and how late the event loop runs (a late loop means every device's latency is already suffering).
A refused device retries after ``Retry-After``; the ALB sends it to a less loaded instance meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.errors import Unavailable
from gateway.edge.settings import AdmissionSettings


class Admission:
    def __init__(self, settings: Callable[[], AdmissionSettings], on_refuse: Callable[[str], None]) -> None:
        self._settings = settings
        self._on_refuse = on_refuse
        self.inflight_bytes = 0
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
        if inflight_requests > s.max_inflight_requests:
            self._refuse("inflight_requests", f"{inflight_requests - 1} requests are in progress", s)
        if self.inflight_bytes + declared_bytes > s.max_inflight_bytes:
            self._refuse("inflight_bytes", f"{self.inflight_bytes} body bytes are in progress", s)
        if wal_capacity and wal_bytes >= s.wal_high_watermark * wal_capacity:
            self._refuse("wal_depth", "the write-ahead log is full while the lake catches up", s, wal_retry_after_secs)
        if loop_lag_secs * 1000 > s.max_loop_lag_ms:
            self._refuse("loop_lag", f"the gateway is {loop_lag_secs * 1000:.0f} ms behind", s)

    def _refuse(self, reason: str, why: str, s: AdmissionSettings, retry_after_secs: int | None = None) -> None:
        self._on_refuse(reason)
        raise Unavailable(
            f"the gateway is overloaded ({why}); retry later", retry_after_secs=retry_after_secs or s.retry_after_secs
        )
