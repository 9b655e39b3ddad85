"""Several worker processes on one port: each its own WAL and object names; a dead one restarts."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time

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
