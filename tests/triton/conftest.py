"""Real Triton servers (PyTriton on CPU) for the tests in this directory.

PyTriton pins numpy<2, so the servers run from their own virtualenv, ``.venv-triton`` at the
repository root, created with:

    python3.11 -m venv .venv-triton && .venv-triton/bin/pip install -r tests/triton/requirements.txt

The servers start once per session, all at once (PyTriton takes a few seconds to start, so they
overlap), on free loopback ports; the fixture waits until each answers ``/v2/health/ready`` and
``/v2/models/<model>/ready`` (polling, never a fixed sleep) and prints the server's log if it does
not. Each server runs in its own process group, so a test can SIGKILL a whole server (PyTriton,
tritonserver and the model's stub process) and teardown can stop it by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import numpy as np

from connectors.errors import ThrottledError
from connectors.models.anomaly import MODEL_NAME
from connectors.triton import TritonInferencer, TritonSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO_ROOT / ".venv-triton" / "bin" / "python"
SERVER_SCRIPT = Path(__file__).resolve().with_name("pytriton_server.py")
CREATE_VENV = "python3.11 -m venv .venv-triton && .venv-triton/bin/pip install -r tests/triton/requirements.txt"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0

# The servers every session starts, by role, with their server-script arguments.
SERVERS: dict[str, list[str]] = {
    "primary": ["--mode", "normal"],
    "victim": ["--mode", "normal"],  # killed by the failover test
    # Slow, with a short queue: concurrent calls beyond it are rejected as "Exceeds maximum queue size".
    "slow": ["--mode", "slow", "--sleep-ms", "300", "--max-queue-size", "2"],
    "failing": ["--mode", "failing"],
}


@dataclass
class TritonServer:
    """One PyTriton server process and its loopback ports."""

    role: str
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    killed: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"

    def settings(self, protocol: str, **overrides) -> TritonSettings:
        overrides.setdefault("name", f"{self.role}-{protocol}")
        return TritonSettings(url=self.url(protocol), protocol=protocol, **overrides)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    def kill(self) -> None:
        """SIGKILL the whole server at once, as a crashed machine would disappear."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self) -> None:
        """Ask for a clean shutdown (SIGTERM) without waiting for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM (clean shutdown), then SIGKILL the process group if it does not exit in time."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                sys.stderr.write(f"PyTriton {self.role} (pid {self.pid}) ignored SIGTERM; killing it\n")
        # Whatever is left of the group (e.g. tritonserver after a SIGKILL of its parent) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)
        _remove_shared_memory(self.pid)


def _remove_shared_memory(pid: int) -> None:
    # The Python backend names its shared-memory regions after the PyTriton PID; a killed server
    # cannot remove its own.
    shm = Path("/dev/shm")
    if shm.is_dir():
        for region in shm.glob(f"pytrtion{pid}-*"):
            with contextlib.suppress(OSError):
                region.unlink()


def _psm_segments() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.glob("psm_*")) if shm.is_dir() else set()


def _mapped_by_any_process(paths: set[Path]) -> set[Path]:
    """The subset of ``paths`` that some process still has open or mapped."""
    wanted = {str(p) for p in paths}
    in_use: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if path in wanted:
                    in_use.add(path)
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target in wanted:
                        in_use.add(target)
    return {Path(p) for p in in_use}


def _remove_leaked_tensor_stores(before: set[Path]) -> None:
    # PyTriton's tensor store (multiprocessing shared memory, "psm_*") is not always unlinked when its
    # server stops, and never when it is SIGKILLed. Remove the segments that appeared while our
    # servers ran and that no process uses any more.
    created = _psm_segments() - before
    for segment in created - _mapped_by_any_process(created):
        with contextlib.suppress(OSError):
            segment.unlink()


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _libdir(python: Path) -> str:
    # The Python backend stub links libpython: it must find the library of the interpreter that runs PyTriton.
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return out.stdout.strip()


def _start(role: str, args: list[str], ports: list[int], workdir: Path, libdir: str) -> TritonServer:
    http_port, grpc_port, metrics_port = ports
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env.pop("PYTHONPATH", None)  # the gateway's packages must not leak into the numpy<2 interpreter
    log_path = workdir / f"{role}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(VENV_PYTHON), str(SERVER_SCRIPT),
                "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                "--workspace", str(workdir / f"workspace-{role}"),
                *args,
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
            start_new_session=True,  # own process group: kill() takes tritonserver and the stub with it
        )
    return TritonServer(role, process, http_port, grpc_port, metrics_port, log_path)


def _is_ready(server: TritonServer) -> bool:
    for path in ("/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=1.0) as response:
                if response.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
    return True


def _wait_ready(servers: list[TritonServer], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.process.poll() is not None:
                pytest.fail(
                    f"PyTriton server {server.role!r} exited with {server.process.returncode} before it was "
                    f"ready. Its log:\n{server.log_tail()}",
                    pytrace=False,
                )
            if _is_ready(server):
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            logs = "\n\n".join(f"--- {s.role} log ---\n{s.log_tail()}" for s in pending)
            pytest.fail(f"PyTriton servers {[s.role for s in pending]} not ready after {timeout_s:.0f} s.\n{logs}",
                        pytrace=False)
        if pending:
            time.sleep(0.1)


@pytest.fixture(scope="session")
def triton_fleet(tmp_path_factory) -> Iterator[dict[str, TritonServer]]:
    """Every server in SERVERS, started in parallel and ready; stopped by PID at the end of the session."""
    if not VENV_PYTHON.exists():
        pytest.fail(
            f"The PyTriton virtualenv is missing ({VENV_PYTHON}). Create it from the repository root with:\n"
            f"    {CREATE_VENV}",
            pytrace=False,
        )
    workdir = tmp_path_factory.mktemp("triton")
    libdir = _libdir(VENV_PYTHON)
    segments_before = _psm_segments()
    all_ports = _free_ports(3 * len(SERVERS))
    servers: dict[str, TritonServer] = {}
    try:
        for i, (role, args) in enumerate(SERVERS.items()):
            servers[role] = _start(role, args, all_ports[3 * i : 3 * i + 3], workdir, libdir)
        _wait_ready(list(servers.values()), READY_TIMEOUT_S)
        yield servers
    finally:
        for server in servers.values():  # all at once: each takes a few seconds to shut down
            server.terminate()
        for server in servers.values():
            server.stop()
        _remove_leaked_tensor_stores(segments_before)


@pytest.fixture(scope="session")
def primary(triton_fleet) -> TritonServer:
    return triton_fleet["primary"]


@pytest.fixture(scope="session")
def victim(triton_fleet) -> TritonServer:
    return triton_fleet["victim"]


@pytest.fixture
async def slow_server(triton_fleet) -> TritonServer:
    """The slow server, once requests abandoned by earlier tests (timed out client-side) have drained."""
    server = triton_fleet["slow"]
    probe = TritonInferencer(server.settings("grpc", client_timeout_secs=10.0, name="drain-probe"))
    await probe.start()
    try:
        deadline = asyncio.get_running_loop().time() + 30.0
        while True:
            try:
                # Served in queue order: once this answers, nothing older is left in the queue.
                await probe.infer(np.zeros((1, 8), dtype=np.float32))
                return server
            except ThrottledError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await probe.close()


@pytest.fixture(scope="session")
def failing_server(triton_fleet) -> TritonServer:
    return triton_fleet["failing"]


@dataclass
class LateServer:
    """A server that is up and live, but loads its model only once ``load()`` is called."""

    server: TritonServer
    trigger: Path

    def load(self) -> None:
        self.trigger.touch()

    def model_ready(self) -> bool:
        return _is_ready(self.server)


def _is_live(server: TritonServer) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def late_server(tmp_path_factory) -> Iterator[LateServer]:
    """A PyTriton server whose model is still loading (until the test says so); stopped by its PID."""
    if not VENV_PYTHON.exists():
        pytest.fail(f"The PyTriton virtualenv is missing ({VENV_PYTHON}). Create it with:\n    {CREATE_VENV}", pytrace=False)
    workdir = tmp_path_factory.mktemp("triton-late")
    trigger = workdir / "load-now"
    segments_before = _psm_segments()
    server = _start("late", ["--mode", "normal", "--load-when-exists", str(trigger)], _free_ports(3), workdir,
                    _libdir(VENV_PYTHON))
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _is_live(server):
            if server.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PyTriton server 'late' never came up. Its log:\n{server.log_tail()}", pytrace=False)
            time.sleep(0.1)
        yield LateServer(server, trigger)
    finally:
        server.stop()
        _remove_leaked_tensor_stores(segments_before)
