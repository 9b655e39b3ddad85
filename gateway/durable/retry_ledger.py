"""What this instance has already accepted, shared by its workers and kept across restarts.

Retries must land nothing twice on whichever worker they arrive and after a crash. The ledger is an
LMDB environment beside the WAL directories (one writer at a time across processes, readers never
block) holding three kinds of entries:

- ``seq``: the ``(device_id, seq)`` of every durable record and its event time, so a retried record
  is a duplicate (a sequence number that comes back with another event time is a counter reset, not
  a retry); kept as runs of consecutive seqs, one entry per run (``seq_runs``);
- ``request``: per device, an ``Idempotency-Key`` (or, without one, the body's SHA-256) -> the body's
  hash (unless the key is that hash) and the answer given (deflated: a few dozen bytes), or a claim
  by the worker still running it;
- ``signature``: verified signatures (their first 16 bytes) until their timestamp leaves the window
  (replay guard), each with the generation of requests current when it was claimed;

and, outside the generations, the ``inflight`` spans: per device, the lowest and highest new ``seq``
of each request validated but not yet durable. Two requests carrying the same records at once (a
device that gave up waiting and resent them in a new batch, on another connection) would each find
them new; so a request claims its span before it is written, waits while a running request's span
overlaps it, and is validated again when records of its device became durable since it looked
(each such commit leaves a new stamp per device among the ``seq`` entries).

Durability follows the WAL, not LMDB: entries for durable records are written by the WAL's commit
thread right after each group fsync, together with a mark saying up to which LSN of that WAL they
are recorded. A crash between the fsync and that write is repaired on start: the worker reads its
WAL from the mark and records what it finds (records carry their seqs; requests carry a
``KIND_REQUEST`` frame with their key and answer). LMDB is opened without its own fsyncs: what a
killed process wrote is in the page cache and survives it, but a machine that lost power may come
back with a torn file. So the instance's owner (the supervisor, or a gateway running alone) opens
it first and rebuilds it, when it was left open in an earlier boot of the machine (``boot`` beside
it says which, and whether it was flushed and closed) or LMDB finds it damaged (a log line says so
either way): an empty ledger, refilled from its journal (ledger_journal.py: what ``record`` wrote,
fsynced before any WAL segment is deleted), then by the WAL scan with what the WALs still hold.

Bounded: entries of each kind live in generations (three LMDB databases per kind, used in turn). A
generation ends after ``window_secs`` or its kind's entry limit; lookups see the current and the
previous one, and starting a new generation empties the oldest. Generations and claims age by the
time that really passed, not by steps of the wall clock (ledger_clock.py).
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lmdb
import msgspec
import orjson

from gateway.durable.ledger_clock import Instant, claim_is_fresh, current_boot_id, seconds_since_boot
from gateway.durable.ledger_journal import LedgerJournal
from gateway.durable.seq_runs import RunFinder, encode_run, runs_of

log = logging.getLogger(__name__)

GENERATIONS = 3
KINDS = (b"seq", b"request", b"signature")
# Databases other parts of the instance keep in the ledger's environment (the rate-limit buckets), and room to grow.
COMPANION_DBS = 4
_U64 = struct.Struct(">Q")
_SIG = struct.Struct(">d")  # an entry of an earlier version: when the signature may be forgotten
_SIG_AT = struct.Struct(">dQ")  # ... and the generation of requests current when it was claimed
_SPAN = struct.Struct(">QQiq")  # lowest seq, highest seq, owner pid, claimed at (seconds since boot)
_PID = struct.Struct(">i")
_BODY_KEY_MARK = b"\0b"  # between the device and the body's digest in a ``body_key``
SIGNATURE_KEY_BYTES = 16
CLAIM_STALE_SECS = 120.0
CHECK_TIMEOUT_SECS = 120.0
# The map is address space, not memory or disk (the file grows as it is written): sized for three
# generations of every kind at their limits, twice over (a commit may overrun a generation, and
# B-tree pages are half full at worst), never under 1 GiB.
MIN_MAP_BYTES = 1 << 30
ENTRY_BYTES = {b"seq": 64, b"request": 256, b"signature": 64}  # key, value and LMDB's own, generously
BOOT_FILE = "boot"  # the machine boot that last opened the ledger, and whether it was flushed and closed
BOOT_FILE_BYTES = 128  # JSON padded with spaces: always the same size, so it is rewritten in place
REBUILDING = "rebuilding"  # the boot file's boot id while a rebuild runs: one cut short starts over
REPLAY_FRAMES_PER_TXN = 1024  # a rebuild's write transactions: a commit costs far more than a put
# What LMDB raises for a file that is not what it wrote (torn by a power loss, or otherwise damaged).
DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.PanicError, lmdb.InvalidError, lmdb.VersionMismatchError)


class LedgerError(Exception):
    """The ledger cannot be read or written (the disk is full, or it is damaged)."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged

    @classmethod
    def from_lmdb(cls, what: str, error: lmdb.Error) -> LedgerError:
        return cls(f"the retry ledger cannot be {what}: {error}", damaged=isinstance(error, DAMAGE))


