"""Configuration sections for device security and abuse resistance (decoded like every section).

    [tls]          the gateway terminates TLS itself, optionally with client certificates (mTLS)
    [proxy]        which peers are trusted load balancers (X-Forwarded-*, the ALB certificate header)
    [rate_limits]  per-device token buckets (429)
    [admission]    global overload protection (503)
    [connections]  slow clients, connection cap, connection max age
    [admin]        the operator API on its own listener (off by default)
    [ops]          /metrics on its own listener (on by default, loopback)
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from gateway.config_types import Fraction, MiB, Port, PositiveFloat, PositiveInt, Section


class TlsSettings(Section):
    enabled: bool = False
    cert_path: str = ""
    key_path: str = ""
    # Set: clients may (or must, see client_cert) present a certificate issued by this CA bundle.
    # Also the CA that certificates forwarded by a trusted proxy (X-Amzn-Mtls-Clientcert) must chain to.
    client_ca_path: str = ""
    # "optional": devices without a certificate still connect and sign with HMAC.
    client_cert: Literal["optional", "required"] = "optional"
    min_version: Literal["1.2", "1.3"] = "1.2"
    # Which part of a client certificate names the device.
    device_id_from: Literal["subject_cn", "san_dns", "san_uri"] = "subject_cn"
    # With san_uri: the prefix stripped from the URI (e.g. "spiffe://fleet.example/device/").
    san_uri_prefix: str = ""
    handshake_timeout_secs: PositiveFloat = 10.0

    def __post_init__(self) -> None:
        if self.enabled and not (self.cert_path and self.key_path):
            raise ValueError("tls.enabled needs cert_path and key_path")
        if self.client_cert == "required" and not self.client_ca_path:
            raise ValueError('tls.client_cert = "required" needs client_ca_path')


class ProxySettings(Section):
    # Peers (load balancers) whose X-Forwarded-For / X-Forwarded-Proto are believed. Empty: none.
    trusted_cidrs: list[str] = []
    # Honour X-Amzn-Mtls-Clientcert (ALB mTLS passthrough) from trusted peers; needs tls.client_ca_path.
    client_cert_header: bool = False
    # X-Forwarded-For entries examined from the right; a longer chain is not walked further.
    max_forwarded_hops: PositiveInt = 16

    def __post_init__(self) -> None:
        for cidr in self.trusted_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"trusted_cidrs: {cidr!r} is not an IP network") from None


class RateLimitSettings(Section):
    enabled: bool = True
    # Per device, for the whole instance (its workers share the buckets, kept across restarts under wal.dir). A request is let in while the device's buckets are not in deficit, then charged.
    records_per_sec: PositiveFloat = 5_000.0
    burst_records: PositiveInt = 50_000
    # Body bytes once decompressed: a compressed body costs what it expands to.
    bytes_per_sec: PositiveFloat = 8.0 * MiB
    burst_bytes: PositiveInt = 64 * MiB
    # Buckets kept (in each worker's memory and in the shared store); beyond it full buckets, then the least recently seen devices, are forgotten and start afresh.
    max_tracked_devices: PositiveInt = 100_000
    max_retry_after_secs: PositiveInt = 60
    # Per source address, for the whole instance and across restarts: requests that fail
    # authentication. Past the burst, connections from that source get 429 until its bucket refills.
    auth_failures_per_sec: PositiveFloat = 5.0
    burst_auth_failures: PositiveInt = 100

    def for_auth_failures(self) -> RateLimitSettings:
        """The same limiter's settings for per-source buckets of failed authentications (bytes unbounded)."""
        return msgspec.structs.replace(
            self, records_per_sec=self.auth_failures_per_sec, burst_records=self.burst_auth_failures,
            bytes_per_sec=1e18, burst_bytes=10**18,
        )


