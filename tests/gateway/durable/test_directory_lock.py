"""The WAL directory's locks: one owner at a time, and a start that outlives its predecessor's last I/O."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from gateway.durable.wal_layout import DirectoryLock, WalLocked
from tests.fixtures.failing_disk import FailingDisk

HOLD = textwrap.dedent(
    """
    import os, sys, time
    from gateway.durable.wal_layout import DirectoryLock
    DirectoryLock(sys.argv[1], "instance.lock", "the WAL directory").acquire()
    if sys.argv[2] == "outlived":
        # The lock belongs to the open file, not the process: a child keeping the descriptor keeps it
        # after its parent (the PID the file names) exits, as an fsync in flight keeps a killed process's.
        if os.fork() == 0:
            sys.stdout.close()
            time.sleep(float(sys.argv[3]))
            os._exit(0)
        print("locked", os.getpid(), flush=True)
        os._exit(0)
    print("locked", os.getpid(), flush=True)
    time.sleep(60)
    """
)


def hold(directory, how: str, seconds: float = 0.0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), how, str(seconds)], stdout=subprocess.PIPE, text=True)
    word, pid = proc.stdout.readline().split()
    proc.stdout.close()
    assert word == "locked"
    return proc, int(pid)


def test_a_live_holder_is_refused_at_once_and_named(tmp_path):
    proc, pid = hold(tmp_path, "alive")
    try:
        started = time.monotonic()
        with pytest.raises(WalLocked, match=f"in use by another gateway \\(pid {pid}\\)"):
            DirectoryLock(tmp_path, "instance.lock", "the WAL directory").acquire(exited_holder_wait_secs=30)
        assert time.monotonic() - started < 5, "a live holder must not be waited for"
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_that_outlives_its_exited_holder_is_waited_for(tmp_path, caplog):
    proc, pid = hold(tmp_path, "outlived", 1.5)
    proc.wait()
    with pytest.raises(WalLocked, match=f"pid {pid}, which has exited or was killed but whose lock the kernel has not released yet"):
        DirectoryLock(tmp_path, "instance.lock", "the WAL directory").acquire()
    lock = DirectoryLock(tmp_path, "instance.lock", "the WAL directory").acquire(exited_holder_wait_secs=30)
    assert "still held by a process that has exited" in caplog.text
    lock.release()


def test_an_exited_holders_lock_is_waited_for_only_so_long(tmp_path):
    proc, pid = hold(tmp_path, "outlived", 5)
    proc.wait()
    started = time.monotonic()
    with pytest.raises(WalLocked, match=f"pid {pid}, which has exited"):
        DirectoryLock(tmp_path, "instance.lock", "the WAL directory").acquire(exited_holder_wait_secs=0.5)
    assert time.monotonic() - started < 4


HOLD_IN_FSYNC = textwrap.dedent(
    """
    import os, sys
    from gateway.durable.wal_layout import DirectoryLock
    DirectoryLock(sys.argv[1], "instance.lock", "the WAL directory").acquire()
    fd = os.open(os.path.join(sys.argv[1], "data"), os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"x")
    print("locked", os.getpid(), flush=True)
    os.fsync(fd)  # the disk makes it take seconds
    """
)


def test_a_holder_killed_inside_an_fsync_it_cannot_leave_is_waited_for(tmp_path, caplog):
    """SIGKILLed while its fsync waits on a disk that stopped answering, the holder lives on in the
    kernel (a FUSE request the file system has taken waits uninterruptibly), SIGKILL pending, and
    so does its lock: a start once took it for a live gateway and refused at once."""
    with FailingDisk(tmp_path) as disk:
        disk.slow_fsyncs(3.0)
        proc = subprocess.Popen([sys.executable, "-c", HOLD_IN_FSYNC, str(disk.mountpoint)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().split()[0] == "locked"
            deadline = time.monotonic() + 10
            while disk.slowed == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert disk.slowed, "the holder's fsync never reached the disk"
            proc.kill()
            time.sleep(0.2)
            assert proc.poll() is None, "the killed holder exited at once: its fsync was not stuck"
            lock = DirectoryLock(disk.mountpoint, "instance.lock", "the WAL directory").acquire(exited_holder_wait_secs=30)
            assert "has exited or was killed" in caplog.text  # it waited for the kernel, and said so
            lock.release()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def test_a_stop_ends_the_wait_for_an_exited_holders_lock(tmp_path):
    from gateway.early_signals import StoppedWhileStarting

    proc, pid = hold(tmp_path, "outlived", 10)
    proc.wait()
    started = time.monotonic()
    with pytest.raises(StoppedWhileStarting, match="stopped while waiting for the lock"):
        DirectoryLock(tmp_path, "instance.lock", "the WAL directory").acquire(
            exited_holder_wait_secs=30, stop_requested=lambda: time.monotonic() - started > 0.3
        )
    assert time.monotonic() - started < 3, "the stop is honoured within a poll, not after the wait"