class RequestEntry(msgspec.Struct, array_like=True):
    """What the ledger keeps per retry key, for every request of the last one to two windows: small."""

    done: bool
    body_sha256: bytes  # the digest itself, not its hex; empty when the key holds it (``body_key``)
    owner_pid: int = 0  # while running: the process running it
    at: int = 0  # while running: when it was claimed (seconds since boot: ledger_clock)
    answer: bytes = b""  # once done: the status and JSON the device got, deflated (``pack_answer``)
    wal: str = ""  # while running: the WAL its owner writes (its records may be durable there, unrecorded)

    @classmethod
    def running(cls, key: bytes, body_sha256: str, pid: int, wal: str) -> RequestEntry:
        return cls(False, _digest_kept(key, body_sha256), pid, seconds_since_boot(), wal=wal)

    @classmethod
    def finished(cls, key: bytes, body_sha256: str, answer: bytes) -> RequestEntry:
        return cls(True, _digest_kept(key, body_sha256), answer=pack_answer(answer))

    def same_body(self, key: bytes, body_sha256: str) -> bool:
        """Whether the request stored under ``key`` had this body."""
        digest = bytes.fromhex(body_sha256)
        return self.body_sha256 == digest if self.body_sha256 else key.endswith(_BODY_KEY_MARK + digest)

    def unpacked_answer(self) -> bytes:
        return zlib.decompressobj(-ANSWER_WINDOW_BITS, zdict=ANSWER_WORDS).decompress(self.answer)


# What answers are made of (gateway/ingest/handler.py): deflated against it, a 202 answer of 98 bytes
# is stored in 36, and one listing many record errors in a tenth of its size.
ANSWER_WORDS = (
    b'{"error":"invalid_records","message":"all records are invalid","errors":[{"index":0,"field":"ts",'
    b'"reason":""}]}422202{"accepted":100,"rejected":0,"duplicates":0,"ingest_id":"'
)
ANSWER_WINDOW_BITS = 9  # answers are small: a 512-byte window costs a tenth of the default to set up


def pack_answer(answer: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -ANSWER_WINDOW_BITS, 1, zlib.Z_DEFAULT_STRATEGY, ANSWER_WORDS)
    return packer.compress(answer) + packer.flush()


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a request key: run it, repeat an answer, refuse it, or wait."""

    outcome: str  # "run" | "answered" | "conflict" | "running"
    answer: bytes = b""


def seq_key(device_id: str, seq: int) -> bytes:
    return device_id.encode() + b"\0" + _U64.pack(seq)


def stamp_key(device_id: str) -> bytes:
    """Beside a device's ``seq`` entries (one byte shorter than any of them): changed by every commit of its records."""
    return device_id.encode() + b"\0"


def span_key(device_id: str, request: bytes) -> bytes:
    return device_id.encode() + b"\0" + request


class Span(NamedTuple):
    """The new seqs a request holds for one device, and that device's stamp when they were checked."""

    device_id: str
    lowest: int
    highest: int
    stamp: bytes | None


