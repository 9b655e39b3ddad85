"""Fixtures for the gateway core: a real gateway on a loopback port, devices, and lake readers."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest
import zstandard

from gateway.auth.registry import add_device, set_enabled
from gateway.server import RunningGateway, start_gateway
from gateway.settings import load_settings
from gateway.simulator import SimulatedDevice


def write_config(root: Path, **sections: dict) -> Path:
    """A test configuration under ``root``; keyword arguments override whole keys per section."""
    base = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "ops": {"host": "127.0.0.1", "port": 0},  # /metrics on any free port: tests run side by side
        "gateway": {"gateway_id": "gw-test", "availability_zone": "test-1a"},
        "auth": {"mode": "hmac", "registry_path": str(root / "devices.json")},
        "wal": {"dir": str(root / "wal"), "segment_bytes": 4 * 1024 * 1024, "max_total_bytes": 256 * 1024 * 1024},
        "lake": {"kind": "local", "dir": str(root / "lake"), "target_object_bytes": 256 * 1024, "max_object_age_secs": 0.5},
        "drain": {"deadline_secs": 10.0},
        # Every test device shares 127.0.0.1: refusals answered late would slow unrelated tests (tests/gateway/edge/test_tarpit.py).
        "connections": {"refusal_delay_secs": 0.0},
        # Core tests push one device hard; per-device limits have their own tests (tests/gateway/edge).
        "rate_limits": {"records_per_sec": 1e9, "burst_records": 10**9, "bytes_per_sec": 1e12, "burst_bytes": 10**12},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    lines = []
    for section, values in base.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path = root / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return msgspec.json.encode(str(value)).decode()


@dataclass
class Env:
    root: Path
    config: Path
    devices: dict[str, SimulatedDevice]

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    def device(self, device_id: str = "dev-1") -> SimulatedDevice:
        return self.devices[device_id]

    def disable(self, device_id: str) -> None:
        set_enabled(self.root / "devices.json", device_id, False)


def make_env(root: Path, n_devices: int = 3, **sections: dict) -> Env:
    devices = {}
    for i in range(1, n_devices + 1):
        device_id = f"dev-{i}"
        key = add_device(root / "devices.json", device_id, {"site": "plant-7", "model": "th-200"})
        devices[device_id] = SimulatedDevice(device_id, key)
    return Env(root, write_config(root, **sections), devices)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


@pytest.fixture
async def gateway(env: Env) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(load_settings(env.config, environ={}))
    yield running
    await running.stop()


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., object]]:
    """``await start(env)``: a gateway in this process, stopped at the end of the test."""
    running: list[RunningGateway] = []

    async def factory(env: Env, environ: dict[str, str] | None = None) -> RunningGateway:
        gw = await start_gateway(load_settings(env.config, environ=environ or {}))
        running.append(gw)
        return gw

    yield factory
    for gw in running:
        await gw.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def read_zone(lake: Path, zone: str) -> list[dict]:
    """Every line landed in a zone, decoded."""
    out = []
    for path in sorted((lake / zone).rglob("*.ndjson.zst")):
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes()), read_across_frames=True).read()
        out.extend(msgspec.json.decode(line) for line in data.split(b"\n") if line)
    return out


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this run: the kernel may offer a port it just
    released again, and two listeners of one gateway given the same port refuse to start."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class GatewayProcess:
    """``edge-gateway serve`` in a child process, for crash, drain and memory tests."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config, self.port, self.log_path = config, port, log_path
        self.ops_port = free_port()  # /metrics: known in advance, shared by every worker
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ, EDGE_GATEWAY__LISTEN__PORT=str(self.port), EDGE_GATEWAY__OPS__PORT=str(self.ops_port))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)], stdout=self._log, stderr=self._log, env=env
        )
        wait_until_ready(self.url, self.proc, timeout, self.log_path)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_log") and not self._log.closed:
            self._log.close()


def wait_until_ready(url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"gateway not ready after {timeout} s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture
def gateway_process(tmp_path: Path) -> Callable[..., GatewayProcess]:
    started: list[GatewayProcess] = []

    def factory(env: Env) -> GatewayProcess:
        gp = GatewayProcess(env.config, free_port(), tmp_path / "gateway.log")
        started.append(gp)
        return gp

    yield factory
    for gp in started:
        gp.kill()


def signed(device: SimulatedDevice, body: bytes, content_type: str = "application/x-ndjson", encoding: str | None = None, **extra: str) -> dict[str, str]:
    from gateway.auth.signing import sign_request

    headers = {"Content-Type": content_type, **sign_request(device.device_id, device.key, body)}
    if encoding:
        headers["Content-Encoding"] = encoding
    headers.update(extra)
    return headers


URL = "/v1/telemetry"


def ndjson(*records: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def record(device_id: str = "dev-1", seq: int | None = None, ts=None, **metrics: float) -> dict:
    rec = {"device_id": device_id, "ts": ts if ts is not None else int(time.time() * 1000), "metrics": metrics or {"temperature_c": 21.5}}
    if seq is not None:
        rec["seq"] = seq
    return rec


async def wait_for_records(lake: Path, zone: str, count: int, timeout: float = 10.0) -> list[dict]:
    import asyncio

    deadline = time.monotonic() + timeout
    lines = read_zone(lake, zone)
    while len(lines) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        lines = read_zone(lake, zone)
    return lines
