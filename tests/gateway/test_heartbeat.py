"""The supervisor's watchdog: silence is counted on its own clock, from a process's first beat."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from gateway.heartbeat import Watchdog, heartbeat_file, keep_beating


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(tmp_path, index, mtime_ns: int) -> None:
    path = heartbeat_file(tmp_path, index)
    path.touch()
    os.utime(path, ns=(mtime_ns, mtime_ns))


def watching(tmp_path, stall_secs: float, *indexes) -> tuple[Watchdog, Clock]:
    """A watchdog on its own clock that has seen each of ``indexes`` beat once."""
    clock = Clock()
    watchdog = Watchdog(tmp_path, stall_secs, clock)
    for index in indexes:
        beat(tmp_path, index, 1_000)
        watchdog.silent_for(index)
    return watchdog, clock


def starting(tmp_path, start_secs: float) -> tuple[Watchdog, Clock]:
    """A watchdog on its own clock with a start limit, and process 0 started just now."""
    clock = Clock()
    watchdog = Watchdog(tmp_path, 5.0, clock, start_secs=start_secs)
    watchdog.forget(0)
    return watchdog, clock


def test_a_process_is_silent_only_once_its_file_stops_changing_for_longer_than_the_limit(tmp_path):
    clock = Clock()
    watchdog = Watchdog(tmp_path, 5.0, clock)
    assert watchdog.silent_for(0) is None, "not beating yet: starting up"
    beat(tmp_path, 0, 1_000)
    assert watchdog.silent_for(0) is None
    clock.now += 4.9
    assert watchdog.silent_for(0) is None
    beat(tmp_path, 0, 2_000)  # it beat again: counted from when the watchdog sees it (it looks every 0.2 s)
    assert watchdog.silent_for(0) is None
    clock.now += 4.9
    assert watchdog.silent_for(0) is None
    clock.now += 0.2
    assert watchdog.silent_for(0) == pytest.approx(5.1)
    assert watchdog.silent_for("lake") is None, "each process on its own"


def test_a_wall_clock_step_is_not_silence(tmp_path):
    watchdog, clock = watching(tmp_path, 5.0, 0)
    beat(tmp_path, 0, 1_000 - 3_600 * 10**9)  # the wall clock stepped back an hour: the file still changed
    clock.now += 4.0
    assert watchdog.silent_for(0) is None


def test_a_restarted_process_is_not_judged_by_its_predecessors_file(tmp_path):
    watchdog, clock = watching(tmp_path, 5.0, 1)
    clock.now += 60
    assert watchdog.silent_for(1) == 60
    watchdog.forget(1)
    assert not heartbeat_file(tmp_path, 1).exists() and watchdog.silent_for(1) is None


def test_after_a_kill_the_others_get_a_whole_timeout_again(tmp_path):
    # One stuck holding the ledger's write lock stops the others' loops too: only it should go.
    watchdog, clock = watching(tmp_path, 5.0, 0, 1)
    clock.now += 6
    assert watchdog.silent_for(0) == 6 and watchdog.silent_for(1) == 6
    watchdog.grant_time()  # 0 was killed
    clock.now += 4
    assert watchdog.silent_for(1) is None
    clock.now += 2
    assert watchdog.silent_for(1) == 6, "still silent a whole timeout later: its own fault"


def test_a_pause_of_the_supervisor_counts_nobodys_silence(tmp_path):
    """The whole instance paused: the supervisor finds a gap between its looks, and the silence of
    every process it watches, paused with it, starts again; looks every 50 ms change nothing."""
    watchdog, clock = watching(tmp_path, 5.0, 0, 1)
    assert watchdog.look() is None
    for _ in range(40):  # two seconds of the supervisor running
        clock.now += 0.05
        assert watchdog.look() is None
    clock.now += 6  # paused
    assert watchdog.look() == pytest.approx(6)
    assert watchdog.silent_for(0) is None and watchdog.silent_for(1) is None
    clock.now += 5.5
    assert watchdog.silent_for(0) == pytest.approx(5.5), "a process still silent a whole timeout after the pause is stuck"


def test_a_process_that_never_begins_to_beat_is_starting_too_long_only_past_the_start_limit(tmp_path):
    watchdog, clock = starting(tmp_path, 60.0)
    clock.now += 59
    assert watchdog.silent_for(0) is None and watchdog.starting_for(0) is None, "a long start is no stall"
    clock.now += 2
    assert watchdog.silent_for(0) is None, "never beat: not silent"
    assert watchdog.starting_for(0) == pytest.approx(61)
    assert watchdog.starting_for(1) is None, "never started under this watchdog"


def test_the_first_beat_ends_the_start_and_the_stall_limit_takes_over(tmp_path):
    watchdog, clock = starting(tmp_path, 60.0)
    clock.now += 50
    beat(tmp_path, 0, 1_000)
    assert watchdog.silent_for(0) is None
    clock.now += 20
    assert watchdog.starting_for(0) is None
    assert watchdog.silent_for(0) == pytest.approx(20)


def test_a_pause_or_a_kill_gives_a_starting_process_its_whole_start_limit_again(tmp_path):
    watchdog, clock = starting(tmp_path, 60.0)
    clock.now += 59
    watchdog.grant_time()
    clock.now += 59
    assert watchdog.starting_for(0) is None
    clock.now += 2
    assert watchdog.starting_for(0) == pytest.approx(61)


def test_a_start_limit_of_zero_waits_however_long(tmp_path):
    watchdog, clock = starting(tmp_path, 0)
    clock.now += 86_400
    assert watchdog.starting_for(0) is None


def test_zero_turns_the_watch_off(tmp_path):
    watchdog, clock = watching(tmp_path, 0, 0)
    clock.now += 3_600
    assert watchdog.silent_for(0) is None


async def test_the_beat_touches_its_file_while_the_loop_turns(tmp_path):
    path = heartbeat_file(tmp_path, 0)
    task = asyncio.create_task(keep_beating(path))
    await asyncio.sleep(0.05)
    first = path.stat().st_mtime_ns
    await asyncio.sleep(1.1)
    assert path.stat().st_mtime_ns > first
    task.cancel()


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.killed = False

    def poll(self):
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout: float | None = None) -> int:
        return -9


class ProcessStuckInTheKernel(FakeProcess):
    """Killed, it does not exit (uninterruptible sleep on a disk that stopped answering)."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.kills = 0

    def kill(self) -> None:
        self.kills += 1

    def poll(self):
        return None

    def wait(self, timeout: float | None = None) -> int:
        raise subprocess.TimeoutExpired("gateway", timeout)


