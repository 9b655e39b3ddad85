"""Start and measure the servers under test: each in its own process, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A child process serving HTTP on a loopback port, with CPU and peak-RSS accounting."""

    def __init__(self, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, env={**os.environ, **(env or {})})
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0
        self._sampling = False
        self._thread: threading.Thread | None = None
        self.log_path = log_path

    def wait_ready(self, timeout: float = 30.0) -> float:
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.01)
        raise RuntimeError(f"server not ready in {timeout} s")

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def start_sampling(self, interval: float = 0.05) -> None:
        self._sampling = True
        self.peak_rss = self.rss()

        def sample() -> None:
            while self._sampling:
                try:
                    self.peak_rss = max(self.peak_rss, self.rss())
                except psutil.Error:
                    return
                time.sleep(interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop_sampling(self) -> int:
        self._sampling = False
        if self._thread:
            self._thread.join()
        return self.peak_rss

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def python() -> str:
    return sys.executable
