"""Signals that reach a ``serve`` process before it can act on them are remembered, never fatal.

A process can be signalled the moment it exists: the supervisor drains a worker or the lake
process it has just started again, and an init system stopping the service signals every process
of its control group at once. Until ``serve`` has its handlers, the default action of SIGTERM,
SIGHUP and SIGUSR1 is to die, and a young lake process that dies so leaves the WALs undrained. So
the supervisor starts its processes with these signals blocked (the mask is inherited across fork
and exec), and each process, once its handlers remember them, unblocks them: one sent meanwhile
was held pending, and is remembered then.

Only the standard library is imported here: this runs before the gateway's own imports.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# Every one of SIGNALS that arrived before the process installed its own handlers, in order. Read it
# after installing them: one may arrive while they are being installed.
remembered: list[int] = []


def remember() -> None:
    """Remember these signals from now on, and take those held while this process started."""
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: remembered.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class StoppedWhileStarting(Exception):
    """A stop was asked for while the start was waiting (for room on a full disk, for a lock an exited
    process still held) or catching its retry ledger up: nothing had started, so there is nothing to
    drain, and ``serve`` exits 0."""


def stop_requested() -> bool:
    return any(sig in (signal.SIGTERM, signal.SIGINT) for sig in remembered)


def reload_requested() -> bool:
    """A SIGHUP came while starting (a reload asked for the moment systemd was told READY=1)."""
    return signal.SIGHUP in remembered


def ignore_from_now() -> None:
    """``serve`` is done and exits: a signal now has nothing left to stop or reload. At exit Python
    gives every signal it handles its default action back, and a log rotation's SIGHUP (or a second
    SIGTERM) would then kill the process on its way out: a clean stop would look like a crash."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def held_for_children() -> Iterator[None]:
    """Processes started inside begin with these signals blocked, until they ``remember`` them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
