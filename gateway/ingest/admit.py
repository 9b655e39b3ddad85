"""Every reason to refuse a request before a byte of its body is read, in one place: ``admit``.

What can only be known later is refused where it becomes known: a signature once the body is
hashed, a device's rate once its records are counted, a request too large for the WAL once it is
framed, and a WAL that filled meanwhile when it is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import hdrs, web

from gateway.edge.proxy import is_trusted_proxy
from gateway.errors import CannotPersist, TooLarge, Unavailable
from gateway.ingest.body import body_format, check_transfer_coding, decompressor
from gateway.ingest.spool import Spool
from gateway.service import Gateway

_WAL_REFUSALS = {
    "full": "the gateway's write-ahead log is full while the lake catches up; retry later",
    "no_space": "the gateway's disk is full; retry later",
    "failed": "the gateway's write-ahead log is recovering from a disk error; retry later",
}


@dataclass(slots=True)
class Admitted:
    """A request let in: who sent it, what its headers say, and the spools its body may fill."""

    gw: Gateway
    peer_address: str | None
    source: str | None  # the device's address; None behind a trusted proxy (it speaks for many)
    fmt: str
    encoding: str
    pending: object  # the authenticator's check, to finish once the body is hashed
    rate_key: str
    raw: Spool  # the body as sent, until its request is claimed to run (validated anew from it until then)
    frames: Spool  # its records as WAL frames
    body_received_at: float | None = None  # time.monotonic() once the whole body has arrived

    def release(self) -> None:
        admission = self.gw.security.admission
        if self.body_received_at is not None:
            admission.limit.answered(self.body_received_at)  # how late answers come sizes the limit
        if self.source is not None:
            admission.leave(self.source)
        self.raw.close()
        self.frames.close()


def admit(request: web.Request, gw: Gateway) -> Admitted:
    """Let the request in, or refuse it now (503, 413, 415, 501, 401, 429) with the reason.

    In order: draining; a WAL that cannot take a request (full, disk full, failed); the instance's
    admission (requests and bytes in flight, the WAL's high watermark, a late event loop); the body's
    type, encodings and declared size; the signing headers; a source whose authentications keep
    failing; a device over its rate; last, the source's share of requests in flight, which is taken
    here and given back by ``Admitted.release``.
    """
    settings = gw.settings
    limits = settings.limits
    security = gw.security
    wal = gw.pipeline.wal
    if gw.draining:
        raise Unavailable("the gateway is shutting down; retry (another instance will answer)", retry_after_secs=1)
    refusal = wal.refusal()
    if refusal is not None:
        raise CannotPersist(
            _WAL_REFUSALS.get(refusal, "the gateway cannot persist records right now; retry"),
            retry_after_secs=settings.wal.retry_after_secs,
        )
    security.admission.check(
        inflight_requests=gw.inflight,
        declared_bytes=request.content_length or 0,
        wal_bytes=wal.total_bytes,
        wal_capacity=wal.max_total_bytes,
        wal_retry_after_secs=settings.wal.retry_after_secs,
        loop_lag_secs=gw.loop_lag_secs,
    )
    peer, cert_device = security.identify(request)
    fmt = body_format(request.headers.get(hdrs.CONTENT_TYPE, ""))
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    decompressor(encoding)  # 415 for an unknown encoding before any byte is read
    check_transfer_coding(request.headers.get(hdrs.TRANSFER_ENCODING))
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise TooLarge(f"the body is {request.content_length} bytes; the limit is {limits.max_body_bytes}")
    source = None if is_trusted_proxy(peer.address or "", settings.proxy) else peer.address or "unknown"
    if source is not None:
        security.failures.check(source)  # a source whose requests keep failing authentication waits
    pending = gw.authenticator.begin(request.headers, cert_device=cert_device)
    # Unauthenticated so far: only checked here (a deficit answers 429), charged once authenticated.
    rate_key = getattr(pending, "device_id", None) or (pending if isinstance(pending, str) else None) or peer.address
    security.limiter.check(rate_key)
    if source is not None:
        security.admission.enter(source)
    return Admitted(
        gw,
        peer.address or None,
        source,
        fmt,
        encoding,
        pending,
        rate_key,
        gw.pipeline.new_spool(limits.spool_memory_bytes),
        gw.pipeline.new_spool(limits.spool_memory_bytes),
    )
