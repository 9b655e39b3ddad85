"""Bringing the retry ledger up to date with the WAL after a crash, before anyone is answered.

Entries for durable records reach the ledger right after each fsync (pipeline.py); a crash between
the two leaves durable records the ledger does not know, and a retry of them would land again. So
every WAL directory is read from the ledger's mark to its recovered end before a gateway serves:
by the supervisor for all of them before it starts its workers (a retry may reach any worker), and
by each worker for its own WAL (a worker restarted alone).

A start on a full disk waits for room rather than failing (``open_and_catch_up_when_room``): after a
restart of the machine the ledger is rebuilt, which needs new pages, and a start that failed would
be tried again only a few times by the service manager, then left down with acknowledged records
in its WALs.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import msgspec

from gateway.early_signals import StoppedWhileStarting
from gateway.durable.retry_ledger import DAMAGE, LedgerError, RetryLedger, map_bytes_for
from gateway.durable.wal import KIND_RECORDS, KIND_REQUEST, WriteAheadLog, fresh_log_origin
from gateway.durable.wal_layout import EXITED_HOLDER_WAIT_SECS, SLOT_LOCK, DirectoryLock, WalSlot, existing_slots, wal_id

log = logging.getLogger(__name__)

ROOM_RETRY_SECS = (1.0, 2.0, 4.0, 8.0)  # between tries while the disk is full; then every 8 s
STOP_POLL_SECS = 0.1


class RequestRecord(msgspec.Struct, array_like=True):
    """A ``KIND_REQUEST`` frame's payload: the retry key a request ran under and its answer."""

    key: bytes
    body_sha256: str
    answer: bytes


class _RawIds(msgspec.Struct):
    """The fields of a raw-zone line the retry ledger needs."""

    device_id: str
    event_time_ms: int
    seq: int | None = None


_raw_ids = msgspec.json.Decoder(_RawIds)


def ledger_for(settings, on_forget=None) -> RetryLedger:
    """The instance's retry ledger under ``wal.dir``, sized from the configuration (not yet open)."""
    limits = settings.limits
    return RetryLedger(
        Path(settings.wal.dir) / "ledger",
        window_secs=max(limits.dedup_window_secs, 2 * settings.auth.timestamp_window_secs),
        max_keys=limits.dedup_max_keys,
        max_signatures=settings.auth.replay_cache_max_entries,
        map_bytes=map_bytes_for(limits.dedup_max_keys, settings.auth.replay_cache_max_entries),
        on_forget=on_forget,
    )


