"""The lake as the drill sees it: which ``(device_id, seq)`` landed where, by which instance, and when.

``LakeIndex`` lists the lake's objects (cheap, every second while the drill runs, remembering when
each object was first seen) and decodes them on demand, each object once. An object's landing
time is the earlier of its first sighting and its modification time then, and stays so: a replay
after a crash rewrites an object that had already landed with the same bytes, which must not make
its records look late.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import zstandard

ZONES = ("raw", "curated", "quarantine")

Key = tuple[str, int]


@dataclass
class LakeObject:
    zone: str
    path: Path
    gateway_id: str
    landed_at: float  # wall-clock seconds: the first sighting, or the file's time if that is earlier
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
    def __init__(self, root: Path, gateway_ids: Iterable[str]) -> None:
        self.root = root
        # Longest first: "drill-a" must not claim "drill-ab-..." objects.
        self.gateway_ids = sorted(gateway_ids, key=len, reverse=True)
        self.objects: dict[Path, LakeObject] = {}
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
                    with self._lock:
                        known = self.objects.get(path)
                        if known is None:
                            self.objects[path] = LakeObject(zone, path, self._gateway_of(name), min(now, st.st_mtime),
                                                            st.st_mtime, st.st_size)
                            new += 1
                        elif (known.mtime, known.size) != (st.st_mtime, st.st_size):
                            # Rewritten by a replay: same key, same records; keep the first sighting.
                            known.mtime, known.size, known.keys = st.st_mtime, st.st_size, None
        return new

    def decode(self, *, gateway_id: str | None = None, zones: Iterable[str] = ZONES) -> None:
        wanted = set(zones)
        with self._lock:
            todo = [o for o in self.objects.values() if o.keys is None and o.zone in wanted
                    and (gateway_id is None or o.gateway_id == gateway_id)]
        for obj in todo:
            try:
                obj.keys = _decode(obj)
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


def _decode(obj: LakeObject) -> list[Key]:
    if obj.zone == "curated":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(obj.path).read(columns=["device_id", "seq"])
        return [(d, s) for d, s in zip(table.column("device_id").to_pylist(), table.column("seq").to_pylist())
                if s is not None]
    with open(obj.path, "rb") as fh:
        data = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()
    keys = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        entry = orjson.loads(line)
        if obj.zone == "quarantine":
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
