"""Making file-system changes durable: fsynced directories, atomic replacement, reserved state files.

The one place for this, used by the connectors (the local lake, the EventBridge outbox) and by the
gateway (WAL, retry ledger, landing state, device registry, key cache); it lives in ``connectors/``
because connectors never import the gateway.

A new file or directory is durable only once its parent directory is fsynced too. State that must be
written while the disk is full (a zone's position, which is what frees WAL space) goes to a
``ReservedStateFile``: its space is allocated when it is created and later writes overwrite it in place.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path


def fsync_directory(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_directory(path: str | os.PathLike[str], *, fsync: bool = True) -> Path:
    """Create ``path`` (and parents) so that it survives a crash: each new entry's parent is fsynced.

    An entry created meanwhile by someone else has its parent fsynced too: its creator may not have
    done so yet. ``fsync=False`` (benchmarks that measure what durability costs) only creates.
    """
    path = Path(path)
    missing = []
    at = path
    while not at.exists():
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        if fsync:
            fsync_directory(directory.parent)
    return path


def write_atomically(path: str | os.PathLike[str], payload: bytes, *, mode: int = 0o640, fsync: bool = True) -> None:
    """Replace ``path`` with ``payload``: readers see the old or the new bytes, never a mix.

    The temporary file is always a new one (``O_EXCL``), never reached through a planted link
    (``O_NOFOLLOW``), and has ``mode`` from its first byte (0o600 for secrets); on any error it is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fdatasync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(path.parent)


class ReservedStateFile:
    """Small state written in place into space allocated up front, so a full disk cannot stop it.

    Two slots alternate; each holds ``magic | generation u64 | length u32 | crc32 u32 | payload``.
    A write goes to the slot not holding the newest state and is fsynced, so a crash mid-write
    leaves the previous state readable. Payloads larger than a slot grow the file (that needs space).
    """

    MAGIC = b"EGST"
    HEADER = struct.Struct("<4sQII")

    def __init__(self, path: str | os.PathLike[str], slot_bytes: int = 256 * 1024, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._slot_bytes = slot_bytes
        self._fsync = fsync
        self._generation = 0
        self._slot = 1  # the slot holding the newest state; the first write goes to slot 0
        self._fd = -1
        self.damaged = False  # set by open(): states were written here, and none of them reads back

    def open(self) -> bytes | None:
        """Allocate the file if needed and return the newest state in it (None when there is none)."""
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            size = os.fstat(self._fd).st_size
            if size < 2 * self._slot_bytes:
                os.posix_fallocate(self._fd, 0, 2 * self._slot_bytes)  # ENOSPC on a full disk: open again later
                if self._fsync:
                    os.fsync(self._fd)
            else:
                self._slot_bytes = size // 2
            if created and self._fsync:
                fsync_directory(self.path.parent)
        except BaseException:
            self.close()
            raise
        best: tuple[int, int, bytes] | None = None
        for slot in (0, 1):
            found = self._read_slot(slot)
            if found is not None and (best is None or found[0] > best[0]):
                best = (found[0], slot, found[1])
        if best is None:
            self.damaged = not created and any(self._written(slot) for slot in (0, 1))
            return None
        self._generation, self._slot, payload = best
        return payload

    def _written(self, slot: int) -> bool:
        return os.pread(self._fd, self.HEADER.size, slot * self._slot_bytes).strip(b"\0") != b""

    def _read_slot(self, slot: int) -> tuple[int, bytes] | None:
        header = os.pread(self._fd, self.HEADER.size, slot * self._slot_bytes)
        if len(header) < self.HEADER.size:
            return None
        magic, generation, length, crc = self.HEADER.unpack(header)
        if magic != self.MAGIC or length > self._slot_bytes - self.HEADER.size:
            return None
        payload = os.pread(self._fd, length, slot * self._slot_bytes + self.HEADER.size)
        if len(payload) != length or zlib.crc32(payload) != crc:
            return None
        return generation, payload

    def write(self, payload: bytes) -> None:
        if len(payload) > self._slot_bytes - self.HEADER.size:
            self._grow(len(payload))
        slot = 1 - self._slot
        generation = self._generation + 1
        record = self.HEADER.pack(self.MAGIC, generation, len(payload), zlib.crc32(payload)) + payload
        written = os.pwrite(self._fd, record, slot * self._slot_bytes)
        if written != len(record):
            raise OSError(f"short write to {self.path}")
        if self._fsync:
            os.fdatasync(self._fd)
        self._generation, self._slot = generation, slot

    def _grow(self, needed: int) -> None:
        """Double the slots until ``needed`` fits; the newest state moves to slot 0 of the new layout."""
        slot_bytes = self._slot_bytes
        while needed > slot_bytes - self.HEADER.size:
            slot_bytes *= 2
        current = self._read_slot(self._slot)
        os.posix_fallocate(self._fd, 0, 2 * slot_bytes)
        self._slot_bytes = slot_bytes
        if current is not None:
            # Keep the newest state readable in the new layout before the next write replaces it.
            record = self.HEADER.pack(self.MAGIC, current[0], len(current[1]), zlib.crc32(current[1])) + current[1]
            os.pwrite(self._fd, record, 0)
            os.pwrite(self._fd, b"\0" * self.HEADER.size, slot_bytes)
            if self._fsync:
                os.fdatasync(self._fd)
        self._slot = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
