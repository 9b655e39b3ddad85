"""Enrichment: the envelope the gateway puts around each record. Pure functions, no I/O."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from gateway.records import QuarantineLine, RawLine, Record

HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What is the same for every record of one request."""

    ingest_id: str
    received_ms: int
    received_at: str
    gateway_id: str
    availability_zone: str
    device_id: str | None
    device_metadata: Mapping[str, str] = field(default_factory=dict)
    clock_skew_ms: int | None = None


@dataclass(frozen=True, slots=True)
class PartitionPolicy:
    max_future_skew_ms: int
    max_event_age_ms: int


def new_context(
    *,
    gateway_id: str,
    availability_zone: str,
    device_id: str | None,
    device_metadata: Mapping[str, str],
    clock_skew_ms: int | None,
    now: float | None = None,
) -> RequestContext:
    now = time.time() if now is None else now
    received_ms = int(now * 1000)
    return RequestContext(
        ingest_id=uuid.uuid4().hex,
        received_ms=received_ms,
        received_at=rfc3339_ms(received_ms),
        gateway_id=gateway_id,
        availability_zone=availability_zone,
        device_id=device_id,
        device_metadata=device_metadata,
        clock_skew_ms=clock_skew_ms,
    )


def rfc3339_ms(epoch_ms: int) -> str:
    seconds, millis = divmod(epoch_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def partition_hour(event_ms: int, received_ms: int, policy: PartitionPolicy) -> tuple[int, str]:
    """The hour a record is filed under: its event time, unless the device clock is not believable."""
    skew = event_ms - received_ms
    if skew > policy.max_future_skew_ms or -skew > policy.max_event_age_ms:
        return received_ms // HOUR_MS, "arrival_time"
    return event_ms // HOUR_MS, "event_time"


def raw_line(ctx: RequestContext, index: int, record: Record, raw: bytes, event_ms: int, partitioned_by: str) -> RawLine:
    return RawLine(
        ingest_id=ctx.ingest_id,
        index=index,
        received_at=ctx.received_at,
        gateway_id=ctx.gateway_id,
        availability_zone=ctx.availability_zone,
        device_id=record.device_id,
        event_time_ms=event_ms,
        partitioned_by=partitioned_by,
        seq=record.seq,
        clock_skew_ms=ctx.clock_skew_ms,
        device=dict(ctx.device_metadata),
        record=msgspec.Raw(raw),
    )


def quarantine_line(ctx: RequestContext, index: int, raw: bytes, reason: str) -> QuarantineLine:
    return QuarantineLine(
        ingest_id=ctx.ingest_id,
        index=index,
        received_at=ctx.received_at,
        gateway_id=ctx.gateway_id,
        availability_zone=ctx.availability_zone,
        device_id=ctx.device_id or "",
        reason=reason,
        raw=raw.decode("utf-8", errors="replace"),
    )
