"""``LocalLakeSink``: the embedded default's lake, a directory with the same layout as the bucket.

An object becomes visible atomically (written to a new temporary name, fsynced, renamed:
``connectors.durable_files.write_atomically``), so a reader never sees half an object and a replay
after a crash simply replaces it with identical bytes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from connectors.base import LakeObject, LandedObject
from connectors.durable_files import ensure_directory, write_atomically
from connectors.errors import PermanentError, TransientError


class LocalLakeSink:
    name = "local"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self._fsync = fsync
        self._url_root = self.root.absolute()  # resolved at start: no lstat of every component per object

    async def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._url_root = self.root.resolve()
        except OSError as exc:
            raise PermanentError(f"cannot create the lake directory {self.root}: {exc}") from None

    async def put_object(self, obj: LakeObject) -> LandedObject:
        path = self.root / obj.key
        try:
            await asyncio.to_thread(self._write, path, obj.body)
        except OSError as exc:
            raise TransientError(f"cannot write {path}: {exc}", endpoint=str(self.root)) from None
        return LandedObject(
            url=(self._url_root / obj.key).as_uri(), key=obj.key, bytes=len(obj.body), records=obj.records, zone=obj.partition.zone
        )

    def _write(self, path: Path, body: bytes) -> None:
        # A partition's new directories survive a crash (each new entry's parent fsynced); objects
        # are world-readable as far as the umask allows, like any file the lake's readers open.
        ensure_directory(path.parent, fsync=self._fsync)
        write_atomically(path, body, mode=0o666, fsync=self._fsync)

    async def close(self) -> None:
        return None
