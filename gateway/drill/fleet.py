"""The drill's fleet on one machine: one ``serve`` process group per zone, HAProxy in front.

Each instance stands for a zone: its own ``gateway_id``, ``availability_zone``, WAL directory and
port, all kept across restarts (a restarted instance replays its own WAL, as an instance whose
volume survived would). It runs in its own session, so SIGKILL of the group takes the supervisor and
every worker at once, the way losing the machine does. HAProxy checks ``/readyz`` like the ALB's
target group, and tags every answer with the instance that gave it (``X-Drill-Served-By``), which is
how the devices' logs know where each request went.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from gateway.drill.settings import BalancerSettings, FleetSettings

SERVED_BY = "X-Drill-Served-By"
BACKEND = "gateways"


class FleetError(Exception):
    """The fleet could not be started or did not behave as the drill needs."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Instance:
    """One gateway instance: ``python -m gateway serve --config <zone>/gateway.toml``."""

    zone: str
    gateway_id: str
    availability_zone: str
    port: int
    root: Path
    ops_port: int = field(default_factory=lambda: free_port())  # /metrics (the ops listener)
    proc: subprocess.Popen | None = None
    starts: int = 0
    log_paths: list[Path] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @property
    def wal_dir(self) -> Path:
        return self.root / "wal"

    @property
    def config_path(self) -> Path:
        return self.root / "gateway.toml"

    def write_config(self, fleet: FleetSettings, registry: Path, lake: Path, s3: tuple[str, str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        sections = {
            "listen": {"host": "127.0.0.1", "port": self.port, "workers": fleet.workers},
            "ops": {"host": "127.0.0.1", "port": self.ops_port},
            "gateway": {"gateway_id": self.gateway_id, "availability_zone": self.availability_zone},
            "auth": {"mode": "hmac", "registry_path": str(registry.resolve())},
            # Small segments: the backlog metric counts whole segments, so it follows landing closely.
            "wal": {"dir": str(self.wal_dir.resolve()), "segment_bytes": 1024 * 1024,
                    "max_total_bytes": fleet.wal_max_total_bytes},
            "lake": {"kind": "s3" if s3 else "local", "dir": str(lake.resolve()), "target_object_bytes": 1024 * 1024,
                     "max_object_age_secs": fleet.max_object_age_secs},
            "inference": {"enabled": fleet.inference},
            "connections": {"max_age_secs": fleet.max_age_secs},
            "drain": {"deadline_secs": fleet.drain_deadline_secs},
            "log": {"level": "INFO"},
        }
        if s3:
            endpoint, bucket = s3
            sections["s3"] = {"bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path"}
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
            lines.append("")
        self.config_path.write_text("\n".join(lines))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        if self.running():
            raise FleetError(f"zone {self.zone} is already running (pid {self.proc.pid})")
        self.starts += 1
        log_path = self.root / f"serve-{self.starts}.log"
        self.log_paths.append(log_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_GATEWAY__")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # its own process group: one SIGKILL takes every worker
            )

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float) -> float:
        """Seconds until ``/readyz`` answered 200; raises FleetError when it exits or the time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.running():
                raise FleetError(f"zone {self.zone} exited with {self.proc.returncode if self.proc else None} "
                                 f"before it was ready:\n{self.log_tail()}")
            if await http_status(http, self.url + "/readyz") == 200:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise FleetError(f"zone {self.zone} not ready within {timeout} s:\n{self.log_tail()}")

    def terminate(self) -> None:
        """SIGTERM to the main process, as systemd or the Auto Scaling drain hook sends it."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole process group, at once: the zone is gone."""
        if not self.running():
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if len(self.exit_codes) < self.starts:
            self.exit_codes.append(code)
        return code

    def log_text(self, start: int | None = None) -> str:
        paths = self.log_paths if start is None else self.log_paths[start - 1:start]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def log_tail(self, chars: int = 2000) -> str:
        text = self.log_text(self.starts) if self.starts else ""
        return text[-chars:] or "(empty log)"

    def drain_report(self, start: int | None = None) -> bool | None:
        """What the ``drained`` log lines of a start say: True when every WAL landed, None without one."""
        verdicts = []
        for line in self.log_text(start or self.starts).splitlines():
            if '"drained"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "drained":
                verdicts.append(bool(entry.get("landed_everything")))
        return all(verdicts) if verdicts else None


class Balancer:
    """HAProxy: round robin over the instances, active ``/readyz`` checks, a stats page for the monitor."""

    def __init__(self, settings: BalancerSettings, root: Path, instances: list[Instance]) -> None:
        self.settings = settings
        self.root = root
        self.instances = instances
        self.port = free_port()
        self.stats_port = free_port()
        self.config_path = root / "haproxy.cfg"
        self.log_path = root / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}/stats;csv"

    def binary(self) -> str:
        found = self.settings.binary or shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else "")
        if not found:
            raise FleetError("haproxy is not installed: `make system-deps` (apt-get install -y haproxy)")
        return found

    def config(self) -> str:
        s = self.settings
        servers = "\n".join(f"    server {i.zone} 127.0.0.1:{i.port} check" for i in self.instances)
        # Each request gets its own connection to an instance (http-server-close): a draining
        # instance's closed listener is then a refused connection, which HAProxy sends to another
        # instance ("retries", "redispatch"), never a request half-sent into a closing socket.
        # Nothing is retried once a request reached an instance: that is the device's decision.
        # The log (haproxy.log) keeps check state changes and every abnormal request, with its
        # termination state; normal requests are not logged.
        return f"""global
    log stderr format raw local0 info
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    option dontlognull
    option dontlog-normal
    option http-server-close
    {f"retries {s.retries}" if s.redispatch else "retries 0"}
    {"option redispatch 1" if s.redispatch else "no option redispatch"}
    timeout connect {s.connect_timeout_ms}ms
    timeout client 60s
    timeout server {int(s.server_timeout_secs * 1000)}ms
    timeout check 1s

frontend devices
    bind 127.0.0.1:{self.port}
    default_backend {BACKEND}
    http-after-response set-header {SERVED_BY} %s

backend {BACKEND}
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {s.check_interval_ms}ms fastinter {max(100, s.check_interval_ms // 2)}ms fall {s.fall} rise {s.rise}
{servers}

frontend stats
    bind 127.0.0.1:{self.stats_port}
    stats enable
    stats uri /stats
"""

    def start(self) -> None:
        binary = self.binary()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        check = subprocess.run([binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise FleetError(f"haproxy rejected its configuration:\n{check.stdout}{check.stderr}")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def server_stats(self, http: aiohttp.ClientSession) -> dict[str, dict[str, str]]:
        """Each instance's row of HAProxy's stats: ``status`` (``UP``, ``DOWN``, ``UP 1/2`` going down, ...),
        ``wretr`` (connections retried) and ``wredis`` (requests sent to another instance instead)."""
        try:
            async with http.get(self.stats_url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row for row in rows
                if row.get("pxname") == BACKEND and row.get("svname") not in ("FRONTEND", "BACKEND")}

    async def server_states(self, http: aiohttp.ClientSession) -> dict[str, str]:
        return {name: row.get("status", "") for name, row in (await self.server_stats(http)).items()}

    async def wait_serving(self, http: aiohttp.ClientSession, zones: list[str], timeout: float) -> float:
        started = time.monotonic()
        states: dict[str, str] = {}
        while time.monotonic() - started < timeout:
            if self.proc is None or self.proc.poll() is not None:
                raise FleetError(f"haproxy exited:\n{self.log_path.read_text(errors='replace')[-2000:]}")
            states = await self.server_states(http)
            if all(serving(states.get(z, "")) for z in zones):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise FleetError(f"haproxy does not send to {zones} within {timeout} s: {states}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def serving(state: str) -> bool:
    """HAProxy sends new requests to an instance in these states (``UP 1/2``: one failed check so far)."""
    return state.startswith("UP")


async def http_status(http: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> int | str:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return resp.status
    except TimeoutError:
        return "timeout"
    except (aiohttp.ClientError, ConnectionError):
        return "connection"


class Fleet:
    """Every process the drill starts; ``close`` stops each of them, whatever happened."""

    def __init__(self, fleet: FleetSettings, balancer: BalancerSettings, root: Path, registry: Path, lake: Path,
                 s3: tuple[str, str] | None = None) -> None:
        self.settings = fleet
        self.root = root
        self.registry = registry
        self.lake = lake
        self.s3 = s3  # (endpoint, bucket) when the instances land through the S3 API
        self.instances = {
            zone: Instance(zone, f"{fleet.gateway_id_prefix}-{zone}", f"{fleet.region}{zone}", free_port(), root / zone)
            for zone in fleet.zones
        }
        self.balancer = Balancer(balancer, root, list(self.instances.values()))

    def __getitem__(self, zone: str) -> Instance:
        return self.instances[zone]

    @property
    def zones(self) -> list[str]:
        return list(self.instances)

    async def start(self, http: aiohttp.ClientSession) -> None:
        for instance in self.instances.values():
            instance.write_config(self.settings, self.registry, self.lake, self.s3)
            instance.launch()
        await asyncio.gather(*(i.wait_ready(http, self.settings.start_timeout_secs) for i in self.instances.values()))
        self.balancer.start()
        await self.balancer.wait_serving(http, self.zones, self.settings.start_timeout_secs)

    async def terminate(self, zone: str, timeout: float) -> int | None:
        instance = self.instances[zone]
        instance.terminate()
        return await asyncio.to_thread(instance.wait_exit, timeout)

    async def kill(self, zone: str) -> None:
        instance = self.instances[zone]
        instance.kill()
        await asyncio.to_thread(instance.wait_exit, 10)

    def close(self) -> None:
        for instance in self.instances.values():
            instance.kill()
            instance.wait_exit(10)
        self.balancer.stop()
