"""One worker process per core, sharing one listening socket, under a supervisor.

Each worker is a whole gateway with its own WAL directory (``<wal.dir>/w<N>``) and its own lake
object names (``<gateway_id>-w<N>-...``), so workers never coordinate on the record path; the retry
ledger is the one thing they share. The supervisor owns the instance: it locks ``wal.dir`` and binds
the port once (no SO_REUSEPORT, so a second instance fails to start instead of splitting traffic),
then hands both to its workers; the ops listener's port (``/metrics``) is bound once and handed down
the same way, so every worker answers it. It starts the lake process, which lands every worker's WAL
(gateway/lake/lake_process.py, unless ``lake.landing = "worker"``), restarts a worker or the lake
process that dies (with backoff if it keeps dying) or stops answering (gateway/heartbeat.py), passes
SIGHUP on, and on SIGTERM drains every
worker, waits for them, and then has the lake process land what their WALs hold. All die with it.
It also makes a private runtime directory where each worker listens on a Unix socket for its
siblings, so that whichever worker answers ``/metrics``, the status page or the tap answers for the
whole instance (``gateway/ops/status/cluster.py``), and publishes how many connections it holds, so
that each takes its share of those waiting on the listener (``gateway/edge/accept_share.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway import early_signals
from gateway.edge.accept_share import leave_nothing_to
from gateway.edge.while_starting import answering_while_starting
from gateway.heartbeat import Watchdog
from gateway.listeners import bind_listener
from gateway.runtime_dir import make_runtime_dir, remove_runtime_dir
from gateway.settings import ConfigError, Settings, lake_process_lands, load_settings, with_run_time_sections
from gateway.settings_snapshot import SETTINGS_ENV, write_snapshot
from gateway.durable.wal_layout import EXITED_HOLDER_WAIT_SECS, INSTANCE_LOCK, SUPERVISED_ENV, DirectoryLock

log = logging.getLogger(__name__)

MAX_BACKOFF_SECS = 30.0
# The descriptor of the ops socket (/metrics) a supervisor bound for its workers.
OPS_FD_ENV = "EDGE_GATEWAY_OPS_FD"
# The private directory where workers listen for each other (gateway/ops/status/cluster.py).
RUNTIME_ENV = "EDGE_GATEWAY_RUNTIME_DIR"
LAKE = "lake"  # the lake process's key among the supervised processes
# How many lake processes a stop starts, one after another, to land what the workers left.
LAKE_DRAIN_ATTEMPTS = 3
# How long the supervisor waits for a process it killed to exit before it goes on without it: one in
# uninterruptible sleep (on a disk that stopped answering) exits only when the kernel lets it go.
KILLED_EXIT_WAIT_SECS = 5.0


class Supervisor:
    def __init__(self, config: Path | None, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.workers = settings.listen.workers
        self.lock = DirectoryLock(settings.wal.dir, INSTANCE_LOCK, "the WAL directory")
        self.listener: socket.socket | None = None
        self.ops_listener: socket.socket | None = None  # /metrics, shared by the workers like the device port
        self.procs: dict[int | str, subprocess.Popen] = {}
        self.backoff: dict[int | str, float] = {}
        self.started_at: dict[int | str, float] = {}
        self.killed: set[int | str] = set()  # killed but not exited yet: stuck in the kernel
        self.stopping = False
        # Where workers listen for each other (metrics, status, tap): private to this instance.
        self.runtime_dir: str | None = None
        self.snapshot: Path | None = None  # the settings every process starts with (gateway/settings_snapshot.py)
        self.reload_requested = False  # SIGHUP: applied by the supervising loop, not in the signal handler
        self.watchdog: Watchdog | None = None  # made with the runtime directory

    def _catch_up_ledger(self, stop_requested) -> None:
        """Before any worker answers: the retry ledger knows every durable record of every WAL
        directory (on a full disk, once there is room: ``StoppedWhileStarting`` if stopped meanwhile).
        The device listener answers meanwhile: alive, not ready; the ops listener's ``/metrics`` says
        the instance is starting (gateway/edge/while_starting.py)."""
        from gateway.durable.ledger_catch_up import ledger_for, open_and_catch_up_when_room

        ledger = ledger_for(self.settings)
        base_id = self.settings.gateway.gateway_id or socket.gethostname().split(".")[0]
        try:
            with answering_while_starting(self.listener, self.settings, self.ops_listener) as starting:
                open_and_catch_up_when_room(
                    self.settings, base_id, ledger, lambda: self.stopping or stop_requested(),
                    waiting_for_room=starting.waiting_for_room,
                )
        finally:
            ledger.close()

    def _spawn(self, index: int | str) -> None:
        # Written afresh for each process: a file left unchanged for days may be aged out of a temporary directory.
        self.snapshot = write_snapshot(self.runtime_dir, self.settings)
        env = dict(
            os.environ,
            **{SUPERVISED_ENV: str(Path(self.settings.wal.dir).resolve()), RUNTIME_ENV: self.runtime_dir, SETTINGS_ENV: str(self.snapshot)},
        )
        # The lock's descriptor goes along, so the instance stays locked while any of its processes lives.
        fds = [self.lock.fd]
        if index == LAKE:
            argv = [sys.executable, "-m", "gateway", "serve", "--lake-process"]
        else:
            fd = self.listener.fileno()
            argv = [sys.executable, "-m", "gateway", "serve", "--worker-index", str(index), "--listen-fd", str(fd)]
            fds.append(fd)
            if self.ops_listener is not None:
                env[OPS_FD_ENV] = str(self.ops_listener.fileno())
                fds.append(self.ops_listener.fileno())
        if self.config is not None:
            argv += ["--config", str(self.config)]
        self.watchdog.forget(index)
        self.killed.discard(index)
        with early_signals.held_for_children():  # a signal sent before the child can handle it waits for it
            self.procs[index] = subprocess.Popen(argv, pass_fds=fds, env=env, preexec_fn=_die_with_parent)
        self.started_at[index] = time.monotonic()
        log.info("lake process started" if index == LAKE else "worker started", extra={"worker": index, "pid": self.procs[index].pid})

    def _forward(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def run(self, stop_requested=lambda: False) -> int:
        def on_stop(signum, frame) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: setattr(self, "reload_requested", True))
        self.reload_requested = early_signals.reload_requested()  # applied once the processes run
        if stop_requested():  # told to stop before any worker started: nothing to drain
            return 0
        # WalLocked: another instance owns wal.dir.
        self.lock.acquire(exited_holder_wait_secs=EXITED_HOLDER_WAIT_SECS, stop_requested=lambda: self.stopping or stop_requested())
        listen, ops = self.settings.listen, self.settings.ops
        self.listener = bind_listener(listen.host, listen.port, listen.backlog)
        if ops.enabled:
            self.ops_listener = bind_listener(ops.host, ops.port, 128)
        self._catch_up_ledger(stop_requested)
        self.runtime_dir = str(make_runtime_dir(self.settings.wal.dir))
        self.watchdog = Watchdog(Path(self.runtime_dir), listen.stall_timeout_secs, start_secs=listen.start_timeout_secs)
        try:
            code = self._supervise()
        finally:
            remove_runtime_dir(self.settings.wal.dir, self.runtime_dir)
        self._seal_ledger()
        return code

    def _seal_ledger(self) -> None:
        """Every process of the instance has exited: flush the ledger so a machine restart keeps it."""
        from gateway.durable.ledger_catch_up import ledger_for

        ledger_for(self.settings).seal()

    def _supervise(self) -> int:
        for index in range(self.workers):
            self._spawn(index)
        if lake_process_lands(self.settings):
            self._spawn(LAKE)  # lands every worker's WAL (gateway/lake/lake_process.py)
        while not self.stopping:
            self._kill_the_most_stalled()
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self.stopping:
                    continue
                # A worker that ran a while gets restarted at once; one that keeps dying, slower and slower.
                lived = time.monotonic() - self.started_at[index]
                delay = 0.0 if lived > MAX_BACKOFF_SECS else min(MAX_BACKOFF_SECS, max(0.5, self.backoff.get(index, 0.25) * 2))
                self.backoff[index] = delay
                if index != LAKE:
                    leave_nothing_to(Path(self.runtime_dir), index)
                what = "the lake process died; restarting it" if index == LAKE else "worker died; restarting"
                log.error(what, extra={"worker": index, "exit_code": code, "restart_in_secs": delay})
                self._sleep(delay)
                if not self.stopping:
                    self._spawn(index)
            self._sleep(0.2)
        return self._drain()

    def _kill_the_most_stalled(self) -> None:
        """The process alive but silent longest past ``listen.stall_timeout_secs`` (or, not beating
        yet, starting for longer than ``listen.start_timeout_secs``) is killed (the loop then
        restarts it as one that died); the others' silence is counted afresh, since they may only
        have been waiting on it."""
        self._look()
        stalled: dict[int | str, tuple[float, bool]] = {}  # index -> (seconds, whether still starting)
        for index, proc in self.procs.items():
            if proc.poll() is not None or index in self.killed:
                continue
            if (silent := self.watchdog.silent_for(index)) is not None:
                stalled[index] = (silent, False)
            elif (starting := self.watchdog.starting_for(index)) is not None:
                stalled[index] = (starting, True)
        if not stalled or self.stopping:
            return
        index = max(stalled, key=lambda i: stalled[i][0])
        (secs, starting), proc = stalled[index], self.procs[index]
        what = "the lake process" if index == LAKE else "a worker"
        listen = self.settings.listen
        if starting:
            log.error(f"{what} has not finished starting in {secs:.0f} s; killing it to restart it (a start that recovers a "
                      "large WAL from a slow disk may need a higher listen.start_timeout_secs)",
                      extra={"worker": index, "pid": proc.pid, "start_timeout_secs": listen.start_timeout_secs})
        else:
            log.error(f"{what} stopped answering: its event loop has not turned for {secs:.0f} s; killing it to restart it",
                      extra={"worker": index, "pid": proc.pid, "stall_timeout_secs": listen.stall_timeout_secs})
        proc.kill()
        if not _exits(proc, KILLED_EXIT_WAIT_SECS):
            # The loop restarts it once it exits; meanwhile the others are watched and restarted.
            self.killed.add(index)
            log.error(f"{what} has not exited {KILLED_EXIT_WAIT_SECS:.0f} s after SIGKILL: it is stuck in the kernel, most "
                      "likely on its disk; it is restarted once it exits", extra={"worker": index, "pid": proc.pid})
        self.watchdog.grant_time()  # also says the wait for it (seconds, for one stuck in the kernel) was no pause

    def _sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < until:
            time.sleep(min(0.05, seconds))
            self._look()
            if self.reload_requested:
                self._reload()

    def _reload(self) -> None:
        """SIGHUP: the configuration file's run-time sections into the settings a process starts with
        (a file that does not load changes nothing), then the signal to every process, which each
        reloads the file itself and says what it applied or refused."""
        self.reload_requested = False
        try:
            self.settings = with_run_time_sections(self.settings, load_settings(self.config))
        except ConfigError:
            pass  # each process logs the refusal and counts it in its metrics
        self._forward(signal.SIGHUP)

    def _look(self) -> None:
        """Tell the watchdog the supervisor runs (every 50 ms at least), and say so when it had not."""
        if (paused_secs := self.watchdog.look()) is not None:
            log.warning(
                "the supervisor did not run for a while (the instance or the machine was paused); every process's silence is counted afresh",
                extra={"paused_secs": round(paused_secs, 1)},
            )

    def _drain(self) -> int:
        """Workers first (they answer what is in flight), then the lake process lands what they left."""
        log.info("draining workers", extra={"workers": self.workers})
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain.deadline_secs + 10
        lake = self.procs.pop(LAKE, None)
        self._wait_for(self.procs, deadline)
        if lake is not None:
            self._drain_lake(lake, deadline)
        return 0

    def _drain_lake(self, lake: subprocess.Popen, deadline: float) -> None:
        """Every worker has exited: the lake process lands what their WALs hold. One that is not
        running (it died and was waiting for its restart) is started again for that, as is one that
        exits before it has landed everything, while the deadline allows."""
        for _ in range(LAKE_DRAIN_ATTEMPTS):
            if lake.poll() is None:
                lake.send_signal(signal.SIGUSR1)  # what the WALs hold now is all there is to land
                self._wait_for({LAKE: lake}, deadline)
            if lake.returncode == 0 or time.monotonic() >= deadline:
                break
            log.error("the lake process exited before landing what the WALs hold; starting it again for that",
                      extra={"worker": LAKE, "exit_code": lake.returncode})
            self._spawn(LAKE)
            lake = self.procs.pop(LAKE)
        if lake.returncode != 0:
            log.error("the lake process did not land what the WALs hold; the next start lands it",
                      extra={"worker": LAKE, "exit_code": lake.returncode})

    def _wait_for(self, procs: dict[int | str, subprocess.Popen], deadline: float) -> None:
        for index, proc in procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("a process did not drain in time; killing it (the WAL keeps the rest)", extra={"worker": index})
                proc.kill()
                if not _exits(proc, KILLED_EXIT_WAIT_SECS):
                    log.error("a process has not exited after SIGKILL: it is stuck in the kernel, most likely on its disk; "
                              "stopping without it (the next start recovers its WAL)", extra={"worker": index, "pid": proc.pid})


def _exits(proc: subprocess.Popen, within_secs: float) -> bool:
    try:
        proc.wait(within_secs)
    except subprocess.TimeoutExpired:
        return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills it if the supervisor dies (a crash takes all)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