def idempotency_key(device_id: str, key: str) -> bytes:
    """The retry key of a request sent with an ``Idempotency-Key``."""
    # Header values may carry undecodable bytes (kept as surrogates): they round-trip, never fail.
    return device_id.encode("utf-8", "surrogateescape") + b"\0k" + key.encode("utf-8", "surrogateescape")


def body_key(device_id: str, body_sha256: str) -> bytes:
    """The retry key of a request sent without one: its body's digest."""
    return device_id.encode("utf-8", "surrogateescape") + _BODY_KEY_MARK + bytes.fromhex(body_sha256)


def _digest_kept(key: bytes, body_sha256: str) -> bytes:
    """The body's digest as its entry keeps it: none when ``key`` ends with it (a third of the
    entry). Any key ending so binds the entry to that body, so ``same_body`` still tells bodies apart."""
    digest = bytes.fromhex(body_sha256)
    return b"" if key.endswith(_BODY_KEY_MARK + digest) else digest


def map_bytes_for(max_keys: int, max_signatures: int) -> int:
    """An LMDB map large enough for every generation the configured limits allow."""
    per_generation = max_keys * (ENTRY_BYTES[b"seq"] + ENTRY_BYTES[b"request"]) + max_signatures * ENTRY_BYTES[b"signature"]
    return max(MIN_MAP_BYTES, GENERATIONS * 2 * 2 * per_generation)


