"""The gateway's edge defences in one place: state that outlives a SIGHUP reload.

    identify   the device's address (proxy.py) and the device its client certificate names (tls.py)
    admission  global overload -> 503 (admission.py)
    limiter    per-device token buckets -> 429 (ratelimit.py)
    failures   per-source buckets of failed authentications -> 429 (ratelimit.py)
    replay     signatures already seen -> 401 (replay.py)
    connections  cap, slow clients, max age (connections.py)

Refusals are counted and logged with the device's address; the log is throttled so that a flood of
forged requests cannot become a flood of log lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.edge.admission import Admission
from gateway.edge.connections import ConnectionGuard
from gateway.errors import ApiError, Unauthorized
from gateway.ops.metrics import GatewayMetrics
from gateway.edge.proxy import CLIENT_CERT_HEADER, Peer, is_trusted_proxy, plain_address, resolve_peer
from gateway.edge.ratelimit import DeviceRateLimiter
from gateway.edge.replay import ReplayGuard
from gateway.edge.tls import CertificateError, ForwardedCertVerifier, device_from_peercert

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger(__name__)

_LOG_LINES_PER_SEC = 10.0


class EdgeSecurity:
    def __init__(self, settings: Callable[[], Settings], metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.replay = ReplayGuard(
            lambda: settings().auth.timestamp_window_secs,
            lambda: settings().auth.replay_cache_max_entries,
            on_evict=metrics.replay_evictions.inc,
        )
        self.limiter = DeviceRateLimiter(lambda: settings().rate_limits)
        # Sources whose requests fail authentication: charged only by failures (ingest/handler.py).
        self.failures = DeviceRateLimiter(lambda: settings().rate_limits.for_auth_failures())
        self.admission = Admission(lambda: settings().admission, lambda reason: metrics.admission_refused.labels(reason).inc())
        self.connections = ConnectionGuard(
            lambda: settings().connections,
            on_close=lambda reason: metrics.connections_closed.labels(reason).inc(),
            # A load balancer carries every device's connections: no per-source cap for it.
            shared_source=lambda address: is_trusted_proxy(address, settings().proxy),
            source_refusal=self._source_refusal,
            overload_retry_after=self.admission.overload_retry_after,
        )
        metrics.connections_open.set_function(lambda: self.connections.open)
        metrics.inflight_bytes.set_function(lambda: self.admission.inflight_bytes)
        metrics.inflight_limit.set_function(lambda: self.admission.limit.value)
        self._forwarded: ForwardedCertVerifier | None = None
        self._log_budget = _LOG_LINES_PER_SEC
        self._log_updated = time.monotonic()
        self._log_suppressed = 0

    def _source_refusal(self, address: str) -> ApiError | None:
        """Why a new connection from ``address`` would be refused whatever it asks, or None."""
        try:
            self.failures.check(address)  # its failed authentications put it in deficit
            self.admission.check_source(address)  # it holds its share of in-flight requests
        except ApiError as exc:
            return exc
        return None

    def identify(self, request: web.BaseRequest) -> tuple[Peer, str | None]:
        """The device's address and scheme, and the device a verified client certificate names (if any)."""
        s = self._settings()
        transport = request.transport
        peername = transport.get_extra_info("peername") if transport is not None else None
        tcp_peer = peername[0] if isinstance(peername, tuple) and peername else None
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        peer = resolve_peer(tcp_peer, ssl_object is not None, request.headers, s.proxy)
        if ssl_object is not None and s.tls.client_ca_path:
            device = device_from_peercert(ssl_object.getpeercert(), s.tls)
            if device:
                return peer, device
        if peer.trusted_proxy and s.proxy.client_cert_header:
            header = request.headers.get(CLIENT_CERT_HEADER)
            if header:
                if self._forwarded is None:
                    self._forwarded = ForwardedCertVerifier(s.tls)
                try:
                    return peer, self._forwarded.device_id(header)
                except CertificateError as exc:
                    raise Unauthorized(str(exc)) from None
        return peer, None

    def refused(self, error: ApiError, request: web.BaseRequest) -> None:
        """Count a 401/403/429 and log it (throttled) with the device's address; never with a secret."""
        if error.status == 429:
            self._metrics.rate_limited.inc()
        else:
            self._metrics.auth_refused.labels(error.reason).inc()
        if not self._may_log():
            return
        try:
            peer, _ = self.identify(request)
            address = peer.address
        except ApiError:
            address = plain_address(request.remote) if request.remote else None
        extra = {
            "status": error.status,
            "reason": error.reason,
            "detail": error.message,
            "claimed_device_id": request.headers.get("X-Device-Id", "")[:128],
            "source_ip": address,
        }
        if self._log_suppressed:
            extra["suppressed"], self._log_suppressed = self._log_suppressed, 0
        log.info("device request refused", extra=extra)

    def _may_log(self) -> bool:
        now = time.monotonic()
        self._log_budget = min(_LOG_LINES_PER_SEC, self._log_budget + (now - self._log_updated) * _LOG_LINES_PER_SEC)
        self._log_updated = now
        if self._log_budget >= 1:
            self._log_budget -= 1
            return True
        self._log_suppressed += 1
        return False
