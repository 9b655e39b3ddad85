"""What a WAL's owner and the process landing it tell each other, through two small shared files.

With ``listen.workers > 1`` each worker owns its WAL (it appends and fsyncs) while the lake process
(gateway/lake/lake_process.py) reads and lands it. They share two boards in the WAL directory:

    <slot>/wal.durable         the owner's durable end: (LSN, first LSN of its segment, byte offset)
    <slot>/consumers/released  per zone, the position whose state the lake process has written

A board is a memory-mapped page of unsigned 64-bit values and their CRC. Readers in the other
process retry a read whose CRC does not match (it met a write half done), so no lock is shared.
Neither board is ever fsynced: after a crash the owner publishes its recovered end before serving,
and a release lost with the page cache only means a segment is deleted a little later.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from pathlib import Path

from connectors.durable_files import ensure_directory

DURABLE_BOARD = "wal.durable"
RELEASED_BOARD = "released"
# The zones a WAL can have, each with its place on the released board (never reordered).
ZONES = ("raw", "quarantine", "curated")
_MAGIC = 0x45475742  # "EGWB"
_PAGE = 4096


class Board:
    """A fixed number of u64 values in a shared file; one process writes, others read."""

    def __init__(self, path: str | os.PathLike[str], values: int) -> None:
        self.path = Path(path)
        self._layout = struct.Struct(f"<I{values}QI")  # magic, values, crc of both
        self._values = values
        self._map: mmap.mmap | None = None

    def _open(self, create: bool) -> bool:
        if self._map is not None:
            return True
        if create:
            ensure_directory(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        else:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return False
        try:
            if os.fstat(fd).st_size < _PAGE:
                if not create:
                    return False  # its writer is creating it: read it next time
                # Allocated, not sparse: a write into a hole of a mapped file on a full disk is a SIGBUS.
                os.posix_fallocate(fd, 0, _PAGE)
            self._map = mmap.mmap(fd, _PAGE)
        finally:
            os.close(fd)
        return True

    def write(self, values: tuple[int, ...] | list[int]) -> None:
        self._open(create=True)
        body = struct.pack(f"<I{self._values}Q", _MAGIC, *values)
        self._layout.pack_into(self._map, 0, _MAGIC, *values, zlib.crc32(body))

    def read(self) -> tuple[int, ...] | None:
        """The values last written, or None when nothing was written yet."""
        if not self._open(create=False):
            return None
        for _ in range(1000):  # a torn read only happens while a write is under way: try again
            magic, *values, crc = self._layout.unpack_from(self._map, 0)
            if magic == 0 and crc == 0:
                return None
            if crc == zlib.crc32(struct.pack(f"<I{self._values}Q", magic, *values)) and magic == _MAGIC:
                return tuple(values)
        raise OSError(f"the shared board {self.path} stays unreadable (damaged)")

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def durable_board(slot_directory: str | os.PathLike[str]) -> Board:
    return Board(Path(slot_directory) / DURABLE_BOARD, 3)


def released_board(slot_directory: str | os.PathLike[str]) -> Board:
    return Board(Path(slot_directory) / "consumers" / RELEASED_BOARD, len(ZONES) + 1)


class ReleasedPositions:
    """The released board as zone -> position; slot 0 says which zones have written one."""

    def __init__(self, board: Board) -> None:
        self._board = board
        self._positions = [0] * len(ZONES)
        self._known = 0

    def publish(self, zone: str, position: int) -> None:
        i = ZONES.index(zone)
        self._positions[i] = position
        self._known |= 1 << i
        self._board.write([self._known, *self._positions])

    def clear(self) -> None:
        """Forget what an earlier life published: each zone publishes again from its state file."""
        self._positions = [0] * len(ZONES)
        self._known = 0
        self._board.write([0, *self._positions])

    def read(self) -> dict[str, int]:
        values = self._board.read()
        if values is None:
            return {}
        known, *positions = values
        return {zone: positions[i] for i, zone in enumerate(ZONES) if known & (1 << i)}

    def close(self) -> None:
        self._board.close()