class RetryLedger:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        window_secs: float,
        max_keys: int,
        max_signatures: int | None = None,
        map_bytes: int = MIN_MAP_BYTES,
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
        # What ``record`` wrote, kept through a power loss; bounded like the generations of seqs and requests.
        self.journal = LedgerJournal(
            self.directory / "journal",
            window_secs=window_secs,
            max_bytes=2 * max_keys * (ENTRY_BYTES[b"seq"] + ENTRY_BYTES[b"request"]),
        )
        self.pid = os.getpid()
        self.wal_id = ""  # the WAL this process writes (``writes``)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, *, owner: bool = False) -> None:
        """Open the ledger. The ``owner`` opens it before any other process of the instance and
        replaces a ledger it cannot trust (see the module's notes) with an empty one."""
        from connectors.durable_files import ensure_directory

        ensure_directory(self.directory)
        if owner and (earlier := self._left_open_in_an_earlier_boot()):
            log.warning(
                "a rebuild of the retry ledger was cut short; starting it again" if earlier == REBUILDING else
                "retry ledger was left open before the machine restarted and may be torn; "
                "starting a new one from its journal and what the WAL holds",
                extra={"ledger": str(self.directory), "earlier_boot_id": earlier},
            )
            self._rebuild()
            return
        if owner and (damage := self._damage_found_apart()):
            self.replace(damage)
            return
        try:
            self._env = self._open_env()
        except lmdb.Error as exc:
            if not owner or isinstance(exc, lmdb.DiskError):  # a full disk is not damage
                raise LedgerError.from_lmdb("opened", exc) from None
            self.close()
            self.replace(str(exc))
            return
        if owner:
            with self.write() as txn:
                txn.drop(self._inflight, delete=False)  # spans of requests no process runs any more
            self._write_boot(closed=False)

    def replace(self, reason: str) -> None:
        """Owner only, before other processes open it: start an empty ledger in place of a damaged one."""
        log.error(
            "retry ledger damaged; starting a new one from its journal and what the WAL holds",
            extra={"ledger": str(self.directory), "error": reason},
        )
        self.close()
        self._rebuild()

    def _rebuild(self) -> None:
        """An empty ledger, refilled from the journal; marked as rebuilding until that is done."""
        self._discard()
        self._write_boot(closed=False, boot_id=REBUILDING)
        self._env = self._open_env()
        frames = entries = 0
        replayed = self.journal.replay()
        while batch := list(islice(replayed, REPLAY_FRAMES_PER_TXN)):
            with self.write() as txn:
                for seqs, requests in batch:  # generations advance per frame, as they did when it was recorded
                    for kind, puts in ((b"seq", seqs), (b"request", requests)):
                        if puts:
                            db = self._db(kind, self._maybe_advance(txn, kind))
                            for key, value in puts:
                                txn.put(key, value, db=db)
                    entries += len(seqs) + len(requests)
            frames += len(batch)
        self._write_boot(closed=False)
        log.info("retry ledger rebuilt from its journal", extra={"ledger": str(self.directory), "frames": frames, "entries": entries})

    def seal(self) -> None:
        """Owner only, once every other process of the instance has exited: flush the ledger to disk
        and record that it was closed whole, so a restart of the machine keeps it."""
        try:
            if self._env is None:
                self._env = self._open_env()
            self._env.sync(True)
            self.close()
            self._write_boot(closed=True)
        except (lmdb.Error, OSError) as exc:
            self.close()
            log.warning("retry ledger could not be flushed at exit; a restart of the machine will rebuild it", extra={"error": str(exc)})

    def _damage_found_apart(self) -> str | None:
        """Walk the whole ledger in a child process, since LMDB aborts the process that reads some
        damaged pages; what the child found wrong, or None when it read every page."""
        if not (self.directory / "data.mdb").exists():
            return None
        check = "import sys; from gateway.durable.retry_ledger import read_everything; read_everything(*sys.argv[1:])"
        try:
            child = subprocess.run(
                [sys.executable, "-c", check, str(self.directory), str(self._map_bytes)],
                capture_output=True, text=True, timeout=CHECK_TIMEOUT_SECS, cwd=Path(__file__).resolve().parents[2],
            )
        except subprocess.TimeoutExpired:
            return f"reading the whole ledger took over {CHECK_TIMEOUT_SECS:.0f} s"
        if child.returncode == 0:
            return None
        if child.returncode < 0:
            return f"reading it killed the reader (signal {-child.returncode})"
        return child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"the reader exited with {child.returncode}"

    def _discard(self) -> None:
        for name in ("data.mdb", "lock.mdb"):
            (self.directory / name).unlink(missing_ok=True)

    def _left_open_in_an_earlier_boot(self) -> str | None:
        """The boot id under which the ledger was last opened and not sealed, if not this boot's."""
        try:
            state = orjson.loads((self.directory / BOOT_FILE).read_bytes())
            earlier, closed = str(state["boot_id"]), bool(state["closed"])
        except FileNotFoundError:
            return None  # never opened by an owner that writes it: nothing to compare
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable"
        now = current_boot_id()
        return earlier if not closed and now is not None and earlier != now else None

    def _write_boot(self, *, closed: bool, boot_id: str | None = None) -> None:
        """In place once the file exists: a start on a full disk needs no new block for it. A torn
        write reads as unreadable, which discards the ledger (rebuilt), never trusts it."""
        from connectors.durable_files import write_atomically

        state = orjson.dumps({"boot_id": boot_id or current_boot_id(), "closed": closed}).ljust(BOOT_FILE_BYTES)
        if not _rewritten_in_place(self.directory / BOOT_FILE, state):
            write_atomically(self.directory / BOOT_FILE, state)  # the first time, or an older, unpadded file

    def _open_env(self) -> lmdb.Environment:
        env = lmdb.open(
            str(self.directory),
            map_size=self._map_bytes,
            max_dbs=len(KINDS) * GENERATIONS + 2 + COMPANION_DBS,
            sync=False,
            metasync=False,
            max_readers=512,
            readahead=False,
        )
        pages = env.info()["last_pgno"] + 1
        needed, size = pages * env.stat()["psize"], (self.directory / "data.mdb").stat().st_size
        if size < needed:  # reading a page past the end of the mapped file would kill the process (SIGBUS)
            env.close()
            raise lmdb.CorruptedError(f"data.mdb holds {size} bytes; its pages need {needed}")
        self._meta = env.open_db(b"meta", create=True)
        self._inflight = env.open_db(b"inflight", create=True)
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
        self.journal.close()

    def make_journal_durable(self) -> None:
        """Before a WAL deletes a segment: what the ledger learned from it must outlive a power loss.
        A disk that fails it is logged; the segment goes all the same (kept, it would fill the WAL)."""
        try:
            self.journal.make_durable()
        except OSError as exc:
            log.error(
                "retry ledger journal could not be made durable before WAL segments were deleted; "
                "after a power loss, retries of their records may land again",
                extra={"journal": str(self.journal.directory), "error": str(exc)},
            )

    @property
    def closed(self) -> bool:
        return self._env is None

    # -- generations -------------------------------------------------------------------------

    def _generation(self, txn, kind: bytes) -> int:
        raw = txn.get(b"gen:" + kind, db=self._meta)
        return _U64.unpack(raw[: _U64.size])[0] if raw else 0

    def _db(self, kind: bytes, generation: int):
        return self._dbs[kind + b":%d" % (generation % GENERATIONS)]

    def _maybe_advance(self, txn, kind: bytes) -> int:
        """Start a new generation of ``kind`` when the current one is old or full; empty the oldest."""
        raw = txn.get(b"gen:" + kind, db=self._meta)
        now = Instant.now()
        if raw is None:
            txn.put(b"gen:" + kind, _U64.pack(0) + now.pack(), db=self._meta)
            return 0
        generation, started = _U64.unpack(raw[: _U64.size])[0], Instant.unpack(raw[_U64.size :])
        full = txn.stat(self._db(kind, generation))["entries"] >= self.max_keys[kind]
        if not full and now.least_ms_since(started) < self.window_secs * 1000:
            return generation
        generation += 1
        oldest = self._db(kind, generation + 1)  # the generation before the previous one
        forgotten = txn.stat(oldest)["entries"]
        txn.drop(oldest, delete=False)
        txn.put(b"gen:" + kind, _U64.pack(generation) + now.pack(), db=self._meta)
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
        """A write transaction, one per process at a time; LMDB's errors become LedgerError."""
        return _WriteTxn(self)

    # -- records (seqs) ----------------------------------------------------------------------

    def reader(self) -> SeqLookup:
        return SeqLookup(self)

    # -- requests (Idempotency-Key, or the body's hash) --------------------------------------

    def claim_request(self, key: bytes, body_sha256: str, spans: Sequence[Span] = ()) -> Claim:
        """Claim ``key`` and its records' ``spans`` for this process, or say why not: its answer, a
        conflict, still running, a running request overlapping its records ("overlap": wait), or
        records of its device became durable since it was validated ("stale": validate it again)."""
        with self.write() as txn:
            entry = _request_entry(self._get(txn, b"request", key))
            if entry is not None:
                if entry.done:
                    if not entry.same_body(key, body_sha256):
                        return Claim("conflict")
                    return Claim("answered", entry.unpacked_answer())
                if entry.owner_pid != self.pid and claim_is_fresh(entry.at, CLAIM_STALE_SECS) and (
                    _alive(entry.owner_pid) or not self._caught_up_after(txn, entry)
                ):
                    return Claim("running" if entry.same_body(key, body_sha256) else "conflict")
            for span in spans:
                if self._get(txn, b"seq", stamp_key(span.device_id)) != span.stamp:
                    return Claim("stale")
                if self._overlapped(txn, span, key):
                    return Claim("overlap")
            generation = self._maybe_advance(txn, b"request")
            txn.put(key, _encode_entry(RequestEntry.running(key, body_sha256, self.pid, self.wal_id)), db=self._db(b"request", generation))
            now = seconds_since_boot()
            for span in spans:
                txn.put(span_key(span.device_id, key), _SPAN.pack(span.lowest, span.highest, self.pid, now), db=self._inflight)
        return Claim("run")

    def writes(self, wal_id: str) -> None:
        """This process writes ``wal_id`` from now on and has caught the ledger up with it: what a
        dead writer of it made durable is recorded, so the claims it left are void."""
        self.wal_id = wal_id
        self.mark_writer(wal_id)

    def mark_writer(self, wal_id: str) -> None:
        """This process caught the ledger up with ``wal_id`` and answers for it (see ``writes``)."""
        with self.write() as txn:
            txn.put(b"writer:" + wal_id.encode(), _PID.pack(self.pid), db=self._meta)

    def _caught_up_after(self, txn, entry: RequestEntry) -> bool:
        """Whether the WAL of a dead claim's owner was caught up since it died. Until then the claimed
        request may be durable there and not yet in the ledger: a retry must wait, not run it again."""
        if not entry.wal:
            return True
        raw = txn.get(b"writer:" + entry.wal.encode(), db=self._meta)
        if raw is None:
            return False
        writer = _PID.unpack(raw)[0]
        return writer != entry.owner_pid and (writer == self.pid or _alive(writer))

    def _overlapped(self, txn, span: Span, key: bytes) -> bool:
        """A request other than ``key`` holds seqs of ``span``'s range: a live one, or a dead one whose
        records may be durable in its WAL and not yet recorded. Spans that can hold nothing are dropped."""
        prefix = span_key(span.device_id, b"")
        own = prefix + key
        cursor = txn.cursor(db=self._inflight)
        found = cursor.set_range(prefix)
        while found and cursor.key().startswith(prefix):
            lowest, highest, pid, at = _SPAN.unpack(cursor.value())
            if not claim_is_fresh(at, CLAIM_STALE_SECS) or (
                pid != self.pid and not _alive(pid) and self._dead_span_settled(txn, cursor.key()[len(prefix):], pid)
            ):
                found = cursor.delete()  # moves to the next span
                continue
            if cursor.key() != own and lowest <= span.highest and span.lowest <= highest:
                return True
            found = cursor.next()
        return False

    def _dead_span_settled(self, txn, request: bytes, pid: int) -> bool:
        """The span ``pid`` (dead) left for ``request`` holds nothing back: the request finished, or
        the WAL it wrote was caught up since (its durable records are in the ledger now)."""
        entry = _request_entry(self._get(txn, b"request", request))
        if entry is None or entry.done or entry.owner_pid != pid:
            return True
        return self._caught_up_after(txn, entry)

    def answer_for(self, key: bytes, body_sha256: str) -> bytes | None:
        """The answer stored for ``key`` when it ran with this body, else None."""
        with self._env.begin() as txn:
            entry = _request_entry(self._get(txn, b"request", key))
        if entry is None:
            return None
        return entry.unpacked_answer() if entry.done and entry.same_body(key, body_sha256) else None

    def holds_request(self, key: bytes, body_sha256: str) -> bool:
        """Whether ``key`` is claimed or answered with this body (a retry of it would run it once)."""
        with self._env.begin() as txn:
            entry = _request_entry(self._get(txn, b"request", key))
        return entry is not None and entry.same_body(key, body_sha256)

    def release_request(self, key: bytes, devices: Sequence[str] = ()) -> None:
        """The claimed request failed (nothing of it lands): a retry must run it again, and its spans
        (claimed for ``devices``) hold nothing back any more."""
        with self.write() as txn:
            for device_id in devices:
                txn.delete(span_key(device_id, key), db=self._inflight)
            generation = self._generation(txn, b"request")
            for g in (generation, generation - 1):
                if g < 0:
                    continue
                entry = _request_entry(txn.get(key, db=self._db(b"request", g)))
                if entry is not None and not entry.done:
                    txn.delete(key, db=self._db(b"request", g))

    # -- the commit after each WAL fsync ------------------------------------------------------

    def record(
        self,
        wal_id: str,
        through_lsn: int,
        seqs: list[tuple[str, int, int]],
        requests: list[tuple[bytes, str, bytes]],
        spans: Sequence[bytes] = (),
    ) -> None:
        """Remember durable records and answered requests, and that ``wal_id`` is recorded through
        ``through_lsn``; the requests' in-flight ``spans`` (``span_key``) end in the same transaction."""
        runs = runs_of(seqs)
        seq_entries = [(seq_key(device_id, first_seq), value) for device_id, first, times in runs for first_seq, value in encode_run(first, times)]
        request_entries = [(key, _encode_entry(RequestEntry.finished(key, body_sha256, answer))) for key, body_sha256, answer in requests]
        with self.write() as txn:
            seq_db = self._db(b"seq", self._maybe_advance(txn, b"seq"))
            for key, value in seq_entries:
                txn.put(key, value, db=seq_db)
            for device_id in {device_id for device_id, _, _ in runs}:  # a request of these devices validated before now must look again
                txn.put(stamp_key(device_id), os.urandom(8), db=seq_db)
            for span in spans:
                txn.delete(span, db=self._inflight)
            request_db = self._db(b"request", self._maybe_advance(txn, b"request"))
            for key, value in request_entries:
                txn.put(key, value, db=request_db)
            self.journal.append(seq_entries, request_entries)  # in the write lock: the file's order is the ledger's
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
        key = _signature_key(signature)
        with self.write() as txn:
            raw = self._get(txn, b"signature", key)
            if raw is not None and _signature_expiry(raw) > time.time():
                return False
            generation = self._maybe_advance(txn, b"signature")
            txn.put(key, _SIG_AT.pack(expires_at, self._generation(txn, b"request")), db=self._db(b"signature", generation))
        return True

    def holds_every_request_since(self, signature: str) -> bool:
        """Whether every request claimed since ``signature`` was claimed is still held: then a
        request of that signature whose key the ledger lacks never had it claimed (its first sending
        died before, or was refused and released it), and running it now lands it once. A claim's
        generation stays visible until requests have started two newer ones."""
        if not signature:
            return False
        with self._env.begin() as txn:
            raw = self._get(txn, b"signature", _signature_key(signature))
            if raw is None or len(raw) != _SIG_AT.size:
                return False
            return self._generation(txn, b"request") <= _SIG_AT.unpack(raw)[1] + 1

    def release_signature(self, signature: str) -> None:
        key = _signature_key(signature)
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
            raise LedgerError.from_lmdb("written", exc) from None
        return self._txn

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._txn.commit()
            else:
                self._txn.abort()
        except lmdb.Error as error:
            self._txn.abort()
            raise LedgerError.from_lmdb("written", error) from None
        finally:
            self._ledger._lock.release()
        if isinstance(exc, lmdb.Error):
            raise LedgerError.from_lmdb("written", exc) from None
        return False


