"""``LocalLakeSink``: the embedded default's lake, a directory with the same layout as the bucket.

An object becomes visible atomically (written to a temporary name, fsynced, renamed), so a reader
never sees half an object and a replay after a crash simply replaces it with identical bytes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from connectors.base import LakeObject, LandedObject
from connectors.errors import PermanentError, TransientError


class LocalLakeSink:
    name = "local"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self._fsync = fsync

    async def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermanentError(f"cannot create the lake directory {self.root}: {exc}") from None

    async def put_object(self, obj: LakeObject) -> LandedObject:
        path = self.root / obj.key
        try:
            await asyncio.to_thread(self._write, path, obj.body)
        except OSError as exc:
            raise TransientError(f"cannot write {path}: {exc}", endpoint=str(self.root)) from None
        return LandedObject(
            url=path.resolve().as_uri(), key=obj.key, bytes=len(obj.body), records=obj.records, zone=obj.partition.zone
        )

    def _write(self, path: Path, body: bytes) -> None:
        self._make_directories(path.parent)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            if self._fsync:
                f.flush()
                os.fdatasync(f.fileno())
        os.replace(tmp, path)
        if self._fsync:
            _fsync_directory(path.parent)

    def _make_directories(self, directory: Path) -> None:
        """Create a partition's directories so they survive a crash: each new entry's parent is fsynced."""
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            if self._fsync:
                _fsync_directory(new.parent)

    async def close(self) -> None:
        return None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
