"""Holds a request's encoded frames until the request is complete and signed, in bounded memory.

Small requests stay in memory; past ``memory_bytes`` frames go to an unlinked temporary file, so a
50 MiB body costs a few MiB of memory. Nothing here is durable: the WAL append at the end is.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

CHUNK_BYTES = 1024 * 1024


class SpoolFull(Exception):
    """The disk holding spooled requests is full; the request is refused, nothing of it lands."""


class Spool:
    def __init__(self, directory: str | os.PathLike[str], memory_bytes: int) -> None:
        self._directory = directory
        self._memory_limit = memory_bytes
        self._frames: list[bytes] = []
        self._memory = 0
        self._file = None
        self._file_frames: list[int] = []  # lengths of the frames in the file, in order
        self.bytes = 0

    def add(self, frame: bytes) -> None:
        self.bytes += len(frame)
        if self._file is None and self._memory + len(frame) <= self._memory_limit:
            self._frames.append(frame)
            self._memory += len(frame)
            return
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._directory, prefix="spool-")
            self._file.write(frame)
        except OSError as exc:
            raise SpoolFull(f"no room to hold this request while it is read: {exc}") from None
        self._file_frames.append(len(frame))

    def chunks(self) -> Iterator[list[bytes]]:
        """The frames in order, in groups of about ``CHUNK_BYTES``, each group whole frames."""
        if self._frames:
            yield self._frames
        if self._file is None:
            return
        self._file.flush()
        self._file.seek(0)
        group: list[int] = []
        size = 0
        for length in self._file_frames:
            group.append(length)
            size += length
            if size >= CHUNK_BYTES:
                yield self._read_group(group, size)
                group, size = [], 0
        if group:
            yield self._read_group(group, size)

    def drain(self) -> Iterator[list[bytes]]:
        """``chunks`` for a reader that reads the frames once (the WAL's writer): each group is let
        go as the reader moves on, and the spool is empty once it is read through, so a request
        waiting for its fsync no longer holds its frames."""
        frames, self._frames, self._memory = self._frames, [], 0
        if frames:
            yield frames
        del frames
        if self._file is not None:
            yield from self.chunks()
        self.close()

    def _read_group(self, lengths: list[int], size: int) -> list[bytes]:
        data = self._file.read(size)
        out, at = [], 0
        for length in lengths:
            out.append(data[at : at + length])
            at += length
        return out

    @property
    def frame_count(self) -> int:
        return len(self._frames) + len(self._file_frames)

    @property
    def empty(self) -> bool:
        return self.bytes == 0

    def clear(self) -> None:
        """Drop every frame (the request is validated again into the same spool)."""
        self.close()
        self._memory = 0
        self._file_frames = []
        self.bytes = 0

    def close(self) -> None:
        self._frames = []
        if self._file is not None:
            self._file.close()
            self._file = None