class SeqLookup:
    """Duplicate checks for one request's records: one read transaction, reused chunk after chunk."""

    __slots__ = ("_ledger", "_txn", "_device_id", "_finders", "_by_device", "stamps")

    def __init__(self, ledger: RetryLedger) -> None:
        self._ledger = ledger
        self._txn = None
        self._device_id: str | None = None
        self._finders: list[RunFinder] = []  # the device's runs in each visible generation
        self._by_device: dict[str, list[RunFinder]] = {}  # records of several devices may alternate
        self.stamps: dict[str, bytes | None] = {}  # each device's stamp when its first record was checked

    def is_duplicate(self, device_id: str, seq: int, event_ms: int) -> bool:
        if device_id != self._device_id:  # a request's records name one device: its runs looked up once
            self._look_at(device_id)
        for finder in self._finders:  # called per record: a loop, not any() over a generator
            if finder.event_ms(seq) == event_ms:
                return True
        return False

    def none_recorded(self, device_id: str, lowest: int, highest: int) -> bool:
        """Whether no seq of ``device_id`` from ``lowest`` through ``highest`` is recorded (False: some may be)."""
        if device_id != self._device_id:
            self._look_at(device_id)
        return all(finder.holds_none(lowest, highest) for finder in self._finders)

    def _look_at(self, device_id: str) -> None:
        self._device_id = device_id
        self._finders = self._by_device.get(device_id) or self._finders_for(device_id)

    def _finders_for(self, device_id: str) -> list[RunFinder]:
        ledger = self._ledger
        if self._txn is None:
            self._txn = ledger._env.begin()
        prefix = stamp_key(device_id)
        dbs = [ledger._db(b"seq", g) for g in ledger._visible(self._txn, b"seq")]
        if device_id not in self.stamps:
            self.stamps[device_id] = self._stamp(prefix, dbs)
        finders = self._by_device[device_id] = [RunFinder(self._txn.cursor(db=db), prefix) for db in dbs]
        return finders

    def _stamp(self, key: bytes, dbs: list) -> bytes | None:
        for db in dbs:
            value = self._txn.get(key, db=db)
            if value is not None:
                return value
        return None

    def again(self) -> SeqLookup:
        """A new lookup, on what the ledger holds now."""
        return SeqLookup(self._ledger)

    def spans(self, seqs: list[tuple[str, int, int]]) -> list[Span]:
        """The span of ``seqs`` (a request's new records) per device, with the stamp each was checked under."""
        if len(self.stamps) == 1:  # the common case: the request's records are the signer's
            (device_id, stamp), = self.stamps.items()
            numbers = [seq for _, seq, _ in seqs]
            return [Span(device_id, min(numbers), max(numbers), stamp)] if numbers else []
        bounds: dict[str, tuple[int, int]] = {}
        for device_id, seq, _ in seqs:
            low, high = bounds.get(device_id, (seq, seq))
            bounds[device_id] = (min(low, seq), max(high, seq))
        return [Span(device_id, low, high, self.stamps.get(device_id)) for device_id, (low, high) in bounds.items()]

    def close(self) -> None:
        if self._txn is not None:
            self._finders, self._by_device, self._device_id = [], {}, None
            self._txn.abort()
            self._txn = None


