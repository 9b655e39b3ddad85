"""Start and measure the servers under test: each in its own process on loopback, stopped by PID.

``Server`` samples its child's RSS, CPU and open file descriptors from a thread, so a scenario gets
peak RSS for free and, when asked, a time series (the soak's plots).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python() -> str:
    return sys.executable


@dataclass
class Sample:
    t_secs: float
    rss_bytes: int  # the summed PSS of every process (``usage``)
    cpu_secs: float  # of every process
    fds: int  # of every process


@dataclass(frozen=True)
class Usage:
    memory_bytes: int
    cpu_secs: float
    fds: int


def usage(root: psutil.Process) -> Usage:
    """What a server and every process under it use: summed over the supervisor, its workers and helpers.

    Memory is the proportional set size (PSS): summed RSS would count the pages the workers share
    (the interpreter, libraries) once per process; PSS splits each shared page between its sharers.
    """
    memory, cpu, fds = 0, 0.0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            with proc.oneshot():
                memory += proc.memory_full_info().pss
                t = proc.cpu_times()
                cpu += t.user + t.system
                fds += proc.num_fds()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that just exited holds nothing
    return Usage(memory, cpu, fds)


@dataclass
class Sampler:
    """Peak memory (``usage``) always; every sample when ``keep`` is set."""

    ps: psutil.Process
    interval_secs: float
    keep: bool
    peak_rss: int = 0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        begin = time.perf_counter()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    now = usage(self.ps)
                except psutil.Error:
                    return
                self.peak_rss = max(self.peak_rss, now.memory_bytes)
                if self.keep:
                    self.samples.append(Sample(time.perf_counter() - begin, now.memory_bytes, now.cpu_secs, now.fds))
                self._stop.wait(self.interval_secs)

        self._thread = threading.Thread(target=loop, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def cpu_by_process(root: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of ``root`` and every process under it, by role (``main``, ``worker 0``, ...)."""
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    out: dict[str, float] = {}
    for proc in [root, *children]:
        try:
            t = proc.cpu_times()
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        # Names stay the same from run to run (figures are compared by name): helper processes
        # (the curated zone's decoder, the embedded model) are counted together.
        role = f"worker {cmdline[cmdline.index('--worker-index') + 1]}" if "--worker-index" in cmdline else (
            "lake process" if "--lake-process" in cmdline else "main" if proc.pid == root.pid else "helpers")
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


class Server:
    """A child process serving HTTP on a loopback port, with CPU, RSS and file-descriptor accounting."""

    def __init__(self, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, ready_path: str = "/readyz") -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=REPO_ROOT,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.startup_secs = float("nan")
        self._sampler: Sampler | None = None

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Poll readiness (never a fixed sleep); returns seconds from process start to the first 2xx."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log_path.stem} exited early with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as resp:
                    if 200 <= resp.status < 300:
                        self.startup_secs = time.perf_counter() - self.started_at
                        return self.startup_secs
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.log_path.stem} not ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def cpu_seconds(self) -> float:
        """CPU time of the server and every process under it (a supervisor's workers)."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far per process, named by role (``main``, ``worker 0``, ...)."""
        return cpu_by_process(self.ps)

    def rss(self) -> int:
        """The server's memory, its helper processes and workers included (``usage``)."""
        return usage(self.ps).memory_bytes

    def num_fds(self) -> int:
        return usage(self.ps).fds

    def start_sampling(self, interval: float = 0.05, keep: bool = False) -> Sampler:
        self._sampler = Sampler(self.ps, interval, keep, peak_rss=self.rss())
        self._sampler.start()
        return self._sampler

    def stop_sampling(self) -> int:
        """Stop the sampler; returns the peak RSS it saw."""
        sampler, self._sampler = self._sampler, None
        if sampler is None:
            return 0
        sampler.stop()
        return sampler.peak_rss

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the gateway drains), then SIGKILL if it does not exit in time; by PID only."""
        if self._sampler is not None:
            self.stop_sampling()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class MotoServer(Server):
    """``moto_server`` (S3 and friends) on a loopback port, with dummy credentials."""

    def __init__(self, log_path: Path) -> None:
        port = free_port()
        super().__init__([python(), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, log_path,
                         ready_path="/moto-api/config")


AWS_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Never read the user's real AWS profile or credentials files.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


TRITON_VENV_PYTHON = REPO_ROOT / ".venv-triton" / "bin" / "python"
TRITON_SERVER_SCRIPT = REPO_ROOT / "tests" / "triton" / "pytriton_server.py"


def triton_unavailable(profile) -> str | None:
    """Why a scenario that starts a PyTriton server cannot run in this ``profile`` here (None when it can)."""
    if not profile.triton:
        return f"skipped in the {profile.name} profile"
    if not TRITON_VENV_PYTHON.exists():
        return (".venv-triton is absent (make bench creates it; or python3.11 -m venv .venv-triton && "
                ".venv-triton/bin/pip install -r tests/triton/requirements.txt)")
    if not TRITON_SERVER_SCRIPT.exists():
        return "tests/triton/pytriton_server.py is missing"
    return None


class TritonServer(Server):
    """The PyTriton test server (the anomaly model) from its own virtualenv, in its own process group.

    PyTriton's Python-backend stub links libpython, so ``LD_LIBRARY_PATH`` gets that interpreter's
    LIBDIR; stopping sends SIGTERM to the PyTriton PID, then SIGKILL to its process group.
    """

    def __init__(self, log_path: Path, workspace: Path) -> None:
        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        self.grpc_port = grpc_port
        libdir = subprocess.run(
            [str(TRITON_VENV_PYTHON), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        env.pop("PYTHONPATH", None)
        self.port = http_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.ready_path = "/v2/models/telemetry_anomaly/ready"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(TRITON_VENV_PYTHON), str(TRITON_SERVER_SCRIPT), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
             "--metrics-port", str(metrics_port), "--workspace", str(workspace)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.startup_secs = float("nan")
        self._sampler = None

    def stop(self, timeout: float = 20.0) -> int | None:
        pid = self.proc.pid
        code = super().stop(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # tritonserver and the stub, if they outlived PyTriton
        for region in Path("/dev/shm").glob(f"pytrtion{pid}-*") if Path("/dev/shm").is_dir() else ():
            with contextlib.suppress(OSError):
                region.unlink()
        return code
