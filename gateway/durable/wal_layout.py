"""Where each worker's WAL lives under ``wal.dir``, who owns it, and which ones nobody serves now.

    <wal.dir>/instance.lock      held by the gateway (the supervisor with workers): one owner
    <wal.dir>/ledger/            the retry ledger, shared by the workers (retry_ledger.py)
    <wal.dir>/runtime.dir        where the supervisor's runtime directory is (gateway/runtime_dir.py)
    <wal.dir>/segments, consumers   the WAL of a single-worker gateway       (gateway_id)
    <wal.dir>/w<N>/segments, ...    worker N's WAL when listen.workers > 1  (gateway_id-w<N>)
    <slot>/wal.lock, landing.lock   held by the process writing the WAL, and the one landing it

Changing ``listen.workers`` leaves WAL directories that no worker owns any more; their records are
acknowledged, so the first worker adopts and drains them (``orphan_slots``). A drained directory is
kept: its LSNs name lake objects, so a later worker of that slot must continue them, never restart.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from connectors.durable_files import ensure_directory, write_atomically
from gateway.early_signals import StoppedWhileStarting

log = logging.getLogger(__name__)

INSTANCE_LOCK = "instance.lock"
# Set by the supervisor for its workers: it holds the instance lock for them (value: the WAL root).
SUPERVISED_ENV = "EDGE_GATEWAY_SUPERVISED_WAL"
SLOT_LOCK = "wal.lock"
# Held by whichever process lands a WAL directory's zones (its worker, or the lake process).
LANDING_LOCK = "landing.lock"
# A start waits this long for a lock whose holder has exited to be released (see DirectoryLock.acquire).
EXITED_HOLDER_WAIT_SECS = 30.0
EXITED_HOLDER_POLL_SECS = 0.05
_WORKER_DIR = re.compile(r"^w(\d+)$")


class WalLocked(Exception):
    """Another process owns this WAL directory; the message names it."""


@dataclass(frozen=True, slots=True)
class WalSlot:
    """One WAL directory and the identity that names its lake objects."""

    directory: Path
    gateway_id: str
    name: str  # "" for the single-worker layout, "w<N>" otherwise

    @property
    def has_log(self) -> bool:
        return (self.directory / "segments").is_dir()


def slot_for(root: str | os.PathLike[str], base_id: str, index: int, workers: int) -> WalSlot:
    root = Path(root)
    if workers == 1:
        return WalSlot(root, base_id, "")
    return WalSlot(root / f"w{index}", f"{base_id}-w{index}", f"w{index}")


def existing_slots(root: str | os.PathLike[str], base_id: str) -> list[WalSlot]:
    root = Path(root)
    found = [WalSlot(root, base_id, "")] if (root / "segments").is_dir() else []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            match = _WORKER_DIR.match(entry.name)
            if match and (entry / "segments").is_dir():
                found.append(WalSlot(entry, f"{base_id}-{entry.name}", entry.name))
    return found


def orphan_slots(root: str | os.PathLike[str], base_id: str, workers: int) -> list[WalSlot]:
    """WAL directories under ``root`` that none of ``workers`` workers owns."""
    active = {slot_for(root, base_id, i, workers).directory for i in range(workers)}
    return [slot for slot in existing_slots(root, base_id) if slot.directory not in active]


def wal_id(directory: str | os.PathLike[str]) -> str:
    """A WAL directory's permanent identity (the retry ledger's marks refer to it)."""
    path = Path(directory) / "wal.id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    ensure_directory(path.parent)
    value = os.urandom(16).hex()
    write_atomically(path, value.encode() + b"\n")
    return value


SIGKILL_BIT = 1 << (9 - 1)  # SIGKILL in /proc/PID/status's pending-signal masks


def _gone_or_going(holder: str) -> bool:
    """Whether the PID a lock file names is gone, or going: it exited, or it was killed and only an
    I/O the kernel cannot interrupt keeps it (a thread in an fsync on a disk that stopped answering
    holds the process, SIGKILL pending, and with it the lock). A name that is no PID could be
    anyone's: not gone."""
    if not holder.isdigit():
        return False
    try:
        os.kill(int(holder), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _being_killed(int(holder))


def _being_killed(pid: int) -> bool:
    """A zombie leader whose last threads have not exited, or a SIGKILL not yet acted on."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:  # gone meanwhile, or no /proc: what kill(0) said stands
        return False
    if fields.get("State", "").split()[:1] in (["Z"], ["X"]):
        return True
    pending = (int(fields.get(name, "0").strip() or "0", 16) for name in ("SigPnd", "ShdPnd"))
    return any(mask & SIGKILL_BIT for mask in pending)


class DirectoryLock:
    """An exclusive ``flock`` on a file in a directory, held for the life of the process.

    The kernel drops it on any exit, SIGKILL included, so no stale lock is ever left to clean up.
    The holder's PID is written into the file so a refused second owner can name it.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str, what: str) -> None:
        self.path = Path(directory) / name
        self._what = what
        self.fd = -1

    def acquire(self, *, exited_holder_wait_secs: float = 0.0, stop_requested: Callable[[], bool] = lambda: False) -> DirectoryLock:
        """Take the lock, or raise ``WalLocked`` naming its holder. A holder that has exited may
        still hold it for a while: the kernel drops the lock with the holder's last reference to
        the file, which an I/O still in flight keeps (a SIGKILL during an fsync on a slow disk).
        Such a lock is waited for up to ``exited_holder_wait_secs`` (``StoppedWhileStarting`` if
        ``stop_requested()`` meanwhile); a live holder's is refused at once."""
        ensure_directory(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + exited_holder_wait_secs
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if _gone_or_going(holder) and time.monotonic() < deadline:
                    if not waiting:
                        waiting = True
                        log.warning(
                            "the lock of a WAL directory is still held by a process that has exited or was killed (its "
                            "last I/O may still be in flight on a slow disk); waiting for the kernel to release it",
                            extra={"lock": str(self.path), "holder_pid": holder, "wait_secs": exited_holder_wait_secs},
                        )
                    if stop_requested():
                        os.close(fd)
                        raise StoppedWhileStarting(f"stopped while waiting for the lock of {self.path.parent} to be released")
                    time.sleep(EXITED_HOLDER_POLL_SECS)
                    continue
                os.close(fd)
                raise WalLocked(
                    f"{self._what} {self.path.parent} is in use by another gateway (pid {holder}"
                    f"{', which has exited or was killed but whose lock the kernel has not released yet' if _gone_or_going(holder) else ''}); "
                    "stop it first, or give this one its own wal.dir"
                ) from None
        if waiting:
            log.info("the exited holder's lock was released", extra={"lock": str(self.path)})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only a refused second owner cannot name us
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
