"""The lake as the drill sees it: which ``(device_id, seq)`` landed where, by which instance, and when.

``LakeIndex`` lists the lake's objects (cheap, every second while the drill runs, remembering when
each object was first seen) and decodes them on demand, each object once. An object's landing
time is the earlier of its first sighting and its modification time then, and stays so: a replay
after a crash rewrites an object that had already landed with the same bytes, which must not make
its records look late. The lake is a local directory (``LocalStore``) or a bucket behind the S3 API
(``S3Store``; the drill runs moto's server for it).
"""

from __future__ import annotations

import collections
import io
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import zstandard

ZONES = ("raw", "curated", "quarantine")

Key = tuple[str, int]


class Store(Protocol):
    def list(self) -> Iterator[tuple[str, float, int]]:
        """Every object of the zones: (key below the lake's root, modification time, size)."""

    def read(self, key: str) -> bytes: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self) -> Iterator[tuple[str, float, int]]:
        for zone in ZONES:
            base = self.root / zone
            if not base.exists():
                continue
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith("."):  # still being written
                        continue
                    path = Path(dirpath) / name
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    yield path.relative_to(self.root).as_posix(), st.st_mtime, st.st_size

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


class S3Store:
    """A bucket through the S3 API (an object is listed only once its upload completed)."""

    def __init__(self, endpoint_url: str, bucket: str, prefix: str = "", region: str = "us-east-1") -> None:
        import boto3  # the test extra, as moto's server is

        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def list(self) -> Iterator[tuple[str, float, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for zone in ZONES:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{zone}/"):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix):], obj["LastModified"].timestamp(), obj["Size"]

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()


@dataclass
class LakeObject:
    zone: str
    key: str  # below the lake's root: <zone>/<dataset>/dt=.../hour=.../<gateway_id>-<first>-<last>-<tag>.<ext>
    gateway_id: str
    landed_at: float  # wall-clock seconds: the first sighting, or the object's time if that is earlier
    mtime: float
    size: int
    keys: list[Key] | None = None  # decoded on demand


@dataclass
class ZoneCount:
    """One zone's copies of every record: key -> [(gateway_id, landed_at wall time), ...]."""

    copies: dict[Key, list[tuple[str, float]]] = field(default_factory=lambda: collections.defaultdict(list))

    def keys(self) -> set[Key]:
        return set(self.copies)


class LakeIndex:
    def __init__(self, store: Store | Path, gateway_ids: Iterable[str]) -> None:
        self.store: Store = LocalStore(store) if isinstance(store, Path) else store
        # Longest first: "drill-a" must not claim "drill-ab-..." objects.
        self.gateway_ids = sorted(gateway_ids, key=len, reverse=True)
        self.objects: dict[str, LakeObject] = {}
        self._lock = threading.Lock()

    def _gateway_of(self, name: str) -> str:
        for gid in self.gateway_ids:
            if name.startswith(gid + "-"):
                return gid
        return ""

    def refresh(self) -> int:
        """List the lake; returns how many objects appeared since the last listing."""
        now = time.time()
        new = 0
        for key, mtime, size in self.store.list():
            with self._lock:
                known = self.objects.get(key)
                if known is None:
                    name = key.rsplit("/", 1)[-1]
                    self.objects[key] = LakeObject(key.split("/", 1)[0], key, self._gateway_of(name), min(now, mtime), mtime, size)
                    new += 1
                elif (known.mtime, known.size) != (mtime, size):
                    # Rewritten by a replay: same key, same records; keep the first sighting.
                    known.mtime, known.size, known.keys = mtime, size, None
        return new

    def decode(self, *, gateway_id: str | None = None, zones: Iterable[str] = ZONES) -> None:
        wanted = set(zones)
        with self._lock:
            todo = [o for o in self.objects.values() if o.keys is None and o.zone in wanted
                    and (gateway_id is None or o.gateway_id == gateway_id)]
        for obj in todo:
            try:
                obj.keys = _decode(obj.zone, self.store.read(obj.key))
            except FileNotFoundError:
                continue

    def count(self, zone: str, *, gateway_id: str | None = None) -> ZoneCount:
        self.decode(gateway_id=gateway_id, zones=[zone])
        out = ZoneCount()
        with self._lock:
            objects = [o for o in self.objects.values() if o.zone == zone and (gateway_id is None or o.gateway_id == gateway_id)]
        for obj in objects:
            for key in obj.keys or ():
                out.copies[key].append((obj.gateway_id, obj.landed_at))
        return out

    def summary(self) -> dict[str, dict[str, int]]:
        with self._lock:
            objects = list(self.objects.values())
        out: dict[str, dict[str, int]] = {}
        for zone in ZONES:
            mine = [o for o in objects if o.zone == zone]
            out[zone] = {"objects": len(mine), "bytes": sum(o.size for o in mine),
                         "records": sum(len(o.keys) for o in mine if o.keys is not None)}
        return out


def _decode(zone: str, data: bytes) -> list[Key]:
    if zone == "curated":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(io.BytesIO(data)).read(columns=["device_id", "seq"])
        return [(d, s) for d, s in zip(table.column("device_id").to_pylist(), table.column("seq").to_pylist())
                if s is not None]
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    keys = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        entry = orjson.loads(line)
        if zone == "quarantine":
            # A refused record keeps its text as sent; it names the device if it could be parsed.
            try:
                entry = orjson.loads(entry.get("raw") or "{}")
            except orjson.JSONDecodeError:
                continue
            if not isinstance(entry, dict):
                continue
        device_id, seq = entry.get("device_id"), entry.get("seq")
        if isinstance(device_id, str) and isinstance(seq, int):
            keys.append((device_id, seq))
    return keys
