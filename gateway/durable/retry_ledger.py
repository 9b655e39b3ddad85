"""What this instance has already accepted, shared by its workers and kept across restarts.

Retries must land nothing twice on whichever worker they arrive and after a crash. The ledger is an
LMDB environment beside the WAL directories (one writer at a time across processes, readers never
block) holding three kinds of entries:

- ``seq``: ``(device_id, seq) -> event time`` of every durable record, so a retried record is a
  duplicate (a sequence number that comes back with another event time is a counter reset, not a retry);
- ``request``: per device, an ``Idempotency-Key`` (or, without one, the body's SHA-256) -> the body's
  hash and the answer given, or a claim by the worker still running it;
- ``signature``: verified signatures until their timestamp leaves the window (replay guard).

Durability follows the WAL, not LMDB: entries for durable records are written by the WAL's commit
thread right after each group fsync, together with a mark saying up to which LSN of that WAL they
are recorded. A crash between the fsync and that write is repaired on start: the worker reads its
WAL from the mark and records what it finds (records carry their seqs; requests carry a
``KIND_REQUEST`` frame with their key and answer). LMDB is opened without its own fsyncs: what a
killed process wrote is in the page cache, and after a power loss the WAL scan rebuilds the rest.

Bounded: entries of each kind live in generations (three LMDB databases per kind, used in turn). A
generation ends after ``window_secs`` or its kind's entry limit; lookups see the current and the
previous one, and starting a new generation empties the oldest.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgspec

log = logging.getLogger(__name__)

GENERATIONS = 3
KINDS = (b"seq", b"request", b"signature")
# Databases other parts of the instance keep in the ledger's environment (the rate-limit buckets), and room to grow.
COMPANION_DBS = 4
_U64 = struct.Struct(">Q")
_GEN = struct.Struct(">QQ")  # generation number, started at (epoch ms)
_SIG = struct.Struct(">d")
CLAIM_STALE_SECS = 120.0
PACK_ANSWERS_OVER_BYTES = 256


class LedgerError(Exception):
    """The ledger cannot be read or written (the disk is full, or it is damaged)."""


class RequestEntry(msgspec.Struct, array_like=True):
    state: str  # "running" or "done"
    body_sha256: str
    owner_pid: int = 0
    at: float = 0.0
    answer: bytes = b""  # the JSON the device got, zlib-compressed when ``packed``
    packed: bool = False

    @classmethod
    def done(cls, body_sha256: str, answer: bytes) -> RequestEntry:
        # Answers with many errors repeat themselves: stored compressed, they cost a tenth.
        if len(answer) > PACK_ANSWERS_OVER_BYTES:
            return cls("done", body_sha256, 0, time.time(), zlib.compress(answer, 1), True)
        return cls("done", body_sha256, 0, time.time(), answer)

    def unpacked_answer(self) -> bytes:
        return zlib.decompress(self.answer) if self.packed else self.answer


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a request key: run it, repeat an answer, refuse it, or wait."""

    outcome: str  # "run" | "answered" | "conflict" | "running"
    answer: bytes = b""


def seq_key(device_id: str, seq: int) -> bytes:
    return device_id.encode() + b"\0" + _U64.pack(seq)


def request_key(device_id: str, key: str) -> bytes:
    # Header values may carry undecodable bytes (kept as surrogates): they round-trip, never fail.
    return device_id.encode("utf-8", "surrogateescape") + b"\0" + key.encode("utf-8", "surrogateescape")


