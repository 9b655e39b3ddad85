"""The gateway as a black box: a real ``serve`` process group, its configuration, and its lake.

``ServeProcess`` starts ``python -m gateway serve --config FILE`` in its own session (process group),
so one SIGKILL of the group takes the supervisor and every worker down at once, the way a power loss
or an OOM kill of the cgroup does. The lake readers decode what landed, zone by zone, and
``assert_landed_once`` compares it with the devices' ledger.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import zstandard

from tests.durability.client import Device, Ledger, RecordKey, record_key
from tests.gateway.conftest import free_port, write_config

REPO_ROOT = Path(__file__).resolve().parents[2]
ZONES = ("raw", "curated", "quarantine")


def write_gateway_config(root: Path, port: int, *, inference: bool = False, **sections: dict) -> Path:
    """A serve configuration under ``root`` (``root/wal``, ``root/lake``) listening on 127.0.0.1:``port``."""
    sections = {key: dict(value) for key, value in sections.items()}
    sections.setdefault("listen", {}).update({"host": "127.0.0.1", "port": port})
    sections.setdefault("inference", {}).setdefault("enabled", inference)
    sections.setdefault("log", {}).setdefault("level", "INFO")
    return write_config(root, **sections)


def make_devices(registry: Path, n: int, prefix: str = "dev") -> list[Device]:
    """Register ``n`` devices (the fixture may use the gateway's registry helper; the client does not)."""
    from gateway.auth.registry import add_device

    devices = []
    for i in range(1, n + 1):
        device_id = f"{prefix}-{i}"
        key = add_device(registry, device_id, {"site": "plant-7", "model": "th-200"})
        devices.append(Device(device_id, key))
    return devices


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == pgid:
                out.append(proc.info["pid"])
        except (ProcessLookupError, psutil.Error):
            continue
    return out


class ServeProcess:
    """``python -m gateway serve --config FILE`` as its own process group, restartable on one port."""

    def __init__(self, config: Path, port: int, log_dir: Path, env: dict[str, str] | None = None, name: str = "serve") -> None:
        self.config = config
        self.port = port
        self.log_dir = log_dir
        self.name = name
        self.base_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self._log = None
        # (soft, hard) limits on open files the next start gets, as `ulimit -n` would set them.
        self.open_files: tuple[int, int] | None = None
        # A descriptor (a pipe's end) the next start writes its stdout and stderr to, not its log file.
        self.output: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start the process group without waiting for readiness."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        self._close_log()
        self._log = open(self.log_path, "wb")
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_GATEWAY__")}
        child_env.update(self.base_env)
        child_env.update(env or {})
        child_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
            cwd=REPO_ROOT,
            env=child_env,
            stdout=self._log if self.output is None else self.output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=None if self.open_files is None else functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, self.open_files),
        )
        return self.proc

    def start(self, env: dict[str, str] | None = None, timeout: float = 15.0, workers: int | None = None) -> ServeProcess:
        """Start and wait until ``/readyz`` answers 200 (and, with ``workers``, that many workers run)."""
        self.launch(env)
        self.wait_ready(timeout, workers=workers)
        return self

    def wait_ready(self, timeout: float = 15.0, workers: int | None = None) -> None:
        deadline = time.monotonic() + timeout
        ready_in_a_row = 0
        status: int | str = "not asked"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            status = readyz(self.url)
            ready_in_a_row = ready_in_a_row + 1 if status == 200 else 0
            enough_workers = workers is None or workers <= 1 or len(self.children()) >= workers
            # With several workers on one port, one answer may come from the first worker up: ask a
            # few times on fresh connections.
            if ready_in_a_row >= (3 if workers and workers > 1 else 1) and enough_workers:
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name} (start {self.starts}) not ready after {timeout} s: last /readyz answer {status}, "
            f"{len(self.children())} worker processes; log tail:\n{self.log_tail()}"
        )

    def children(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children() if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM the gateway (its main process, as an init system or the ASG hook does) and wait."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout} s of SIGTERM:\n{self.log_tail()}") from None
        finally:
            self._close_log()

    def kill(self) -> None:
        """SIGKILL the whole process group (supervisor and workers) and wait until every member is gone."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            members = group_members(pgid)
            if not members:
                break
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self._close_log()

    def leftover(self) -> list[int]:
        """Members of the group still alive (e.g. workers orphaned by a supervisor that exited)."""
        return group_members(self.proc.pid) if self.proc is not None else []

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_text()
        return text[-chars:] if text else "(empty log)"

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob(f"{self.name}-*.log")))

    # Async wrappers: starting and stopping block, and devices keep sending meanwhile.
    async def astart(self, env: dict[str, str] | None = None, timeout: float = 15.0, workers: int | None = None) -> ServeProcess:
        return await asyncio.to_thread(self.start, env, timeout, workers)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def aterminate(self, timeout: float = 60.0) -> int:
        return await asyncio.to_thread(self.terminate, timeout)


class Gateways:
    """Every ServeProcess a test starts; the fixture kills each group at teardown, whatever happened."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServeProcess] = []

    def new(self, config: Path, port: int | None = None, env: dict[str, str] | None = None, name: str = "serve") -> ServeProcess:
        sp = ServeProcess(config, port if port is not None else free_port(), self.root / "logs", env, name)
        self.started.append(sp)
        return sp

    def kill_all(self) -> None:
        for sp in self.started:
            sp.kill()