def running(supervisor, clock: Clock, secs: float) -> None:
    """The supervisor's clock moves on while it runs: it looks every 50 ms."""
    for _ in range(round(secs / 0.05)):
        clock.now += 0.05
        supervisor.watchdog.look()


def test_the_supervisor_kills_only_the_process_silent_longest(tmp_path, caplog):
    from gateway.settings import load_settings
    from gateway.supervisor import LAKE, Supervisor

    supervisor = Supervisor(None, load_settings(None, environ={"EDGE_GATEWAY__LISTEN__WORKERS": "2"}))
    clock = Clock()
    supervisor.watchdog = Watchdog(tmp_path, 5.0, clock)
    supervisor.procs = {0: FakeProcess(10), 1: FakeProcess(11), LAKE: FakeProcess(12)}
    for index in supervisor.procs:
        beat(tmp_path, index, 1_000)
        supervisor.watchdog.silent_for(index)
    running(supervisor, clock, 2)
    beat(tmp_path, 0, 2_000)  # worker 0 stopped beating 2 s after the others: it waited on one of them
    supervisor.watchdog.silent_for(0)
    running(supervisor, clock, 2)
    supervisor._kill_the_most_stalled()
    assert not any(p.killed for p in supervisor.procs.values()), "nobody silent 5 s yet"
    running(supervisor, clock, 5)  # worker 1 and the lake process silent for 9 s, worker 0 for 7 s
    beat(tmp_path, LAKE, 3_000)
    supervisor.watchdog.silent_for(LAKE)
    supervisor._kill_the_most_stalled()
    assert [i for i, p in supervisor.procs.items() if p.killed] == [1]
    assert "a worker stopped answering: its event loop has not turned for 9 s" in caplog.text
    supervisor._kill_the_most_stalled()
    assert [i for i, p in supervisor.procs.items() if p.killed] == [1], "worker 0 gets a whole timeout again"


def test_the_supervisor_kills_a_process_stuck_while_starting_and_says_so(tmp_path, caplog):
    from gateway.settings import load_settings
    from gateway.supervisor import LAKE, Supervisor

    supervisor = Supervisor(None, load_settings(None, environ={"EDGE_GATEWAY__LISTEN__WORKERS": "2"}))
    clock = Clock()
    supervisor.watchdog = Watchdog(tmp_path, 5.0, clock, start_secs=30.0)
    supervisor.procs = {0: FakeProcess(10), 1: FakeProcess(11), LAKE: FakeProcess(12)}
    for index in supervisor.procs:
        supervisor.watchdog.forget(index)
    for index in (0, LAKE):
        beat(tmp_path, index, 1_000)
    for _ in range(round(29 / 0.2)):  # the supervisor's loop while worker 1 starts; the others beat
        running(supervisor, clock, 0.2)
        for index in (0, LAKE):
            beat(tmp_path, index, round(clock.now * 1e9))
        supervisor._kill_the_most_stalled()
    assert not any(p.killed for p in supervisor.procs.values()), "worker 1 is within its start limit"
    running(supervisor, clock, 2)
    supervisor._kill_the_most_stalled()
    assert [i for i, p in supervisor.procs.items() if p.killed] == [1]
    assert "a worker has not finished starting in 31 s" in caplog.text


def test_a_killed_process_stuck_in_the_kernel_does_not_stop_the_supervisor_watching_the_others(tmp_path, caplog, monkeypatch):
    from gateway import supervisor as supervising
    from gateway.settings import load_settings
    from gateway.supervisor import LAKE, Supervisor

    monkeypatch.setattr(supervising, "KILLED_EXIT_WAIT_SECS", 0.01)
    supervisor = Supervisor(None, load_settings(None, environ={"EDGE_GATEWAY__LISTEN__WORKERS": "2"}))
    clock = Clock()
    supervisor.watchdog = Watchdog(tmp_path, 5.0, clock)
    stuck = ProcessStuckInTheKernel(11)
    supervisor.procs = {0: FakeProcess(10), 1: stuck, LAKE: FakeProcess(12)}
    for index in supervisor.procs:
        beat(tmp_path, index, 1_000)
        supervisor.watchdog.silent_for(index)
    running(supervisor, clock, 6)
    for index in (0, LAKE):
        beat(tmp_path, index, 2_000)
        supervisor.watchdog.silent_for(index)
    supervisor._kill_the_most_stalled()
    assert stuck.kills == 1 and "has not exited" in caplog.text and "stuck in the kernel" in caplog.text
    running(supervisor, clock, 6)  # every process silent again: the stuck one is not killed twice, the next one is
    supervisor._kill_the_most_stalled()
    assert stuck.kills == 1
    assert [i for i, p in supervisor.procs.items() if p.killed] == [0]
    assert supervisor.killed == {1}, "left for the loop, which restarts it once poll() says it exited"