class RetryLedger:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        window_secs: float,
        max_keys: int,
        max_signatures: int | None = None,
        map_bytes: int = 1 << 30,
        on_forget: Callable[[str, int], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.window_secs = window_secs
        # Entries per generation, per kind.
        self.max_keys = {b"seq": max_keys, b"request": max_keys, b"signature": max_signatures or max_keys}
        self._on_forget = on_forget or (lambda kind, entries: None)
        self._map_bytes = map_bytes
        self._env: lmdb.Environment | None = None
        self._dbs: dict[bytes, lmdb._Database] = {}
        self._meta = None
        self._companions: dict[bytes, tuple] = {}  # name -> (environment, handle): see database()
        self._lock = threading.Lock()  # one write transaction per process at a time (LMDB's rule)
        self.pid = os.getpid()

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        from connectors.durable_files import ensure_directory

        ensure_directory(self.directory)
        try:
            self._env = self._open_env()
        except lmdb.Error as exc:
            # Damaged (e.g. after a power loss without fsync): start empty; the WAL scan refills it.
            log.error("retry ledger unreadable; starting a new one", extra={"error": str(exc)})
            for name in ("data.mdb", "lock.mdb"):
                (self.directory / name).unlink(missing_ok=True)
            self._env = self._open_env()

    def _open_env(self) -> lmdb.Environment:
        env = lmdb.open(
            str(self.directory),
            map_size=self._map_bytes,
            max_dbs=len(KINDS) * GENERATIONS + 1 + COMPANION_DBS,
            sync=False,
            metasync=False,
            max_readers=512,
            readahead=False,
        )
        self._meta = env.open_db(b"meta", create=True)
        for kind in KINDS:
            for slot in range(GENERATIONS):
                self._dbs[kind + b":%d" % slot] = env.open_db(kind + b":%d" % slot, create=True)
        return env

    def database(self, name: bytes):
        """(environment, handle) of a named database another part of the instance keeps beside the
        ledger (the rate-limit buckets), opened once per environment; up to ``COMPANION_DBS`` of them."""
        env = self._env
        if env is None:
            raise LedgerError("the retry ledger is closed")
        handle = self._companions.get(name)
        if handle is None or handle[0] is not env:
            with self.write() as txn:
                handle = (env, env.open_db(name, txn=txn, create=True))
            self._companions[name] = handle
        return handle

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def sync(self) -> None:
        """Flush to disk (called after the WAL's own fsync; cheap when nothing changed)."""
        if self._env is not None:
            self._env.sync(True)

    # -- generations -------------------------------------------------------------------------

    def _generation(self, txn, kind: bytes) -> int:
        raw = txn.get(b"gen:" + kind, db=self._meta)
        return _GEN.unpack(raw)[0] if raw else 0

    def _db(self, kind: bytes, generation: int):
        return self._dbs[kind + b":%d" % (generation % GENERATIONS)]

    def _maybe_advance(self, txn, kind: bytes) -> int:
        """Start a new generation of ``kind`` when the current one is old or full; empty the oldest."""
        raw = txn.get(b"gen:" + kind, db=self._meta)
        now_ms = int(time.time() * 1000)
        if raw is None:
            txn.put(b"gen:" + kind, _GEN.pack(0, now_ms), db=self._meta)
            return 0
        generation, started_ms = _GEN.unpack(raw)
        full = txn.stat(self._db(kind, generation))["entries"] >= self.max_keys[kind]
        if not full and now_ms - started_ms < self.window_secs * 1000:
            return generation
        generation += 1
        oldest = self._db(kind, generation + 1)  # the generation before the previous one
        forgotten = txn.stat(oldest)["entries"]
        txn.drop(oldest, delete=False)
        txn.put(b"gen:" + kind, _GEN.pack(generation, now_ms), db=self._meta)
        if forgotten:
            self._on_forget(kind.decode(), forgotten)
        return generation

    def _get(self, txn, kind: bytes, key: bytes) -> bytes | None:
        generation = self._generation(txn, kind)
        value = txn.get(key, db=self._db(kind, generation))
        if value is None and generation > 0:
            value = txn.get(key, db=self._db(kind, generation - 1))
        return value

    def write(self):
        """A write transaction, one per process at a time; disk-full and map-full become LedgerError."""
        return _WriteTxn(self)

    # -- records (seqs) ----------------------------------------------------------------------

    def reader(self) -> SeqLookup:
        return SeqLookup(self)

    # -- requests (Idempotency-Key, or the body's hash) --------------------------------------

    def claim_request(self, key: bytes, body_sha256: str) -> Claim:
        """Claim ``key`` for this process, or say why not (its answer, a conflict, still running)."""
        with self.write() as txn:
            raw = self._get(txn, b"request", key)
            if raw is not None:
                entry = msgspec.msgpack.decode(raw, type=RequestEntry)
                if entry.state == "done":
                    if entry.body_sha256 != body_sha256:
                        return Claim("conflict")
                    return Claim("answered", entry.unpacked_answer())
                if entry.owner_pid != self.pid and _alive(entry.owner_pid) and time.time() - entry.at < CLAIM_STALE_SECS:
                    return Claim("conflict" if entry.body_sha256 != body_sha256 else "running")
            generation = self._maybe_advance(txn, b"request")
            entry = RequestEntry("running", body_sha256, self.pid, time.time())
            txn.put(key, msgspec.msgpack.encode(entry), db=self._db(b"request", generation))
        return Claim("run")

    def answer_for(self, key: bytes, body_sha256: str) -> bytes | None:
        """The answer stored for ``key`` when it ran with this body, else None."""
        with self._env.begin() as txn:
            raw = self._get(txn, b"request", key)
        if raw is None:
            return None
        entry = msgspec.msgpack.decode(raw, type=RequestEntry)
        return entry.unpacked_answer() if entry.state == "done" and entry.body_sha256 == body_sha256 else None

    def release_request(self, key: bytes) -> None:
        """The claimed request failed (nothing of it lands): a retry must run it again."""
        with self.write() as txn:
            generation = self._generation(txn, b"request")
            for g in (generation, generation - 1):
                if g < 0:
                    continue
                raw = txn.get(key, db=self._db(b"request", g))
                if raw is not None and msgspec.msgpack.decode(raw, type=RequestEntry).state == "running":
                    txn.delete(key, db=self._db(b"request", g))

    # -- the commit after each WAL fsync ------------------------------------------------------

    def record(self, wal_id: str, through_lsn: int, seqs: list[tuple[str, int, int]], requests: list[tuple[bytes, str, bytes]]) -> None:
        """Remember durable records and answered requests, and that ``wal_id`` is recorded through ``through_lsn``."""
        with self.write() as txn:
            seq_db = self._db(b"seq", self._maybe_advance(txn, b"seq"))
            for device_id, seq, event_ms in seqs:
                txn.put(seq_key(device_id, seq), _U64.pack(event_ms), db=seq_db)
            request_db = self._db(b"request", self._maybe_advance(txn, b"request"))
            for key, body_sha256, answer in requests:
                txn.put(key, msgspec.msgpack.encode(RequestEntry.done(body_sha256, answer)), db=request_db)
            mark = b"mark:" + wal_id.encode()
            old = txn.get(mark, db=self._meta)
            if old is None or _U64.unpack(old)[0] < through_lsn:
                txn.put(mark, _U64.pack(through_lsn), db=self._meta)

    def mark(self, wal_id: str) -> int:
        """The LSN of ``wal_id`` below which every record and request is in the ledger."""
        with self._env.begin() as txn:
            raw = txn.get(b"mark:" + wal_id.encode(), db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0

    def forget_mark_beyond(self, wal_id: str, lsn: int) -> None:
        """The WAL was cut back to ``lsn``: its mark must not claim more."""
        with self.write() as txn:
            mark = b"mark:" + wal_id.encode()
            old = txn.get(mark, db=self._meta)
            if old is not None and _U64.unpack(old)[0] > lsn:
                txn.put(mark, _U64.pack(lsn), db=self._meta)

    # -- signatures (replay guard) -----------------------------------------------------------

    def claim_signature(self, signature: str, expires_at: float) -> bool:
        key = signature.encode()
        with self.write() as txn:
            raw = self._get(txn, b"signature", key)
            if raw is not None and _SIG.unpack(raw)[0] > time.time():
                return False
            generation = self._maybe_advance(txn, b"signature")
            txn.put(key, _SIG.pack(expires_at), db=self._db(b"signature", generation))
        return True

    def release_signature(self, signature: str) -> None:
        key = signature.encode()
        with self.write() as txn:
            generation = self._generation(txn, b"signature")
            for g in (generation, generation - 1):
                if g >= 0:
                    txn.delete(key, db=self._db(b"signature", g))

    def counts(self) -> dict[str, int]:
        with self._env.begin() as txn:
            return {
                kind.decode(): sum(
                    txn.stat(self._db(kind, g))["entries"] for g in self._visible(txn, kind)
                )
                for kind in KINDS
            }

    def _visible(self, txn, kind: bytes) -> list[int]:
        generation = self._generation(txn, kind)
        return [g for g in (generation, generation - 1) if g >= 0]


class _WriteTxn:
    __slots__ = ("_ledger", "_txn")

    def __init__(self, ledger: RetryLedger) -> None:
        self._ledger = ledger
        self._txn = None

    def __enter__(self):
        self._ledger._lock.acquire()
        try:
            self._txn = self._ledger._env.begin(write=True)
        except lmdb.Error as exc:
            self._ledger._lock.release()
            raise LedgerError(f"the retry ledger cannot be written: {exc}") from None
        return self._txn

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._txn.commit()
            else:
                self._txn.abort()
        except lmdb.Error as error:
            self._txn.abort()
            raise LedgerError(f"the retry ledger cannot be written: {error}") from None
        finally:
            self._ledger._lock.release()
        if isinstance(exc, lmdb.Error):
            raise LedgerError(f"the retry ledger cannot be written: {exc}") from None
        return False


class SeqLookup:
    """Duplicate checks for one request's records: one read transaction, reused chunk after chunk."""

    __slots__ = ("_ledger", "_txn", "_dbs", "_device_id", "_prefix")

    def __init__(self, ledger: RetryLedger) -> None:
        self._ledger = ledger
        self._txn = None
        self._dbs: list = []
        self._device_id: str | None = None
        self._prefix = b""

    def is_duplicate(self, device_id: str, seq: int, event_ms: int) -> bool:
        if self._txn is None:
            ledger = self._ledger
            self._txn = ledger._env.begin()
            self._dbs = [ledger._db(b"seq", g) for g in ledger._visible(self._txn, b"seq")]
        if device_id != self._device_id:  # a request's records name one device: its part of the key once
            self._device_id, self._prefix = device_id, seq_key(device_id, 0)[:-_U64.size]
        key = self._prefix + _U64.pack(seq)
        expected = _U64.pack(event_ms)
        get = self._txn.get
        for db in self._dbs:  # called per record: a loop, not any() over a generator
            if get(key, db=db) == expected:
                return True
        return False

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