def readyz(url: str, timeout: float = 2.0) -> int | str:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return "connection"


def wal_bytes(wal_dir: Path) -> int:
    """What the WAL's segment files (``*.wal``, at any depth) hold on disk."""
    return sum(p.stat().st_size for p in wal_dir.rglob("*.wal") if p.is_file())


# -- the lake -----------------------------------------------------------------------------------


def _decompress(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()


def zone_lines(lake: Path, zone: str) -> list[dict]:
    """Every record of an NDJSON zone (raw, quarantine), decoded; objects in flight (dot files) are skipped."""
    out = []
    for path in sorted((lake / zone).rglob("*.ndjson.zst")):
        if path.name.startswith("."):
            continue
        for line in _decompress(path).split(b"\n"):
            if line.strip():
                out.append(_as_sent(json.loads(line)))
    return out


def _as_sent(line: dict) -> dict:
    """Name a lake line by the record as sent: raw lines nest it in ``record``, quarantine lines keep its text in ``raw``."""
    sent = line.get("record")
    if sent is None and isinstance(line.get("raw"), str):
        try:
            sent = json.loads(line["raw"])
        except ValueError:
            sent = None
    if not isinstance(sent, dict):
        return line
    tags = sent.get("tags") if isinstance(sent.get("tags"), dict) else {}
    seq = line["seq"] if line.get("seq") is not None else sent.get("seq")
    return {**line, "seq": seq, "tags": tags}


def curated_rows(lake: Path) -> list[dict]:
    """``device_id``, ``seq`` and the ``probe`` tag of every curated row (Parquet, gateway/lake/curated.py schema)."""
    out = []
    for path in sorted((lake / "curated").rglob("*.parquet")):
        if path.name.startswith("."):
            continue
        table = pq.ParquetFile(path).read(columns=["device_id", "seq", "tags"])
        for device_id, seq, tags in zip(*(table.column(c).to_pylist() for c in ("device_id", "seq", "tags"))):
            out.append({"device_id": device_id, "seq": seq, "tags": dict(tags) if tags else {}})
    return out


def raw_line_key(line: bytes) -> RecordKey:
    """The record a raw-zone line (as the lake or the WAL holds it) stands for."""
    return record_key(_as_sent(json.loads(line)))


def zone_records(lake: Path, zone: str) -> list[dict]:
    return curated_rows(lake) if zone == "curated" else zone_lines(lake, zone)


def lake_counts(lake: Path, zones: Iterable[str] = ZONES, key: Callable[[dict], Any] = record_key) -> dict[str, collections.Counter]:
    """Per zone, how many times each record (``(device_id, seq)``, else its probe tag) landed."""
    return {zone: collections.Counter(key(r) for r in zone_records(lake, zone)) for zone in zones}


def landing_problems(
    lake: Path,
    ledger: Ledger,
    zones: Iterable[str] = ("raw",),
    *,
    only: Iterable[RecordKey] | None = None,
) -> list[str]:
    """What contradicts the contract: acked records missing or duplicated, refused ones landed."""
    problems = []
    counts = lake_counts(lake, ZONES)
    scope = set(only) if only is not None else None

    def first(items, n: int = 5) -> list:
        return sorted(items, key=repr)[:n]

    for zone in ZONES:
        seen = counts[zone]
        if scope is not None:
            seen = collections.Counter({k: v for k, v in seen.items() if k in scope})
        twice = {k: v for k, v in seen.items() if v > 1}
        if twice:
            problems.append(
                f"{len(twice)} records landed more than once in {zone} ({sum(twice.values()) - len(twice)} extra copies); "
                f"first: {[(k, twice[k]) for k in first(twice)]}"
            )
        refused = (ledger.refused if scope is None else ledger.refused & scope) & set(seen)
        if refused:
            problems.append(
                f"{len(refused)} records of requests that were only ever refused (no 202) landed in {zone}; first: {first(refused)}"
            )
        strangers = set(seen) - ledger.sent
        if strangers:
            problems.append(f"{len(strangers)} records in {zone} that no device sent; first: {first(strangers)}")
    for zone in zones:
        acked = ledger.acked if scope is None else ledger.acked & scope
        missing = acked - set(counts[zone])
        if missing:
            problems.append(f"{len(missing)} of {len(acked)} acked records missing from {zone}; first: {first(missing)}")
    return problems


def assert_landed_once(
    lake: Path, ledger: Ledger, zones: Iterable[str] = ("raw",), *, only: Iterable[RecordKey] | None = None, context: str = ""
) -> None:
    """Every acked record is in each of ``zones`` exactly once; nothing is anywhere twice or unasked."""
    problems = landing_problems(lake, ledger, zones, only=only)
    if problems:
        raise AssertionError("\n".join([*problems, f"devices: {ledger.summary()}", *([context] if context else [])]))