class AdmissionSettings(Section):
    # Beyond any of these the gateway answers 503 with Retry-After instead of slowing everyone down.
    # Past this many requests being read or awaiting fsync in a worker, new ones get 503: queueing
    # them only adds latency (the longest accepted wait at 1.5x capacity: 0.39 s with 128, 0.64 s with 256).
    max_inflight_requests: PositiveInt = 128
    # Fewer are let in while answers come late: when more than a tenth of the requests answered in a
    # quarter second took longer than this after their body arrived, the limit shrinks as much as
    # they were late (to between half and nine tenths of what was in flight, not below
    # min_inflight_requests), and it grows by a tenth per quarter second while it is reached and
    # answers are on time. Each worker keeps its own. 0: always max_inflight_requests.
    answer_target_ms: Annotated[int, Meta(ge=0)] = 250
    # However late answers come, each worker lets in at least this many requests at once: answers
    # are also late when the machine is short of CPU rather than of queue, and a lower limit then
    # only costs throughput (with 8, a profiled worker's goodput fell to a fifth of its capacity).
    min_inflight_requests: PositiveInt = 32
    max_inflight_bytes: PositiveInt = 256 * MiB
    # Refuse new requests once the WAL holds this fraction of wal.max_total_bytes (Retry-After is then
    # wal.retry_after_secs). 1.0: only when full, when /readyz also turns 503. Lower keeps headroom
    # for requests already admitted, while /readyz stays 200.
    wal_high_watermark: Annotated[float, Meta(gt=0, le=1)] = 1.0
    max_loop_lag_ms: PositiveInt = 500
    # Milliseconds of request bodies a worker's event loop decodes per turn before it reads its
    # sockets again, so that a refusal or an answer whose fsync is done is not held up by a burst of
    # bodies that all arrived at once (gateway/ingest/loop_share.py). 0: all that are ready, in one turn.
    loop_turn_ms: Annotated[int, Meta(ge=0)] = 5
    retry_after_secs: PositiveInt = 1
    # An overload 503 asks for retry_after_secs plus a whole number of seconds up to this, drawn at
    # random: devices refused in the same moment come back spread over it instead of all at once,
    # in a wave that overloads the worker again (docs/performance.md, "Refusals that come back
    # together"). 0: always retry_after_secs.
    retry_after_spread_secs: Annotated[int, Meta(ge=0)] = 1
    # Requests in flight from one source address (the TCP peer, or X-Forwarded-For from a trusted
    # proxy): one client holds at most its share of max_inflight_requests.
    max_inflight_per_source: PositiveInt = 64


class ConnectionSettings(Section):
    # Connections one worker holds; beyond this a new one is answered 503 and closed at once, unless
    # a connection waiting for its client (never a byte sent, or kept alive between requests) can make
    # room: the one waiting longest is closed instead, so idle sockets cannot hold the cap. The
    # open-files limit may allow fewer: each process raises it to its hard limit at start and keeps
    # 64 files and a quarter of the rest for itself, warning at start when that is below this.
    max_connections: PositiveInt = 4096
    # Connections open from one source address (the TCP peer); beyond it that source gets 503.
    max_connections_per_source: PositiveInt = 512
    # A connection accepted while more than this many wait in the kernel's accept queue behind it is
    # answered 503 (Retry-After) at once: the process is behind, and a request accepted now would wait
    # on top of the queue. 0: never (Linux only; elsewhere the depth cannot be read).
    max_accept_queue: Annotated[int, Meta(ge=0)] = 32
    # From a connection's first byte (or a kept-alive connection's next byte) to complete headers.
    header_timeout_secs: PositiveFloat = 10.0
    # A body must arrive within this in total, and never pause longer than body_idle_timeout_secs.
    body_timeout_secs: PositiveFloat = 120.0
    body_idle_timeout_secs: PositiveFloat = 30.0
    # After body_rate_grace_secs a body arriving slower than this on average is cut off (408), so a
    # client dripping bytes cannot hold an admission slot for minutes.
    min_body_bytes_per_sec: Annotated[float, Meta(ge=0)] = 1024.0
    body_rate_grace_secs: PositiveFloat = 5.0
    # A kept-alive connection idle this long is closed; keep it above the load balancer's (ALB: 60 s).
    idle_timeout_secs: PositiveFloat = 75.0
    # After this age (plus or minus max_age_jitter of it) a response carries Connection: close, so
    # kept-alive connections rebalance across the fleet. 0 disables.
    max_age_secs: Annotated[float, Meta(ge=0)] = 300.0
    max_age_jitter: Fraction = 0.1
    # A source refused (429, 503) again before the Retry-After of its previous refusal is over gets its answer about this much later (0.5 to 1.5 times it), so a client that ignores Retry-After cannot make the gateway refuse it as fast as it can ask. 0: at once.
    refusal_delay_secs: Annotated[float, Meta(ge=0)] = 1.0


class AdminSettings(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 9090
    # A file holding the bearer token (one line); readable by the service account only.
    token_path: str = ""

    def __post_init__(self) -> None:
        if self.enabled and not self.token_path:
            raise ValueError("admin.enabled needs token_path (a file holding the bearer token)")


class OpsSettings(Section):
    # Serve `/metrics` (Prometheus) on its own listener; the device listener never serves it.
    enabled: bool = True
    # Address of the ops listener: loopback, for an agent on the same host; another address exposes the metrics to that network.
    host: str = "127.0.0.1"
    # Port of the ops listener (0: any free port, for tests). With several workers it is bound once and shared.
    port: Port = 9464
