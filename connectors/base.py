"""The seams between the gateway and the systems it talks to.

Every connector implements one of these protocols, so the pipeline never imports a vendor SDK and a
test can plug in another implementation (the local lake directory stands in for S3; the embedded
model stands in for Triton). Errors a connector raises are the ones in ``connectors.errors``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

LSN_DIGITS = 16


def object_name(gateway_id: str, first_lsn: int, last_lsn: int, tag: str) -> str:
    """A lake object's base name without its extension: ``<gateway_id>-<first_lsn>-<last_lsn>-<tag>``
    (the tag is empty for an object an earlier version sealed, and its name ends at the last LSN)."""
    name = f"{gateway_id}-{first_lsn:0{LSN_DIGITS}d}-{last_lsn:0{LSN_DIGITS}d}"
    return f"{name}-{tag}" if tag else name


def object_lsns(base_name: str, gateway_id: str) -> tuple[int, int] | None:
    """(first_lsn, last_lsn) when ``base_name`` (with its extension) names an object ``gateway_id``
    wrote, tagged or not; None for another writer's, including one whose id merely starts alike."""
    match = _name_pattern(gateway_id).match(base_name)
    return (int(match[1]), int(match[2])) if match else None


@functools.lru_cache(maxsize=64)
def _name_pattern(gateway_id: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(gateway_id)}-([0-9]+)-([0-9]+)(?:-[a-z]+)?\.")


@dataclass(frozen=True, slots=True)
class Partition:
    """One Hive-style partition of one dataset in one zone of the lake."""

    zone: str  # raw | curated | quarantine
    dataset: str
    dt: str  # YYYY-MM-DD
    hour: str  # HH

    @property
    def prefix(self) -> str:
        return f"{self.zone}/{self.dataset}/dt={self.dt}/hour={self.hour}"


@dataclass(frozen=True, slots=True)
class LakeObject:
    """A finished object, ready to land. ``key`` is relative to the lake root (bucket or directory)."""

    partition: Partition
    key: str
    body: bytes
    content_type: str
    records: int
    first_lsn: int
    last_lsn: int
    # Event-time range of the records inside, epoch milliseconds.
    min_event_ms: int
    max_event_ms: int
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LandedObject:
    """What a sink reports once an object is durable in the lake."""

    url: str  # file:///... or s3://bucket/key
    key: str
    bytes: int
    records: int
    zone: str
    etag: str = ""


@runtime_checkable
class ObjectSink(Protocol):
    """Where finished lake objects land: a local directory or an S3 bucket.

    ``put_object`` must be idempotent for a given key and body: a replay after a crash rewrites the
    same key with the same bytes. It returns only once the object is durable.
    """

    name: str

    async def start(self) -> None: ...

    async def put_object(self, obj: LakeObject) -> LandedObject: ...

    async def close(self) -> None: ...