def _signature_expiry(raw: bytes) -> float:
    """When a signature entry (of this version or an earlier one) may be forgotten; 0 if unreadable."""
    if len(raw) == _SIG_AT.size:
        return _SIG_AT.unpack(raw)[0]
    return _SIG.unpack(raw)[0] if len(raw) == _SIG.size else 0.0


def _signature_key(signature: str) -> bytes:
    """HMAC signatures arrive as hex: kept as the first 16 of the bytes they spell, a quarter of the
    size. Two different signatures share them with a chance of 2^-128 per pair: a replay
    cache may keep this much of an HMAC (and a collision would refuse a request, never land one)."""
    try:
        return bytes.fromhex(signature)[:SIGNATURE_KEY_BYTES]
    except ValueError:
        return signature.encode("utf-8", "surrogateescape")


_encode_entry = msgspec.msgpack.Encoder().encode
_decode_entry = msgspec.msgpack.Decoder(RequestEntry).decode


def read_everything(directory: str, map_bytes: str) -> None:
    """Read every page of the ledger under ``directory`` (run in a child: see ``_damage_found_apart``)."""
    env = lmdb.open(directory, readonly=True, lock=False, max_dbs=64, map_size=int(map_bytes), readahead=False)
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if (size := os.path.getsize(os.path.join(directory, "data.mdb"))) < needed:
            sys.exit(f"data.mdb holds {size} bytes; its pages need {needed}")
        with env.begin(buffers=True) as txn:
            names = [key.tobytes() for key in txn.cursor().iternext(values=False)]
            for name in names:
                try:
                    db = env.open_db(name, txn=txn, create=False)
                except lmdb.IncompatibleError:
                    continue  # a plain key of the main database, not a database of its own
                for _ in txn.cursor(db=db).iternext(values=True):
                    pass
    except lmdb.Error as exc:
        sys.exit(f"{type(exc).__name__}: {exc}")
    finally:
        env.close()


def _request_entry(raw: bytes | None) -> RequestEntry | None:
    """A stored request entry; one that does not decode (a damaged page) counts as none."""
    if raw is None:
        return None
    try:
        entry = _decode_entry(raw)
        if entry.done:
            entry.unpacked_answer()
        return entry
    except (msgspec.DecodeError, zlib.error):
        log.warning("retry ledger: a request entry does not decode; treating it as absent")
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rewritten_in_place(path: Path, payload: bytes) -> bool:
    """Overwrite a file of exactly ``payload``'s size where it lies; False when it is absent or of another size."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != len(payload):
            return False
        os.pwrite(fd, payload, 0)
        os.fdatasync(fd)
        return True
    finally:
        os.close(fd)
