"""Several worker processes on one port: each its own WAL and object names; a dead one restarts."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.gateway.conftest import make_env, read_zone
from tests.gateway.test_crash_and_drain import load

pytestmark = pytest.mark.slow


async def test_workers_share_the_port_restart_when_killed_and_drain_together(tmp_path, gateway_process):
    env = make_env(tmp_path, n_devices=8, listen={"workers": 2}, lake={"max_object_age_secs": 0.3})
    gp = gateway_process(env)
    gp.start()
    supervisor = psutil.Process(gp.proc.pid)
    deadline = time.monotonic() + 20
    while len(supervisor.children()) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    workers = [c for c in supervisor.children() if "--worker-index" in c.cmdline()]
    assert len(workers) == 2 and len(supervisor.children()) == 3  # and the lake process, landing both WALs
    lake = next(c for c in supervisor.children() if "--lake-process" in c.cmdline())
    expected_nice = min(19, workers[0].nice() + 10)  # lake.process_nice: acks get contended cores first
    while lake.nice() != expected_nice and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the lake process lowers its own priority once it has started
    assert lake.nice() == expected_nice
    acked: set = set()
    statuses: collections.Counter = collections.Counter()
    writers = asyncio.create_task(load(gp.url, list(env.devices.values()), 3.0, acked, statuses))
    await asyncio.sleep(1.0)
    os.kill(workers[0].pid, signal.SIGKILL)
    while time.monotonic() < deadline + 10:
        children = {c.pid for c in supervisor.children()}
        if len(children) == 3 and workers[0].pid not in children:
            break
        await asyncio.sleep(0.05)
    assert len(children) == 3 and workers[0].pid not in children, "the dead worker was not replaced"
    await writers
    assert statuses[202] > 10, statuses
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0
    lines = read_zone(env.lake, "raw")
    counts = collections.Counter((line["device_id"], line["seq"]) for line in lines)
    assert acked <= set(counts) and max(counts.values()) == 1
    # Object names carry the worker, so two workers never write the same key.
    assert {line["gateway_id"] for line in lines} <= {"gw-test-w0", "gw-test-w1"}
    names = [p.name for p in (env.lake / "raw").rglob("*.ndjson.zst")]
    assert all(n.startswith(("gw-test-w0-", "gw-test-w1-")) for n in names) and len(set(names)) == len(names)
    assert sorted(p.name for p in (env.root / "wal").iterdir() if p.name.startswith("w")) == ["w0", "w1"]


def connections_per_worker(ops_url: str) -> dict[str, float]:
    with urllib.request.urlopen(ops_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(r'^edge_gateway_connections_open\{worker="(\d+)"\} (\S+)$', text, re.MULTILINE)
    return {worker: float(value) for worker, value in found}


def every_worker_up(ops_url: str, workers: int) -> bool:
    try:
        with urllib.request.urlopen(ops_url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return False
    return len(re.findall(r'^edge_gateway_worker_up\{worker="\d+"\} 1\.0$', text, re.MULTILINE)) == workers


async def two_workers_up(tmp_path, gateway_process):
    """A two-worker gateway once both workers answer; with the device port's address."""
    gp = gateway_process(make_env(tmp_path, n_devices=2, listen={"workers": 2}))
    gp.start()
    deadline = time.monotonic() + 20
    while not every_worker_up(gp.ops_url, 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    host, port = gp.url.rsplit("/", 1)[-1].rsplit(":", 1)
    return gp, (host, int(port))


async def _split_of_connections_opened_together(gp, address, n: int) -> dict[str, float]:
    """Open ``n`` connections at once; how many each worker took. They are closed again after."""
    deadline = time.monotonic() + 20
    clients = [socket.create_connection(address, timeout=5) for _ in range(n)]
    try:
        per_worker: dict[str, float] = {}
        while sum(per_worker.values()) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            per_worker = connections_per_worker(gp.ops_url)
        assert sum(per_worker.values()) == n, per_worker
    finally:
        for client in clients:
            client.close()
    while sum(connections_per_worker(gp.ops_url).values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # every worker saw its connections close
    return per_worker


async def test_connections_opened_together_are_shared_by_the_workers(tmp_path, gateway_process):
    # A load balancer opens its connections at once and keeps them: whichever worker was woken first
    # took all of them (one worker busy beside an idle one) until the workers took shares.
    gp, address = await two_workers_up(tmp_path, gateway_process)
    splits = []
    for _ in range(3):  # a worker busy at that instant leaves its share to the other: judge the median
        splits.append(await _split_of_connections_opened_together(gp, address, 32))
    smaller_shares = sorted(min(split.values()) for split in splits)
    assert smaller_shares[1] >= 12, splits  # an even split is 16; before, 0-15 (median 3)
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0


async def test_a_stalled_worker_leaves_its_share_of_new_connections_to_the_others(tmp_path, gateway_process):
    gp, address = await two_workers_up(tmp_path, gateway_process)
    workers = [c for c in psutil.Process(gp.proc.pid).children() if "--worker-index" in c.cmdline()]
    stalled = workers[0]
    stalled.suspend()  # SIGSTOP: it holds its slot (no connections) but takes none of them
    clients: list[socket.socket] = []
    try:
        for _ in range(16):  # all past the other worker's fair share: each is left to the stalled one first
            client = socket.create_connection(address, timeout=5)
            clients.append(client)
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            assert client.recv(64).startswith(b"HTTP/1.1 200"), "a connection waited for the stalled worker"
    finally:
        stalled.resume()
        for client in clients:
            client.close()
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0


async def test_a_worker_that_restarted_gets_its_share_of_the_long_lived_connections_back(tmp_path, gateway_process):
    # Eight kept-alive clients (a load balancer's pool) connected while worker 0 took none (stopped,
    # as one restarting is): worker 1 holds all eight. Once worker 0 takes connections again,
    # worker 1 closes one after an answer now and then, and its clients reconnect to worker 0;
    # before, all eight stayed on worker 1 until their maximum age (300 s).
    import aiohttp

    gp, address = await two_workers_up(tmp_path, gateway_process)
    workers = sorted((c for c in psutil.Process(gp.proc.pid).children() if "--worker-index" in c.cmdline()),
                     key=lambda c: c.cmdline()[c.cmdline().index("--worker-index") + 1])
    stop = asyncio.Event()
    answers: collections.Counter = collections.Counter()

    async def client() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            while not stop.is_set():
                async with http.get(gp.url + "/healthz") as resp:
                    answers[resp.status] += 1
                    await resp.read()
                await asyncio.sleep(0.02)

    workers[0].suspend()
    try:
        clients = [asyncio.create_task(client()) for _ in range(8)]
        deadline = time.monotonic() + 20
        while answers[200] < 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Asked of worker 1 alone (worker 0 cannot answer its sibling): while worker 0 takes nothing,
        # the connections worker 1 closes come back to it, paced, each answered.
        pinned = await asyncio.to_thread(connections_per_worker, gp.ops_url)
    finally:
        workers[0].resume()
    await asyncio.sleep(3.0)
    shared = await asyncio.to_thread(connections_per_worker, gp.ops_url)
    stop.set()
    await asyncio.gather(*clients)
    assert pinned.get("1") == 8 and not pinned.get("0"), pinned  # the scene: every connection on the worker taking them
    assert shared.get("0", 0) >= 3 and sum(shared.values()) == 8, shared  # 4 each is fair; one of slack
    assert set(answers) == {200}, answers
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0


async def test_the_runtime_directory_a_killed_supervisor_left_is_removed_by_the_next_start(tmp_path, gateway_process):
    """The supervisor's runtime directory (its workers' sockets and heartbeats, under the system's
    temporary directory) outlived a SIGKILL of the supervisor: a gateway in a crash loop left one per
    life. The next start removes it; a clean stop removes its own and the note naming it."""
    env = make_env(tmp_path, n_devices=1, listen={"workers": 2})
    note = env.root / "wal" / "runtime.dir"
    gp = gateway_process(env)
    gp.start()
    deadline = time.monotonic() + 20
    while not every_worker_up(gp.ops_url, 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    first = Path(note.read_text())
    assert first.is_dir() and {p.name for p in first.iterdir()} >= {"w0.sock", "w1.sock"}
    gp.kill()  # the supervisor alone, as the OOM killer would
    assert first.is_dir()
    gp.start()
    second = Path(note.read_text())
    assert second != first and second.is_dir()
    assert not first.exists(), "the killed supervisor's runtime directory is still there"
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0
    assert not second.exists() and not note.exists()


def test_a_note_naming_anything_but_a_runtime_directory_removes_nothing(tmp_path):
    """An edited or damaged note must not make a start remove a directory the gateway did not make."""
    from gateway.runtime_dir import NOTE, make_runtime_dir, remove_runtime_dir

    wal = tmp_path / "wal"
    wal.mkdir()
    kept = [tmp_path / "data", Path(tempfile.mkdtemp(prefix="something-else-"))]
    for path in kept:
        path.mkdir(exist_ok=True)
        (path / "file").write_text("keep me")
        (wal / NOTE).write_text(str(path))
        runtime = make_runtime_dir(wal)
        assert (path / "file").read_text() == "keep me"
        remove_runtime_dir(wal, runtime)
    (wal / NOTE).write_bytes(b"\xff\xfe not a path")
    runtime = make_runtime_dir(wal)
    assert runtime.is_dir() and (wal / NOTE).read_text() == str(runtime)
    remove_runtime_dir(wal, runtime)
    shutil.rmtree(kept[1])


def test_the_runtime_directory_goes_where_systemd_says(tmp_path, monkeypatch):
    """``RuntimeDirectory=`` in the unit: /run, which no tmpfiles rule ages out, and gone at stop."""
    from gateway.runtime_dir import make_runtime_dir, remove_runtime_dir

    (tmp_path / "wal").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    runtime = make_runtime_dir(tmp_path / "wal")
    assert runtime.parent == tmp_path / "run" and runtime.name.startswith("edge-gateway-")
    remove_runtime_dir(tmp_path / "wal", runtime)
    assert list((tmp_path / "run").iterdir()) == []


def test_a_note_that_cannot_be_written_stops_no_start(tmp_path, caplog):
    """A full disk under ``wal.dir``: the start goes on, and says what a kill would leave behind."""
    from gateway.runtime_dir import NOTE, make_runtime_dir, remove_runtime_dir

    wal = tmp_path / "wal"
    (wal / NOTE).mkdir(parents=True)  # stands in for a write that fails (a directory cannot be replaced by a file)
    runtime = make_runtime_dir(wal)
    assert runtime.is_dir() and "cannot note the runtime directory" in caplog.text
    remove_runtime_dir(wal, runtime)  # and the stop's clean-up goes on past the note it cannot remove
    assert not runtime.exists()


async def test_processes_restarted_after_the_file_changed_run_with_their_siblings_settings(tmp_path, gateway_process):
    """The configuration file edited under a running instance (for its next restart), then a worker
    and the lake process killed: each process read the file itself when it started, so the
    restarted ones took another WAL, lake and name, and acknowledged records the instance never
    landed in its lake. They start from the supervisor's settings now, with what a SIGHUP applied."""
    env = make_env(tmp_path, n_devices=4, listen={"workers": 2}, lake={"max_object_age_secs": 0.2})
    gp = gateway_process(env)
    gp.start()
    deadline = time.monotonic() + 20
    while not every_worker_up(gp.ops_url, 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # A run-time change, applied by SIGHUP: a restarted worker must refuse what its siblings refuse.
    text = env.config.read_text()
    env.config.write_text(text.replace("[limits]\n", "") + "[limits]\nmax_records_per_request = 10\n")
    gp.signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    # Then changes meant for the next restart; one a process would not even start with.
    next_text = env.config.read_text().replace(str(tmp_path / "wal"), str(tmp_path / "wal-next"))
    next_text = next_text.replace(str(tmp_path / "lake"), str(tmp_path / "lake-next")).replace('"gw-test"', '"gw-next"')
    env.config.write_text(next_text + "[bogus]\n")
    # Days later a tmpfiles rule may have aged the settings file out: each start writes it afresh.
    (Path((env.root / "wal" / "runtime.dir").read_text()) / "settings.json").unlink()
    supervisor = psutil.Process(gp.proc.pid)
    for child in supervisor.children():
        if "--worker-index" in child.cmdline() and child.cmdline()[child.cmdline().index("--worker-index") + 1] == "0" or "--lake-process" in child.cmdline():
            child.kill()
    deadline = time.monotonic() + 20
    await asyncio.sleep(0.5)
    while not every_worker_up(gp.ops_url, 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    acked: set = set()
    statuses: collections.Counter = collections.Counter()
    await load(gp.url, list(env.devices.values()), 2.0, acked, statuses, records_per_request=10)
    too_many: collections.Counter = collections.Counter()
    await load(gp.url, list(env.devices.values()), 0.5, set(), too_many, records_per_request=11)
    gp.signal(signal.SIGTERM)
    assert gp.wait(60) == 0
    assert statuses[202] > 20 and set(too_many) == {413}, (statuses, too_many)
    lines = read_zone(env.lake, "raw")
    counts = collections.Counter((line["device_id"], line["seq"]) for line in lines)
    assert acked == set(counts) and max(counts.values()) == 1
    assert {line["gateway_id"] for line in lines} == {"gw-test-w0", "gw-test-w1"}
    assert not (tmp_path / "wal-next").exists() and not (tmp_path / "lake-next").exists()
