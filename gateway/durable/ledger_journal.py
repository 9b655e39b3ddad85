"""The retry ledger's journal: what it recorded, in files that outlive a power loss.

The ledger (LMDB, without fsyncs of its own) survives a killed process, not a power loss: after one,
the instance's owner starts an empty ledger and refills it from what the WALs still hold. Records
whose segments had landed and been deleted before the power went were in neither, so a device that
resent them after the restart got them landed a second time. The journal closes that gap the way
Kafka keeps its producers' state (snapshots beside the log, then the log's tail): every ``record``
also appends what it put into the ledger (seq runs, answered requests) to a journal file, and a WAL
makes the journal durable (``make_durable``) before it deletes a segment. So whatever a deleted
segment held is in the journal on disk, and a rebuilt ledger replays the journal, then the WALs.

Files: ``<ledger>/journal/<start ns>-<pid>.log``, each appended by one process only (a new one per
process life, and once a file holds ``file_bytes`` or was begun ``window_secs`` ago). A frame is its
payload's length and CRC-32 (4 bytes each, big-endian), then the payload: msgpack of the seq
entries' and the request entries' keys and values, exactly as the ledger stores them. A frame that
does not check (a torn tail) ends its file's replay. A file goes once it was last written over twice
the window ago (a lookup sees two generations), and the least recently written go first while the
files hold over ``max_bytes`` (the ledger forgets as much once its generations fill).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec

from connectors.durable_files import ensure_directory, fsync_directory

log = logging.getLogger(__name__)

SUFFIX = ".log"
_FRAME = struct.Struct(">II")  # payload length, CRC-32 of the payload
Entries = list[tuple[bytes, bytes]]  # (key, value), as stored in the ledger's databases


class _Payload(msgspec.Struct, array_like=True):
    seqs: Entries
    requests: Entries


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Payload).decode


class LedgerJournal:
    """One process's appends to the journal, and any process's replay and fsync of all of it."""

    def __init__(self, directory: Path, *, window_secs: float, max_bytes: int) -> None:
        self.directory = directory
        self.window_secs = window_secs
        self.max_bytes = max_bytes
        self.file_bytes = max(1 << 20, min(16 << 20, max_bytes // 8))
        self._fd = -1
        self._size = 0
        self._began = 0.0  # time.monotonic() at the current file's creation
        self._failing: int | None = None  # the errno the last append met, logged once until one succeeds
        self._synced: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) when this process last fsynced it
        self._names_synced: frozenset[str] = frozenset()
        self._sync_lock = threading.Lock()  # the remover threads of a worker's own WAL and of orphans it drains

    # -- appending (the ledger's write lock is held) --------------------------------------------

    def append(self, seqs: Entries, requests: Entries) -> None:
        """Add one ``record``'s entries. Never raises: a journal that cannot be written costs only
        what it is for (retries landing again after a power loss), never an acknowledgement."""
        if not seqs and not requests:
            return
        payload = _encode(_Payload(seqs, requests))
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        try:
            if self._fd >= 0 and self._outlived():
                self.close()
            if self._fd < 0:
                self._begin_file()
            written = os.write(self._fd, frame)
            if written != len(frame):  # a regular file written in part: its disk is full
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(frame)} bytes")
        except OSError as exc:
            self._undo_partial_append(exc)
            return
        self._size += len(frame)
        if self._failing is not None:
            log.warning("retry ledger journal written again", extra={"journal": str(self.directory)})
            self._failing = None
        if self._size >= self.file_bytes:
            self.close()

    def _outlived(self) -> bool:
        """Whether the open file is due for a new one: begun a window ago (so no file last written
        two windows ago is ever written again), or deleted by another process's clean-up (appends to
        it would be lost)."""
        return time.monotonic() - self._began >= self.window_secs or os.fstat(self._fd).st_nlink == 0

    def _begin_file(self) -> None:
        ensure_directory(self.directory)  # its name made durable: a journal is no use in a directory a power loss undoes
        self._drop_expired()  # at each new file: so the short lives of a crash-looping process cannot pile files up
        path = self.directory / f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = 0
        self._began = time.monotonic()

    def _undo_partial_append(self, exc: OSError) -> None:
        """A frame written in part would end the file's replay there: cut it off (as the WAL does)."""
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self.close()  # the next append starts a new file; this one's replay ends at the torn frame
        if self._failing != exc.errno:  # by errno: a full disk's messages differ write to write
            log.error(
                "retry ledger journal not written: after a power loss, retries of these records may land again",
                extra={"journal": str(self.directory), "error": str(exc)},
            )
            self._failing = exc.errno

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _drop_expired(self) -> None:
        """Delete files past the window, then the least recently written while all hold over ``max_bytes``."""
        files = self._files_by_last_write()
        now = time.time()
        total = sum(size for _, size, _ in files)
        for path, size, mtime in files[:-1]:  # never the newest: another process may be writing it
            if now - mtime <= 2 * self.window_secs and total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def _files_by_last_write(self) -> list[tuple[Path, int, float]]:
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # another process dropped it meanwhile
            found.append((path, st.st_size, st.st_mtime))
        return sorted(found, key=lambda f: f[2])

    # -- durability (before a WAL deletes a segment) --------------------------------------------

    def make_durable(self) -> None:
        """Fsync every journal file changed since this process last did, whoever wrote it (a killed
        predecessor's appends are in the page cache only), and the directory if names changed."""
        if not self.directory.is_dir():
            return
        with self._sync_lock:
            self._sync_changed()

    def _sync_changed(self) -> None:
        names = set()
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            names.add(path.name)
            state = (st.st_size, st.st_mtime_ns)
            if self._synced.get(path.name) == state:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._synced[path.name] = state
        for gone in self._synced.keys() - names:
            del self._synced[gone]
        if names != self._names_synced:
            fsync_directory(self.directory)
            self._names_synced = frozenset(names)

    # -- replay (the owner, rebuilding the ledger) ----------------------------------------------

    def replay(self) -> Iterator[tuple[Entries, Entries]]:
        """Every whole frame of every file, oldest file first: ``(seq entries, request entries)``."""
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            at = 0
            while at + _FRAME.size <= len(data):
                length, crc = _FRAME.unpack_from(data, at)
                payload = data[at + _FRAME.size : at + _FRAME.size + length]
                if len(payload) != length or zlib.crc32(payload) != crc:
                    break
                try:
                    entries = _decode(payload)
                except msgspec.DecodeError:
                    break
                yield entries.seqs, entries.requests
                at += _FRAME.size + length
            if at < len(data):  # after a power loss, the tail appended since the last fsync: the WAL holds it
                log.info(
                    "retry ledger journal: a torn or damaged frame ends a file; what follows it is not replayed",
                    extra={"journal_file": path.name, "offset": at, "bytes_left": len(data) - at},
                )
