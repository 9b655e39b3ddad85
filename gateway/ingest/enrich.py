"""Enrichment: the envelope the gateway puts around each record. Pure functions, no I/O."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from gateway.ingest.records import QuarantineLine, Record

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
    # The device's address: the TCP peer, or X-Forwarded-For when the peer is a trusted proxy.
    source_ip: str | None = None


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
    source_ip: str | None = None,
    now: float | None = None,
) -> RequestContext:
    now = time.time() if now is None else now
    received_ms = int(now * 1000)
    return RequestContext(
        ingest_id=os.urandom(12).hex(),
        received_ms=received_ms,
        received_at=rfc3339_ms(received_ms),
        gateway_id=gateway_id,
        availability_zone=availability_zone,
        device_id=device_id,
        device_metadata=device_metadata,
        clock_skew_ms=clock_skew_ms,
        source_ip=source_ip,
    )


def rfc3339_ms(epoch_ms: int) -> str:
    seconds, millis = divmod(epoch_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def partition_hours(events_ms: list[int], received_ms: int, policy: PartitionPolicy) -> tuple[list[int], list[bool]]:
    """The hour each record is filed under, and whether that is its event time (True) or arrival
    time (its device clock was beyond the configured skew)."""
    earliest, latest = received_ms - policy.max_event_age_ms, received_ms + policy.max_future_skew_ms
    by_event_time = [earliest <= event_ms <= latest for event_ms in events_ms]
    arrival = received_ms // HOUR_MS
    return [e // HOUR_MS if by_event else arrival for e, by_event in zip(events_ms, by_event_time)], by_event_time


class RawLineWriter:
    """Writes raw-zone lines for one request, the fields of ``RawLine`` in a fixed order.

    What is common to the request is encoded once (``shared``, the lines' beginning); each record
    adds only its own few fields and its bytes as sent (``rest``), so enriching costs a fraction of
    decoding, and the WAL stores the beginning once per frame (``wal.shared_payload``).
    """

    __slots__ = ("shared", "_device")

    _BY_EVENT = b',"partitioned_by":"event_time","seq":'
    _BY_ARRIVAL = b',"partitioned_by":"arrival_time","seq":'

    def __init__(self, ctx: RequestContext) -> None:
        common = {
            "ingest_id": ctx.ingest_id,
            "received_at": ctx.received_at,
            "gateway_id": ctx.gateway_id,
            "availability_zone": ctx.availability_zone,
            "clock_skew_ms": ctx.clock_skew_ms,
            "device": dict(ctx.device_metadata),
            "source_ip": ctx.source_ip,
        }
        self.shared = msgspec.json.encode(common)[:-1]
        self._device = _device_part(ctx.device_id) if ctx.device_id else None

    def rests(
        self, indexes: Iterable[int], records: list[Record], raws: list[bytes], events_ms: list[int], by_event_time: list[bool]
    ) -> list[bytes]:
        """What follows ``shared`` on each record's line; each starts with a comma."""
        # One comprehension, few pieces in one format, the constant ones prepared: per record, a
        # method call and a format per field cost twice as much.
        device = self._device
        by = (self._BY_ARRIVAL, self._BY_EVENT)
        return [
            b',"index":%d%b%d%b%b,"record":%b}'
            % (index, device or _device_part(record.device_id), event_ms, by[by_event], b"null" if record.seq is None else b"%d" % record.seq, raw)
            for index, record, raw, event_ms, by_event in zip(indexes, records, raws, events_ms, by_event_time)
        ]


def _device_part(device_id: str) -> bytes:
    # device_id is all of [A-Za-z0-9._:-] (schema), so it needs no JSON escaping.
    return b',"device_id":"%b","event_time_ms":' % device_id.encode()


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
