"""The wire schema devices send (v1) and the envelopes the gateway writes around it.

Decoding is validation: ``Record`` carries every constraint of the record schema v1 (docs/device-api.md). Unknown fields
are ignored by the typed decode but never lost: the raw zone stores each record exactly as sent
(``RawLine.record`` holds the original bytes).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

# Floats beyond the double range decode as inf; these bounds reject them (metrics must be finite).
_MAX_FLOAT = 1.7976931348623157e308
FiniteFloat = Annotated[float, Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]
# \Z, not $: "$" also matches before a final line break, which would break the id's NDJSON line.
DeviceId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+\Z")]
MetricName = Annotated[str, Meta(min_length=1, max_length=128)]
EpochMillis = Annotated[int, Meta(ge=0, le=253402300799999)]  # up to 9999-12-31
AwareDatetime = Annotated[datetime, Meta(tz=True)]


class Record(msgspec.Struct, frozen=True, gc=False):
    """One telemetry record, schema v1.

    Not tracked by the garbage collector (``gc=False``): it holds only strings, numbers, a datetime
    and dicts of those, so it can never be part of a cycle, and a request's hundreds of records in
    flight would otherwise set off collections that stop the event loop.
    """

    device_id: DeviceId
    ts: AwareDatetime | EpochMillis
    metrics: Annotated[dict[MetricName, FiniteFloat], Meta(min_length=1, max_length=256)]
    seq: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    tags: dict[Annotated[str, Meta(max_length=128)], Annotated[str, Meta(max_length=1024)]] | None = None

    def event_time_ms(self) -> int:
        ts = self.ts
        if isinstance(ts, int):
            return ts
        return int(ts.timestamp() * 1000)


class RecordOfAnyId(Record, frozen=True, gc=False):
    """``Record`` without the device_id pattern: a request's records name one device, so a bulk
    decode checks each distinct id once (``valid_device_id``) instead of running the regex per record."""

    device_id: str


_DEVICE_ID = re.compile(DeviceId.__metadata__[0].pattern)


def valid_device_id(device_id: str) -> bool:
    """What ``Record`` requires of a device_id."""
    return 0 < len(device_id) <= 128 and _DEVICE_ID.match(device_id) is not None


class RawLine(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of the raw zone: the record exactly as sent, inside the gateway's envelope."""

    ingest_id: str  # one per request; (ingest_id, index) names a record uniquely
    index: int  # position of the record in its request
    received_at: str  # RFC 3339, UTC, milliseconds
    gateway_id: str
    availability_zone: str
    device_id: str
    event_time_ms: int
    # "event_time", or "arrival_time" when the device clock was beyond the configured skew.
    partitioned_by: str
    seq: int | None = None
    # Device clock minus gateway clock, from the signed X-Timestamp header (None when unsigned).
    clock_skew_ms: int | None = None
    device: dict[str, str] = {}
    # The device's address: the TCP peer, or X-Forwarded-For from a trusted proxy.
    source_ip: str | None = None
    record: msgspec.Raw = msgspec.Raw(b"{}")


class QuarantineLine(msgspec.Struct, kw_only=True):
    """One line of the quarantine zone: what was sent, and why it was refused."""

    ingest_id: str
    index: int
    received_at: str
    gateway_id: str
    availability_zone: str
    device_id: str  # the authenticated sender
    reason: str
    # Text as sent (invalid UTF-8 replaced), so a record that is not even JSON is still kept.
    raw: str


# The curated zone decodes thousands of these per read and keeps them until the slice is built: like
# ``Record``, they hold only strings, numbers and dicts of those, so the collector need not track them
# (tracked, garbage collections took 60% of decoding them).
class RecordBody(msgspec.Struct, gc=False):
    """What the curated zone needs of a record already validated at ingest: no checks again."""

    metrics: dict[str, float]
    tags: dict[str, str] | None = None


class CuratedSource(msgspec.Struct, kw_only=True, gc=False):
    """The fields the curated zone reads back from each raw line: those of the record itself."""

    index: int
    device_id: str
    event_time_ms: int
    seq: int | None = None
    record: RecordBody


class CuratedRequest(msgspec.Struct, kw_only=True, gc=False):
    """The fields every raw line of one WAL frame shares (a frame holds one request's records):
    read from its first line only."""

    ingest_id: str
    received_at: str
    gateway_id: str
    availability_zone: str
    device: dict[str, str] = {}