def catch_up(wal: WriteAheadLog, ledger: RetryLedger, wal_identity: str, where: Path, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Record what ``wal`` holds past the ledger's mark (the WAL must be open and recovered);
    ``StoppedWhileStarting``, the mark left where it was, if ``stop_requested()`` on the way."""
    mark = ledger.mark(wal_identity)
    if mark >= wal.durable_lsn:
        return
    reader = wal.reader(mark)
    seqs: list[tuple[str, int, int]] = []
    requests: list[tuple[bytes, str, bytes]] = []
    try:
        while frames := reader.read(8 * 1024 * 1024, frozenset({KIND_RECORDS, KIND_REQUEST})):
            if stop_requested():  # a full WAL takes seconds to read: a stop need not wait for it
                raise StoppedWhileStarting(f"stopped while the retry ledger caught up with {where}; the next start reads on from where it was")
            for frame in frames:
                if frame.kind == KIND_REQUEST:
                    r = msgspec.msgpack.decode(frame.payload, type=RequestRecord)
                    requests.append((r.key, r.body_sha256, r.answer))
                elif frame.kind == KIND_RECORDS:
                    for line in frame.payload.splitlines():
                        ids = _raw_ids.decode(line)
                        if ids.seq is not None:
                            seqs.append((ids.device_id, ids.seq, ids.event_time_ms))
    finally:
        reader.close()
    ledger.record(wal_identity, wal.durable_lsn, seqs, requests)
    log.info(
        "retry ledger caught up from the WAL",
        extra={"wal": str(where), "from_lsn": mark, "records": len(seqs), "requests": len(requests)},
    )


def open_and_catch_up(settings, base_id: str, ledger: RetryLedger, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """As the instance's owner, open the ledger and catch it up with every WAL directory; a ledger
    found damaged on the way is replaced by one rebuilt from what the WALs hold."""
    ledger.open(owner=True)
    try:
        catch_up_every_wal(settings, base_id, ledger, stop_requested)
    except (lmdb.Error, LedgerError) as exc:
        if not (isinstance(exc, DAMAGE) or getattr(exc, "damaged", False)):
            raise  # a full disk is not damage: the start fails and says so
        ledger.replace(str(exc))
        catch_up_every_wal(settings, base_id, ledger, stop_requested)


def open_and_catch_up_when_room(
    settings,
    base_id: str,
    ledger: RetryLedger,
    stop_requested: Callable[[], bool],
    *,
    waiting_for_room: Callable[[bool], None] = lambda waiting: None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """``open_and_catch_up``, tried again while the disk holding the ledger is full (an error once,
    a warning when it goes on; ``waiting_for_room`` is told True then, False once it goes on);
    ``StoppedWhileStarting`` if a stop is asked for meanwhile."""
    tries, began = 0, clock()
    while True:
        try:
            open_and_catch_up(settings, base_id, ledger, stop_requested)
        except Exception as exc:
            if not no_room(exc):
                raise
            ledger.close()
            if tries == 0:
                waiting_for_room(True)
                log.error(
                    "the WAL's disk is full: the retry ledger cannot be opened and caught up, so no worker "
                    "starts; trying again until there is room (free space on the disk)",
                    extra={"ledger": str(ledger.directory), "error": str(exc)},
                )
            wait_until = clock() + ROOM_RETRY_SECS[min(tries, len(ROOM_RETRY_SECS) - 1)]
            tries += 1
            while clock() < wait_until:
                if stop_requested():
                    raise StoppedWhileStarting("stopped while the WAL's disk was full, before any worker started") from None
                sleep(STOP_POLL_SECS)
            continue
        if tries:
            waiting_for_room(False)
            log.warning("room on the WAL's disk again: the retry ledger is caught up and the start goes on",
                        extra={"waited_secs": round(clock() - began, 1), "tries": tries + 1})
        return


def no_room(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what it was raised from (a ``LedgerError`` keeps the LMDB error as its context)
    is a full disk: LMDB's ENOSPC, or an OSError's ENOSPC or EDQUOT."""
    while exc is not None:
        if isinstance(exc, lmdb.DiskError) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def catch_up_every_wal(settings, base_id: str, ledger: RetryLedger, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Recover each WAL directory under ``wal.dir`` and catch the ledger up with it (hold the instance
    lock); ``StoppedWhileStarting`` if ``stop_requested()`` on the way."""
    wal = settings.wal
    for slot in existing_slots(wal.dir, base_id):
        _catch_up_slot(slot, ledger, stop_requested, segment_bytes=wal.segment_bytes, max_total_bytes=wal.max_total_bytes)


def _catch_up_slot(slot: WalSlot, ledger: RetryLedger, stop_requested: Callable[[], bool], *, segment_bytes: int, max_total_bytes: int) -> None:
    lock = DirectoryLock(slot.directory, SLOT_LOCK, "the WAL directory").acquire(
        exited_holder_wait_secs=EXITED_HOLDER_WAIT_SECS, stop_requested=stop_requested
    )
    wal = WriteAheadLog(slot.directory / "segments", segment_bytes=segment_bytes, max_total_bytes=max_total_bytes, first_lsn=fresh_log_origin())
    try:
        wal.open()
        catch_up(wal, ledger, wal_id(slot.directory), slot.directory, stop_requested)
        # Until a worker writes it, the owner answers for it: the claims its dead writer left are void.
        ledger.mark_writer(wal_id(slot.directory))
    finally:
        wal.release_files()
        lock.release()
