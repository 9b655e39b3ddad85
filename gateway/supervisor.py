"""One worker process per core, sharing the listening port (SO_REUSEPORT), under a supervisor.

Each worker is a whole gateway with its own WAL directory (``<wal.dir>/w<N>``) and its own lake
object names (``<gateway_id>-w<N>-...``), so workers never coordinate on the record path. The
supervisor restarts a worker that dies (with backoff if it keeps dying), passes SIGHUP on, and on
SIGTERM drains every worker and waits for them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_SECS = 30.0


class Supervisor:
    def __init__(self, config: Path | None, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.workers = settings.listen.workers
        self.procs: dict[int, subprocess.Popen] = {}
        self.backoff: dict[int, float] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = False

    def _spawn(self, index: int) -> None:
        argv = [sys.executable, "-m", "gateway", "serve", "--worker-index", str(index)]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        self.procs[index] = subprocess.Popen(argv)
        self.started_at[index] = time.monotonic()
        log.info("worker started", extra={"worker": index, "pid": self.procs[index].pid})

    def _forward(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def run(self, stop_requested=lambda: False) -> int:
        def on_stop(signum, frame) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: self._forward(signal.SIGHUP))
        if stop_requested():  # told to stop before any worker started: nothing to drain
            return 0
        for index in range(self.workers):
            self._spawn(index)
        while not self.stopping:
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self.stopping:
                    continue
                # A worker that ran a while gets restarted at once; one that keeps dying, slower and slower.
                lived = time.monotonic() - self.started_at[index]
                delay = 0.0 if lived > MAX_BACKOFF_SECS else min(MAX_BACKOFF_SECS, max(0.5, self.backoff.get(index, 0.25) * 2))
                self.backoff[index] = delay
                log.error("worker died; restarting", extra={"worker": index, "exit_code": code, "restart_in_secs": delay})
                self._sleep(delay)
                if not self.stopping:
                    self._spawn(index)
            self._sleep(0.2)
        return self._drain()

    def _sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < until:
            time.sleep(min(0.05, seconds))

    def _drain(self) -> int:
        log.info("draining workers", extra={"workers": len(self.procs)})
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain.deadline_secs + 10
        for index, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not drain in time; killing it (its WAL keeps the rest)", extra={"worker": index})
                proc.kill()
                proc.wait()
        return 0


def worker_settings(settings: Settings, index: int, hostname: str) -> Settings:
    """A worker's own identity and WAL directory, derived from the shared configuration."""
    import msgspec

    base_id = settings.gateway.gateway_id or hostname
    gateway = msgspec.structs.replace(settings.gateway, gateway_id=f"{base_id}-w{index}")
    wal = msgspec.structs.replace(settings.wal, dir=os.path.join(settings.wal.dir, f"w{index}"))
    return msgspec.structs.replace(settings, gateway=gateway, wal=wal)
