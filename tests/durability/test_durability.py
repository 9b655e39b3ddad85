"""Black-box durability: a real ``serve`` process group, independent devices, and the lake as the judge.

Every scenario drives ``python -m gateway serve`` over real sockets with devices that retry the way
firmware does (same body, freshly signed) and keeps a ledger of what was acknowledged. Whatever the
gateway does in between (wrapping a small WAL, crashing, changing its worker count, running out of
disk), at the end every acknowledged ``(device_id, seq)`` must be in the lake exactly once and no
request that was only ever refused may have landed anything.

Run: ``python -m pytest tests/durability -v`` (about two minutes when the gateway behaves). The
disk-full scenarios (the WAL's disk, the lake's) mount a tmpfs and the failing-fsync one a FUSE
filesystem, so they need root (mount/umount); every scenario is ``slow``.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import termios
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from tests.durability.client import Device, DeviceClient, Ledger, ReadinessProbe, ndjson, run_devices
from tests.durability.harness import (
    Gateways,
    ServeProcess,
    group_members,
    lake_counts,
    landing_problems,
    make_devices,
    raw_line_key,
    readyz,
    wal_bytes,
    write_gateway_config,
    zone_records,
)
from tests.fixtures.failing_disk import FailingDisk
from tests.fixtures.power_loss_disk import PowerLossDisk
from tests.fixtures.stepped_clock import SteppedClock
from tests.gateway.conftest import free_port

pytestmark = pytest.mark.slow

KiB = 1024
MiB = 1024 * KiB

# Per-device limits are tested elsewhere (tests/gateway/edge): here they would only add 429s.
NO_RATE_LIMITS = {"records_per_sec": 1e9, "burst_records": 10**9, "bytes_per_sec": 1e12, "burst_bytes": 10**12}


def setup(tmp_path: Path, gateways: Gateways, n_devices: int, *, inference: bool = False, **sections: dict) -> tuple[ServeProcess, list[Device], Path]:
    port = free_port()
    sections.setdefault("rate_limits", NO_RATE_LIMITS)
    sections.setdefault("drain", {"deadline_secs": 15.0})
    config = write_gateway_config(tmp_path, port, inference=inference, **sections)
    devices = make_devices(tmp_path / "devices.json", n_devices)
    return gateways.new(config, port), devices, tmp_path / "lake"


def workers_env(n: int) -> dict[str, str]:
    return {"EDGE_GATEWAY__LISTEN__WORKERS": str(n)}


def first(items, n: int = 5) -> list:
    return list(items)[:n]


def report(problems: list[str], ledger: Ledger, sp: ServeProcess | None = None) -> str:
    lines = [*problems, f"devices: {ledger.summary()}"]
    if ledger.problems:
        lines.append(f"client-side observations: {collections.Counter(ledger.problems).most_common(3)}")
    if sp is not None:
        lines.append(f"gateway log (last start, tail):\n{sp.log_tail(2500)}")
    return "\n".join(lines)


def lost_writes(loss: dict) -> int:
    """Writes a power loss undid: pages reverted, and files cut back to their durable size (their
    unsynced tail gone). On a full disk a few pages are unsynced at a time, and a draw that keeps every
    one of them while it cuts files back is as much a power loss as one that reverts a page."""
    return loss.get("pages lost", 0) + loss.get("sizes lost", 0)


def check(problems: list[str], ledger: Ledger, sp: ServeProcess | None = None, notes: list[str] = ()) -> None:
    """Fail with every problem found, what the devices saw, and the gateway's last words."""
    if problems:
        raise AssertionError(report([*problems, *notes], ledger, sp))


async def stop_gracefully(sp: ServeProcess, problems: list[str], what: str = "SIGTERM") -> None:
    """SIGTERM and wait; a gateway that already died, exits non-zero or leaves processes is a problem."""
    if sp.proc is None:
        return
    if not sp.running():
        problems.append(f"the gateway had already exited by itself (status {sp.proc.returncode}) before {what}")
        sp.kill()
        return
    rc = await sp.aterminate(timeout=60)
    if rc != 0:
        problems.append(f"{what}: the gateway exited with {rc}, not 0")
    # Workers and helpers leave with the gateway: none of its process group may outlive it.
    if not await wait_until(lambda: not sp.leftover(), 5.0, 0.1):
        problems.append(f"{what}: processes of the gateway's group still running 5 s after it exited: {sp.leftover()}")


async def send_numbered(url: str, devices: list[Device], ledger: Ledger, records_per_device: int) -> None:
    """Every device sends its next ``records_per_device`` numbered records, 100 per request, all at once."""

    async def send(device: Device) -> None:
        async with DeviceClient(url, device, ledger, fresh_connections=True) as client:
            records = device.records(records_per_device, with_seq=True)
            for start in range(0, len(records), 100):
                await client.send(records[start:start + 100])

    await asyncio.gather(*(send(device) for device in devices))


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def wait_for_acks(ledger: Ledger, done, budget_secs: float, stall_secs: float) -> None:
    """Wait until ``done()``, the budget is spent, or no request was acknowledged for ``stall_secs``."""
    deadline = time.monotonic() + budget_secs
    last_count, last_progress = ledger.acked_requests, time.monotonic()
    while not done() and time.monotonic() < deadline and time.monotonic() - last_progress < stall_secs:
        await asyncio.sleep(0.1)
        if ledger.acked_requests != last_count:
            last_count, last_progress = ledger.acked_requests, time.monotonic()


# -- 1 ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("curated", [False, True], ids=["raw", "raw+curated"])
async def test_valid_only_soak_wraps_the_wal(tmp_path, gateways, curated):
    """Only valid records, 3x the WAL's capacity: the WAL wraps, every answer is 202, /readyz stays 200."""
    wal_capacity = 2 * MiB
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        inference=curated,
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": wal_capacity},
        lake={"target_object_bytes": 256 * KiB, "max_object_age_secs": 0.2},
    )
    await sp.astart()
    ledger = Ledger()
    stop = asyncio.Event()
    started = time.monotonic()
    async with ReadinessProbe(sp.url) as probe:
        load = asyncio.create_task(
            run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.05 if not curated else 0.1, retry_deadline_secs=5.0)
        )
        await wait_for_acks(ledger, lambda: ledger.acked_bytes >= 3 * wal_capacity or load.done(), budget_secs=40.0, stall_secs=8.0)
        stop.set()
        await load
    problems: list[str] = []
    if ledger.acked_bytes < 3 * wal_capacity:
        problems.append(
            f"only {ledger.acked_bytes / MiB:.2f} MiB acknowledged in {time.monotonic() - started:.0f} s; the soak needs "
            f"{3 * wal_capacity / MiB:.0f} MiB (3x wal.max_total_bytes) to wrap the WAL"
        )
    not_accepted = [a for a in ledger.attempts if a.status != 202]
    if not_accepted:
        t_first = not_accepted[0].started
        acked_before = sum(a.body_bytes for a in ledger.attempts if a.status == 202 and a.started < t_first)
        problems.append(
            f"{len(not_accepted)} of {len(ledger.attempts)} answers were not 202 ({dict(collections.Counter(a.status for a in not_accepted))}); "
            f"the first {t_first - started:.1f} s into the soak, after {acked_before / MiB:.2f} MiB had been acknowledged"
        )
    unready = [(round(t - started, 1), s) for t, s, _ in probe.answers if s != 200]
    if unready or not probe.answers:
        problems.append(f"/readyz was not 200 {len(unready)} of {len(probe.answers)} times; first (s, status): {first(unready)}")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw", "curated") if curated else ("raw",))
    check(problems, ledger, sp)


# -- 2 ------------------------------------------------------------------------------------------


async def lives_under_load(
    tmp_path: Path,
    gateways: Gateways,
    lives: list[tuple[int, dict[str, str]]],
    end_life: Callable[[ServeProcess, int, list[str]], Awaitable[None]],
) -> tuple[ServeProcess, Ledger, list[str]]:
    """Six devices send while ``serve`` is started once per (workers, environment) of ``lives``, 2 s
    each; every life but the last ends by ``end_life(sp, phase, problems)``, the last by SIGTERM.
    Returns the gateway, what the devices saw, and the problems found, the raw zone's included."""
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        6,
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": 8 * MiB},
        lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.3},
    )
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    load: asyncio.Task | None = None
    for phase, (workers, env) in enumerate(lives):
        try:
            await sp.astart(env, workers=workers)
        except RuntimeError as exc:
            problems.append(f"phase {phase}: the restart with workers = {workers} failed: {exc}")
            break
        if load is None:
            load = asyncio.create_task(
                run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.02, retry_deadline_secs=15.0)
            )
        acked_before = ledger.acked_requests
        await asyncio.sleep(2.0)
        if ledger.acked_requests == acked_before:
            problems.append(f"phase {phase} (workers = {workers}) acknowledged nothing in 2 s: {ledger.statuses}")
        if phase < len(lives) - 1:
            await end_life(sp, phase, problems)
    stop.set()
    if load is not None:
        await load
    await stop_gracefully(sp, problems, f"SIGTERM (workers = {workers})")
    problems += landing_problems(lake, ledger, ("raw",))
    return sp, ledger, problems


@pytest.mark.timeout(150)
async def test_worker_count_changes_strand_nothing(tmp_path, gateways):
    """SIGKILL mid-load, then restart with another worker count (and, once, with each worker landing
    its own WAL instead of the lake process): every WAL directory is drained."""
    plan = [2, 1, 3, 2]
    # Phase 2 lands in the workers; the phases around it in the lake process: the zones' state carries over.
    envs = [workers_env(n) | ({"EDGE_GATEWAY__LAKE__LANDING": "worker"} if phase == 2 else {}) for phase, n in enumerate(plan)]

    async def end_life(sp: ServeProcess, phase: int, problems: list[str]) -> None:
        await sp.akill()  # mid-load: requests in flight, objects half built

    sp, ledger, problems = await lives_under_load(tmp_path, gateways, list(zip(plan, envs)), end_life)
    wal_dirs = sorted(str(p.relative_to(tmp_path / "wal")) for p in (tmp_path / "wal").rglob("*") if p.is_dir())
    check(problems, ledger, sp, notes=[f"WAL directories left: {wal_dirs}"])


@pytest.mark.timeout(150)
async def test_a_supervisor_killed_alone_takes_every_process_with_it_and_the_next_start_lands_all(tmp_path, gateways):
    """``kill -9`` of the gateway's PID (the supervisor) and nothing else, mid-load, twice: its workers
    and lake process die with it at once, so the next start (other worker counts, the last a gateway
    alone) finds the instance lock and the port free, and every acknowledged record lands once."""

    async def end_life(sp: ServeProcess, phase: int, problems: list[str]) -> None:
        group = sp.proc.pid
        os.kill(group, signal.SIGKILL)  # the supervisor alone, as `kill -9 PID` does
        deadline = time.monotonic() + 5.0
        while (left := [pid for pid in group_members(group) if pid != group]) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if left:
            problems.append(f"phase {phase}: {len(left)} processes outlived their supervisor by 5 s")
        await sp.akill()  # reaps the supervisor; kills whatever outlived it

    sp, ledger, problems = await lives_under_load(tmp_path, gateways, [(n, workers_env(n)) for n in (2, 3, 1)], end_life)
    check(problems, ledger, sp)


# -- 3 ------------------------------------------------------------------------------------------


async def _resend(client: DeviceClient, records: list[dict], body: bytes, times: int, key: str | None) -> list:
    """The identical body, freshly signed, on a fresh connection each time (so different workers answer)."""
    answers = []
    for _ in range(times):
        answers.append(await client.send(records, body=body, idempotency_key=key, retry=False))
    return answers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("by", ["seq", "idempotency_key"])
async def test_identical_retries_land_once_across_workers_and_restarts(tmp_path, gateways, by):
    """Retries of one request land it once, whichever worker answers, across a crash and restart."""
    sp, (device,), lake = setup(tmp_path, gateways, 1, lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.2})
    env = workers_env(2)
    await sp.astart(env, workers=2)
    ledger = Ledger()
    problems: list[str] = []
    resends = 12
    tag = uuid.uuid4().hex[:8]
    key = f"req-{tag}" if by == "idempotency_key" else None
    # By seq: records carry (device_id, seq). By key: they carry no seq at all, only the key dedups.
    records = device.records(40, with_seq=(by == "seq"), probe_prefix=None if by == "seq" else f"p-{tag}")
    body = ndjson(records)
    async with DeviceClient(sp.url, device, ledger, fresh_connections=True) as client:
        original = await client.send(records, body=body, idempotency_key=key, retry=False)
        if original.status != 202:
            problems.append(f"the first send got {original.status}: {original.body[:300]!r}")
        rounds = {"before the crash": await _resend(client, records, body, resends, key)}
        await sp.akill()
        await sp.astart(env, workers=2)
        rounds["after SIGKILL and restart"] = await _resend(client, records, body, resends, key)
        for when, answers in rounds.items():
            bad = [(a.status, a.body[:200]) for a in answers if a.status != 202]
            if bad:
                problems.append(f"{len(bad)} of {len(answers)} identical retries {when} were not answered 202; first: {bad[:3]}")
            if key is not None and original.status == 202:
                differ = [a.body[:200] for a in answers if a.status == 202 and a.json() != original.json()]
                if differ:
                    problems.append(
                        f"{len(differ)} retries {when} with the same Idempotency-Key got another answer than the first "
                        f"{original.body[:200]!r}; first: {differ[:2]}"
                    )
        if key is not None:
            other = device.records(5, with_seq=False, probe_prefix=f"other-{tag}")
            conflict = await client.send(other, idempotency_key=key, retry=False)
            if conflict.status != 409:
                problems.append(f"the key reused with another body got {conflict.status} (want 409): {conflict.body[:300]!r}")
            else:
                try:
                    error = conflict.json()
                except ValueError:
                    error = None
                if not (isinstance(error, dict) and isinstance(error.get("error"), str) and isinstance(error.get("message"), str)):
                    problems.append(f'the 409 body is not {{"error": ..., "message": ...}}: {conflict.body[:300]!r}')
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


@pytest.mark.timeout(120)
async def test_retries_are_recognised_across_steps_of_the_wall_clock(tmp_path, gateways):
    """NTP (or ``date -s``) steps the wall clock of the gateway and its devices by hours while they
    run: retries of requests acknowledged seconds before are still duplicates, each record lands once."""
    clock = SteppedClock(tmp_path / "clock")
    window = 10  # dedup_window_secs: every retry below comes within it, in real time
    sp, (device, other), lake = setup(
        tmp_path, gateways, 2, limits={"dedup_window_secs": window}, lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.2}
    )
    for d in (device, other):
        d.clock = clock.time
    env = {**workers_env(2), **clock.env()}
    await sp.astart(env, workers=2)
    ledger = Ledger()
    problems: list[str] = []
    tag = uuid.uuid4().hex[:8]
    async with DeviceClient(sp.url, device, ledger, fresh_connections=True) as client, DeviceClient(sp.url, other, ledger, fresh_connections=True) as others:

        async def others_send(when: str) -> None:
            """Requests of another device: each one a chance for the ledger to turn a generation."""
            for answer in (
                await others.send(other.records(10)),
                await others.send(other.records(5, with_seq=False, probe_prefix=f"o-{when}-{tag}"), idempotency_key=f"o-{when}-{tag}"),
            ):
                if answer.status != 202:
                    problems.append(f"another device's request {when} got {answer.status}: {answer.body[:200]!r}")

        await others_send("first")
        numbered = device.records(40)
        keyed = device.records(20, with_seq=False, probe_prefix=f"k-{tag}")
        sent = [(numbered, ndjson(numbered), None), (keyed, ndjson(keyed), f"key-{tag}")]
        started = time.monotonic()
        firsts = [await client.send(records, body=body, idempotency_key=key, retry=False) for records, body, key in sent]
        problems += [f"a first send got {a.status}: {a.body[:200]!r}" for a in firsts if a.status != 202]
        # Forward by an hour, by two more, and back by five: each step beyond the window at once.
        for step in (3600, 7200, -5 * 3600):
            clock.step(step)
            await others_send(f"after a step of {step:+d} s")
            for (records, body, key), first_answer in zip(sent, firsts):
                again = await client.send(records, body=body, idempotency_key=key, retry=False)
                recognised = again.status == 202 and (again.json() == first_answer.json() or again.json().get("duplicates") == len(records))
                if not recognised:
                    problems.append(
                        f"{'a keyed' if key else 'a numbered'} request resent {time.monotonic() - started:.1f} s after it was "
                        f"acknowledged (window {window} s), after a clock step of {step:+d} s, was taken again: "
                        f"{again.status} {again.body[:200]!r} (first answer {first_answer.body[:200]!r})"
                    )
        assert time.monotonic() - started < window, "the resends came later than the window: this scenario proves nothing"
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


@pytest.mark.timeout(120)
async def test_rate_limits_refill_by_real_time_when_the_wall_clock_steps_back(tmp_path, gateways):
    """A device over its rate and a source past its authentication failures when the clock steps an
    hour back: both are let in again once their buckets refill in real time, not an hour later."""
    clock = SteppedClock(tmp_path / "clock")
    limits = {"records_per_sec": 100.0, "burst_records": 200, "auth_failures_per_sec": 5.0, "burst_auth_failures": 5}
    sp, (device, forger), _lake = setup(tmp_path, gateways, 2, rate_limits={**NO_RATE_LIMITS, **limits})
    for d in (device, forger):
        d.clock = clock.time
    forger.key = "not-" + forger.key  # its signatures fail authentication
    await sp.astart({**workers_env(2), **clock.env()}, workers=2)
    ledger = Ledger()
    problems: list[str] = []
    async with DeviceClient(sp.url, device, ledger) as client, DeviceClient(sp.url, forger, ledger) as forging:
        first = await client.send(device.records(300), retry=False)  # let in, and 100 records over
        refused = await client.send(device.records(10), retry=False)
        failures = [(await forging.send(forger.records(1), retry=False)).status for _ in range(8)]
        locked_out = await client.send(device.records(1), retry=False)
        if (first.status, refused.status) != (202, 429) or failures[-1] != 429:
            problems.append(f"the limits did not bite as set up: {first.status}, {refused.status}, auth failures {failures}")
        clock.step(-3600)
        await asyncio.sleep(3.0)  # 1 s of refill for the device, 1.6 s for the source's failures: ample
        again = await client.send(device.records(10), retry=False)
        if again.status != 202:
            problems.append(
                f"3 s after the clock stepped back an hour the device still gets {again.status} "
                f"(before the step: {refused.status}, locked out by its source? {locked_out.status}): {again.body[:200]!r}"
            )
    await stop_gracefully(sp, problems)
    check(problems, ledger, sp)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
async def test_signals_that_keep_coming_while_it_stops_do_not_kill_it_on_its_way_out(tmp_path, gateways, workers):
    """A log rotation's SIGHUP (or a second SIGTERM) reaching a gateway that has drained and is
    exiting found Python's default action restored, and killed it: the stop that was clean looked
    like a crash (exit status -1). Signals keep coming from the SIGTERM until the exit: status 0, and
    every acknowledged record once in raw."""
    sp, devices, lake = setup(tmp_path, gateways, 2)
    await sp.astart(workers_env(workers), workers=workers)
    ledger = Ledger()
    problems: list[str] = []
    stop = asyncio.Event()
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=100, retry_deadline_secs=5.0))
    await wait_for_acks(ledger, lambda: ledger.acked_requests >= 20, budget_secs=15.0, stall_secs=8.0)
    sp.proc.send_signal(signal.SIGTERM)
    sent = 0
    while sp.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            for pid in [sp.proc.pid, *sp.children()]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP if sent % 4 else signal.SIGTERM)
        sent += 1
        await asyncio.sleep(0.002)
    stop.set()
    await load
    if sp.proc.returncode != 0:
        problems.append(f"the gateway exited with {sp.proc.returncode}, not 0, with {sent} rounds of SIGHUP and SIGTERM during its stop")
    # Its lake process too: one killed so after landing everything was taken for one that had not.
    errors = [line for line in sp.log_text().splitlines() if '"level":"ERROR"' in line or '"level":"CRITICAL"' in line]
    if errors:
        problems.append(f"errors logged during the stop: {errors[:3]}")
    await asyncio.to_thread(sp.kill)
    problems += landing_problems(lake, ledger, ("raw",), only=ledger.acked)
    check(problems, ledger, sp)


# -- 4 ------------------------------------------------------------------------------------------


def _fill(path: Path) -> int:
    """Append to ``path`` until the filesystem says ENOSPC; return the bytes added."""
    added = 0
    with open(path, "ab", buffering=0) as f:
        for chunk in (1 * MiB, 64 * KiB, 4 * KiB, 512):
            block = b"\0" * chunk
            while True:
                try:
                    n = f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                added += n
                if n < chunk:
                    break
    return added


class Ballast:
    """Keeps a filesystem full: fills it, and tops it up whenever something frees space."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "ballast"
        self.directory = directory
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.least_free = None

    async def __aenter__(self) -> Ballast:
        await asyncio.to_thread(_fill, self.path)
        self._task = asyncio.create_task(self._top_up())
        return self

    async def _top_up(self) -> None:
        while not self._stop.is_set():
            await asyncio.to_thread(_fill, self.path)
            free = os.statvfs(self.directory).f_bavail * os.statvfs(self.directory).f_frsize
            self.least_free = free if self.least_free is None else min(self.least_free, free)
            try:
                await asyncio.wait_for(self._stop.wait(), 0.05)
            except TimeoutError:
                pass

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self.path.unlink(missing_ok=True)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "ending, workers",
    [("sigkill-restart-sigterm", 1), ("sigterm", 1), ("sigkill-restart-sigterm", 2)],
    ids=["sigkill-restart-sigterm", "sigterm", "sigkill-restart-sigterm-lake-process"],
)
async def test_disk_full_is_survivable(tmp_path, gateways, small_filesystem, ending, workers):
    """A full WAL disk: answers stay prompt (202 or 503 + Retry-After), ingest resumes, nothing acked is lost.
    With two workers the lake process lands both WALs from the same full disk."""
    walfs = small_filesystem(tmp_path / "walfs", 24 * MiB if workers > 1 else 16 * MiB)
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        listen={"workers": workers},
        # The WAL's own bound fits the volume (the gateway checks that); the ballast fills the rest.
        wal={"dir": str(walfs / "wal"), "segment_bytes": 512 * KiB, "max_total_bytes": 8 * MiB},
        lake={"target_object_bytes": 128 * KiB, "max_object_age_secs": 0.3},
    )
    await sp.astart(workers=workers)
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    t0 = time.monotonic()
    async with ReadinessProbe(sp.url) as probe:
        load = asyncio.create_task(
            run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.02, timeout_secs=10.0, retry_deadline_secs=15.0)
        )
        await asyncio.sleep(1.5)
        t_full = time.monotonic()
        async with Ballast(walfs) as ballast:
            await asyncio.sleep(4.0)
        t_freed = time.monotonic()
        resumed = await wait_until(lambda: any(a.status == 202 for a in ledger.attempts_since(t_freed)), 20.0)
        if resumed:
            await asyncio.sleep(1.0)
        stop.set()
        await load
    during = ledger.attempts_since(t_full)
    during = [a for a in during if a.started < t_freed]
    if ballast.least_free is None or ballast.least_free > 64 * KiB:
        problems.append(f"the ballast did not fill the WAL filesystem (least free: {ballast.least_free} bytes)")
    if not resumed:
        problems.append(
            f"ingest did not resume within 20 s of freeing the disk: answers since then "
            f"{dict(collections.Counter(a.status for a in ledger.attempts_since(t_freed)))}"
        )
    wrong = collections.Counter(a.status for a in ledger.attempts if a.status not in (202, 503))
    if wrong:
        problems.append(f"answers other than 202 or 503: {dict(wrong)} (timeouts count: a request must not hang for 10 s)")
    slow = [round(a.latency, 1) for a in ledger.attempts if a.latency > 10.0]
    if slow:
        problems.append(f"{len(slow)} requests took longer than 10 s: {first(slow)}")
    no_retry_after = sum(1 for a in ledger.attempts if a.status == 503 and a.retry_after is None)
    if no_retry_after:
        problems.append(f"{no_retry_after} answers 503 came without Retry-After")
    unanswered = [(round(t - t0, 1), s) for t, s, lat in probe.answers if not isinstance(s, int) or lat > 10.0]
    if unanswered or not probe.answers:
        problems.append(f"/readyz did not answer (in time) {len(unanswered)} of {len(probe.answers)} times; first: {first(unanswered)}")
    if ending == "sigkill-restart-sigterm":
        await sp.akill()
        try:
            await sp.astart(workers=workers)
        except RuntimeError as exc:
            problems.append(f"the gateway did not restart after SIGKILL: {exc}")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    statuses_full = dict(collections.Counter(a.status for a in during))
    check(problems, ledger, sp, notes=[f"answers while the disk was full: {statuses_full}"])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("workers, then", [(1, 1), (2, 2), (2, 3)], ids=["one-worker", "lake-process", "a-worker-added"])
async def test_a_gateway_killed_while_its_disk_is_full_starts_on_it_and_resumes(tmp_path, gateways, small_filesystem, workers, then):
    """Killed while its WAL's disk was full and started again before anything freed it, the gateway
    refused to start ("No space left on device": the retry ledger's boot file was replaced by a new
    file at every start): under a supervisor it would only crash-loop, with acknowledged records
    stuck in the WAL. It starts, answers 503 + Retry-After while the disk stays full, and resumes.
    Started with a worker more, the lake process died at every start (the new WAL's zones could not
    allocate their state) and landed none of the other WALs meanwhile; those land now."""
    walfs = small_filesystem(tmp_path / "walfs", 24 * MiB if workers > 1 else 16 * MiB)
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        listen={"workers": workers},
        wal={"dir": str(walfs / "wal"), "segment_bytes": 512 * KiB, "max_total_bytes": 8 * MiB, "retry_after_secs": 1},
        lake={"target_object_bytes": 128 * KiB, "max_object_age_secs": 0.3},
    )
    await sp.astart(workers=workers)
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    load = asyncio.create_task(
        run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.02, timeout_secs=10.0, retry_deadline_secs=40.0)
    )
    try:
        await asyncio.sleep(1.5)
        async with Ballast(walfs):
            await asyncio.sleep(1.0)
            await sp.akill()
            sp.launch(workers_env(then))
            # Not ready while its WAL cannot take records (503 wal_no_space): up, and saying so.
            answering = await wait_until(lambda: sp.running() and isinstance(readyz(sp.url), int) and (then == 1 or len(sp.children()) >= then), 15.0, 0.1)
            if not answering:
                problems.append(f"the gateway did not start on its full disk (exit status {sp.proc.returncode}):\n{sp.log_tail()}")
            else:
                t_started = time.monotonic()
                await asyncio.sleep(2.0)
                while_full = collections.Counter(a.status for a in ledger.attempts_since(t_started))
                if set(while_full) - {202, 503} or not while_full:
                    problems.append(f"answers on the full disk should be prompt 202s or 503s: {dict(while_full)}")
        t_freed = time.monotonic()
        if not problems and not await wait_until(lambda: any(a.status == 202 for a in ledger.attempts_since(t_freed)), 20.0):
            problems.append("ingest did not resume within 20 s of freeing the disk")
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await load
    await stop_gracefully(sp, problems)
    if "the lake process died" in sp.log_text():
        problems.append("the lake process died on the full disk (and landed nothing until it was started again)")
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


# -- 5 ------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_crash_loop_with_many_hours(tmp_path, gateways):
    """20 SIGKILLs of the group under load, records over several hours, tiny objects: once in raw and curated."""
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        3,
        inference=True,
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": 8 * MiB},
        lake={"target_object_bytes": 4 * KiB, "max_object_age_secs": 0.2},
    )
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    kills = 20
    await sp.astart()
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=30, pause_secs=0.02, hours_spread=5, retry_deadline_secs=20.0))
    try:
        for i in range(kills):
            await asyncio.sleep(rng.uniform(0.2, 0.9))
            await sp.akill()
            try:
                await sp.astart()
            except RuntimeError as exc:
                problems.append(f"restart {i + 1} of {kills} failed: {exc}")
                break
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await load
    await stop_gracefully(sp, problems)
    hours = {p.name for p in (lake / "raw").rglob("hour=*") if p.is_dir()}
    if len(hours) < 3:
        problems.append(f"the records should span several hour partitions; raw has {sorted(hours)}")
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(problems, ledger, sp, notes=[f"kill intervals drawn with random.Random({seed})"])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("bound", [{"max_open_partitions": 8}, {"max_open_bytes": 64 * KiB}], ids=["partitions", "memory"])
async def test_a_backfill_over_more_hours_than_open_objects_lands_in_objects_of_many_records(tmp_path, gateways, bound):
    """Devices uploading records spread over 61 hours, more than the open objects may hold (8 objects
    per zone, or 64 KiB of memory), a SIGKILL: once in raw and curated, and in objects of many
    records (frame by frame, about one object per record)."""
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        inference=True,
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": 4 * MiB, "retry_after_secs": 1},
        lake={"max_object_age_secs": 1.0, **bound},
    )
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    await sp.astart()
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=120, pause_secs=0.01, hours_spread=60, retry_deadline_secs=60.0))
    try:
        await asyncio.sleep(6)
        await sp.akill()
        await sp.astart()
        await asyncio.sleep(4)
    finally:
        stop.set()
        await load
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    for zone in ("raw", "curated"):
        objects = sum(1 for p in (lake / zone).rglob("*") if p.is_file())
        hours = {p.parent for p in (lake / zone).rglob("*") if p.is_file()}
        if len(hours) < 50:
            problems.append(f"the records should span about 61 hours; {zone} has {len(hours)}")
        if not objects or len(ledger.acked) / objects < 5:
            problems.append(f"{len(ledger.acked)} records landed in {objects} {zone} objects: objects rolled early at nearly every frame")
    rolled = [e for e in log_entries(sp.log_text()) if isinstance(e, dict) and "objects are rolled early" in e.get("msg", "")]
    if not rolled or any(e.get(next(iter(bound))) != next(iter(bound.values())) for e in rolled):
        problems.append(f"the bound under test ({bound}) should have rolled objects early, and the warnings say so: {rolled[:2]}")
    check(problems, ledger, sp)


# -- 6 ------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
async def test_second_instance_refuses_to_start(tmp_path, gateways, workers):
    """A second ``serve`` on the same WAL directory and port exits non-zero, naming the holder; the first keeps serving."""
    first_sp, (device,), lake = setup(tmp_path, gateways, 1, listen={"workers": workers}, lake={"max_object_age_secs": 0.2})
    await first_sp.astart(workers=workers)
    holders = {first_sp.pid, *first_sp.children()}
    ledger = Ledger()
    problems: list[str] = []
    async with DeviceClient(first_sp.url, device, ledger, fresh_connections=True) as client:
        before = await client.send(device.records(20), retry=False)
        if before.status != 202:
            problems.append(f"the first instance did not accept a request before the second started: {before.status}")
        second = gateways.new(first_sp.config, first_sp.port, name="second")
        proc = second.launch()
        exited = await wait_until(lambda: proc.poll() is not None, 10.0)
        log = second.log_text()
        if not exited:
            problems.append(
                f"the second instance (pid {proc.pid}) was still running 10 s after it started: it did not refuse; its log:\n{log[-1500:]}"
            )
            await second.akill()
        elif proc.returncode == 0:
            problems.append(f"the second instance exited 0; it must fail; its log:\n{log[-1500:]}")
        if exited and not any(re.search(rf"\b{pid}\b", log) for pid in holders):
            problems.append(f"the second instance's output does not name the lock holder (pids {sorted(holders)}):\n{log[-1500:]}")
        for _ in range(5):  # fresh connections: with several workers, each may answer
            after = await client.send(device.records(20), retry=False)
            if after.status != 202:
                problems.append(f"the first instance answered {after.status} after the second one tried to start: {after.body[:200]!r}")
                break
    status = await asyncio.to_thread(readyz, first_sp.url)
    if status != 200:
        problems.append(f"the first instance's /readyz answered {status} after the second one tried to start")
    if not first_sp.running():
        problems.append("the first instance is no longer running")
    else:
        await stop_gracefully(first_sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, first_sp)


# -- 7 ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_failed_request_lands_nothing(tmp_path, gateways):
    """A request that spills over many spool chunks, sent when the WAL has room for only part of it:
    503, and none of its records ever land."""
    wal_capacity = 16 * MiB
    sp, (device,), lake = setup(
        tmp_path,
        gateways,
        1,
        limits={"spool_memory_bytes": 64 * KiB},
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": wal_capacity},
        # Nothing lands while the gateway runs, so nothing frees WAL space under the big request.
        lake={"target_object_bytes": 256 * MiB, "max_object_age_secs": 3600.0},
    )
    await sp.astart()
    ledger = Ledger()
    problems: list[str] = []
    async with DeviceClient(sp.url, device, ledger, timeout_secs=60.0) as client:
        # Fill half the WAL with acknowledged requests (they land at the drain).
        for _ in range(200):
            if wal_bytes(tmp_path / "wal") >= wal_capacity // 2:
                break
            filler = await client.send(device.records(500), retry=False)
            if filler.status != 202:
                problems.append(f"a small request filling the WAL got {filler.status}: {filler.body[:200]!r}")
                break
        used = wal_bytes(tmp_path / "wal")
        # WAL bytes per body byte, as measured: size the request to need about 80% of the whole WAL,
        # more than the room left (about 50%) but less than the WAL holds (so it is not a 413).
        ratio = used / max(1, ledger.acked_bytes)
        per_record = len(ndjson(device.records(100, with_seq=False))) / 100
        big_records = device.records(int(0.8 * wal_capacity / ratio / per_record))
        big_body = ndjson(big_records)
        need = ratio * len(big_body)
        assert wal_capacity - used < need < wal_capacity, (
            f"the scenario needs a request larger than the WAL's room ({wal_capacity - used} bytes) and smaller than the WAL "
            f"({wal_capacity} bytes); estimated {need:.0f} bytes at {ratio:.2f} WAL bytes per body byte"
        )
        big = await client.send(big_records, body=big_body, retry=False)
        if big.status != 503:
            problems.append(
                f"the {len(big_body) / MiB:.1f} MiB request ({len(big_records)} records, about {need / MiB:.1f} MiB of WAL) sent "
                f"with {(wal_capacity - used) / MiB:.1f} of {wal_capacity / MiB:.0f} MiB of WAL free got {big.status} (want 503): "
                f"{big.body[:300]!r}"
            )
        elif "Retry-After" not in big.headers:
            problems.append("the 503 came without Retry-After")
        # The gateway still serves small requests (retried: the WAL may need a moment).
        await client.send(device.records(50), deadline_secs=5.0)
    await stop_gracefully(sp, problems)
    # Whatever the drain left in the WAL lands on the next start: the refused request must not be in it either.
    try:
        await sp.astart()
    except RuntimeError as exc:
        problems.append(f"the gateway did not start again after the drain: {exc}")
    await stop_gracefully(sp, problems, "SIGTERM after a restart")
    big_keys = {(device.device_id, r["seq"]) for r in big_records}
    problems += landing_problems(lake, ledger, ("raw",))
    landed_big = {zone: sum(c for k, c in counts.items() if k in big_keys) for zone, counts in lake_counts(lake).items()}
    if big.status != 202 and any(landed_big.values()):
        problems.append(f"records of the refused request in the lake, per zone: {landed_big}")
    check(problems, ledger, sp)



# -- 8 ------------------------------------------------------------------------------------------


def children_started_with(sp: ServeProcess, flag: str) -> list[int]:
    """The supervisor's children whose command line holds ``flag`` (``--lake-process``, ``--worker-index``)."""
    found = []
    for pid in sp.children():
        try:
            if flag in psutil.Process(pid).cmdline():
                found.append(pid)
        except psutil.Error:
            continue
    return found


def lake_process_pids(sp: ServeProcess) -> list[int]:
    return children_started_with(sp, "--lake-process")


def worker_pids(sp: ServeProcess) -> list[int]:
    return children_started_with(sp, "--worker-index")


@pytest.mark.timeout(150)
async def test_the_lake_process_killed_while_the_wal_wraps_loses_and_repeats_nothing(tmp_path, gateways):
    """Two workers acknowledge, the lake process lands both WALs (raw and curated); it is SIGKILLed
    three times while the WALs wrap: the supervisor starts it again, acks never stop, and at the
    end every acknowledged record is in each zone once."""
    wal_capacity = 2 * MiB
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        6,
        inference=True,
        listen={"workers": 2},
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": wal_capacity},
        lake={"target_object_bytes": 128 * KiB, "max_object_age_secs": 0.2},
    )
    await sp.astart(workers=2)
    problems: list[str] = []
    if len(lake_process_pids(sp)) != 1:
        problems.append(f"expected one lake process beside the workers, found {lake_process_pids(sp)}")
    ledger = Ledger()
    stop = asyncio.Event()
    load = asyncio.create_task(
        run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.1, retry_deadline_secs=20.0)
    )
    killed: list[int] = []
    for _ in range(3):
        await asyncio.sleep(3.0)
        pids = lake_process_pids(sp)
        for pid in pids:
            os.kill(pid, 9)
            killed.append(pid)
        # Back within the supervisor's backoff, and landing again.
        if not await wait_until(lambda: bool(set(lake_process_pids(sp)) - set(killed)), 10.0, 0.1):
            problems.append(f"no lake process again within 10 s of killing {pids}")
    acked_before = ledger.acked_requests
    wrapped = lambda: ledger.acked_bytes >= 3 * 2 * wal_capacity and ledger.acked_requests > acked_before  # noqa: E731
    await wait_for_acks(ledger, lambda: wrapped() or load.done(), budget_secs=40.0, stall_secs=8.0)
    stop.set()
    await load
    if ledger.acked_requests == acked_before:
        problems.append("nothing was acknowledged after the lake process was killed")
    if ledger.acked_bytes < 3 * 2 * wal_capacity:
        problems.append(f"only {ledger.acked_bytes / MiB:.2f} MiB acknowledged: the two WALs ({2 * wal_capacity / MiB:.0f} MiB) did not wrap three times")
    if len(killed) < 3:
        problems.append(f"the lake process was killed only {len(killed)} times")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(problems, ledger, sp)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["waiting-for-its-restart", "just-started"])
async def test_a_stop_while_the_lake_process_restarts_lands_every_wal(tmp_path, gateways, when):
    """The lake process is SIGKILLed with every acknowledged record still in the WALs, and the gateway
    is told to stop before the new one runs: while the supervisor waits out the restart's backoff, or
    the instant the new process exists (an init system signals every process of the service at once,
    so it gets SIGTERM too). Either way the stop must land everything: a lake process that was not
    running when the drain began was never started again, and one signalled before it had handlers
    died of the signal; both left the WALs to the next start while the gateway exited 0."""
    sp, devices, lake = setup(tmp_path, gateways, 4, listen={"workers": 2}, lake={"target_object_bytes": 64 * MiB, "max_object_age_secs": 600})
    await sp.astart(workers=2)
    ledger = Ledger()
    problems: list[str] = []

    await send_numbered(sp.url, devices, ledger, 1000)
    if zone_records(lake, "raw"):
        problems.append("records landed before the stop: it would have nothing left to land")
    running = set(sp.children())
    for pid in lake_process_pids(sp):
        os.kill(pid, signal.SIGKILL)
    if when == "waiting-for-its-restart":
        await asyncio.sleep(0.05)  # the supervisor starts it again 0.5 s after it died
    else:
        started = await asyncio.to_thread(_first_new_child, sp, running, 5.0)
        if started is None:
            problems.append("no new lake process within 5 s of the SIGKILL")
        else:
            os.kill(started, signal.SIGTERM)
    rc = await sp.aterminate(timeout=60)
    if rc != 0:
        problems.append(f"the gateway exited with {rc}")
    entries = [e for e in log_entries(sp.log_text()) if isinstance(e, dict)]
    drained = [e for e in entries if e.get("msg") == "drained"]
    if sorted(e.get("worker") for e in drained if e.get("landed_by") == "lake process") != [0, 1]:
        problems.append(f"the lake process did not report draining both WALs: {drained}")
    if not drained or not all(e.get("landed_everything") for e in drained):
        problems.append(f"the drain reports: {drained}")
    died_of_sigterm = [e for e in entries if e.get("exit_code") == -signal.SIGTERM]
    if died_of_sigterm:
        problems.append(f"a process died of SIGTERM instead of draining: {died_of_sigterm}")
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


def _first_new_child(sp: ServeProcess, known: set[int], timeout: float) -> int | None:
    """The first child of the gateway's main process not in ``known``, seen within a millisecond or two of its fork."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(sp.children()) - known
        if new:
            return min(new)
        time.sleep(0.001)
    return None


# -- 9 ------------------------------------------------------------------------------------------


@pytest.mark.timeout(200)
@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "lake-process"])
async def test_curated_zone_switched_off_and_on_keeps_what_it_owes(tmp_path, gateways, workers):
    """The curated zone is turned off (``inference.enabled = false``) after a SIGKILL with records it
    had not landed, the WAL wraps three times while it is off, and it is turned on again: every
    record acknowledged while it was on is in it exactly once; nothing is in any zone twice."""
    wal_capacity = 2 * MiB
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        inference=True,
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": wal_capacity},
        lake={"target_object_bytes": 256 * KiB, "max_object_age_secs": 0.2},
    )
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    load: asyncio.Task | None = None
    owed: set = set()  # acknowledged while the curated zone was on
    plan = [(True, "SIGKILL"), (False, "SIGKILL"), (False, "SIGKILL"), (True, "SIGTERM")]
    for phase, (curated, ending) in enumerate(plan):
        env = workers_env(workers) | {"EDGE_GATEWAY__INFERENCE__ENABLED": "true" if curated else "false"}
        await sp.astart(env, workers=workers)
        if load is None:
            load = asyncio.create_task(
                run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.05, retry_deadline_secs=20.0)
            )
        acked_before, bytes_before = set(ledger.acked), ledger.acked_bytes
        # While the zone is off the WAL must wrap: a zone that pinned it would stall every device.
        goal = 3 * wal_capacity if not curated else wal_capacity
        await wait_for_acks(ledger, lambda: ledger.acked_bytes - bytes_before >= goal, budget_secs=40.0, stall_secs=8.0)
        if ledger.acked_bytes - bytes_before < goal:
            problems.append(f"phase {phase} (curated {'on' if curated else 'off'}): only {(ledger.acked_bytes - bytes_before) / MiB:.2f} MiB acknowledged, {goal / MiB:.0f} MiB expected")
        if ending == "SIGKILL":
            await sp.akill()
        else:
            stop.set()
            await load
            await stop_gracefully(sp, problems)
        if curated:
            owed |= set(ledger.acked) - acked_before
    problems += landing_problems(lake, ledger, ("raw",))
    in_curated = lake_counts(lake, ("curated",))["curated"]
    missing = owed - set(in_curated)
    if missing:
        problems.append(f"{len(missing)} of {len(owed)} records acknowledged while the curated zone was on are not in it; first: {first(sorted(missing))}")
    check(problems, ledger, sp)
    assert "zone turned off; landing what it owes first" in sp.all_logs()


# -- 10 -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_new_wal_directory_overwrites_nothing_an_earlier_one_landed(tmp_path, gateways):
    """Object keys are ``<gateway_id>-<first_lsn>-<last_lsn>-<tag>``: a gateway started with a new, empty
    ``wal.dir`` under the same gateway id (what docs/architecture.md advises to run an earlier
    version, or a rebuilt disk) must not number its records from where the first one did."""
    sp, devices, lake = setup(tmp_path, gateways, 2, lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.2})
    ledger = Ledger()
    problems: list[str] = []
    for wal_dir in ("wal", "wal-rebuilt"):
        stop = asyncio.Event()
        await sp.astart({"EDGE_GATEWAY__WAL__DIR": str(tmp_path / wal_dir)})
        load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.05))
        acked_before = ledger.acked_requests
        await wait_for_acks(ledger, lambda: ledger.acked_requests - acked_before >= 40, budget_secs=20.0, stall_secs=8.0)
        stop.set()
        await load
        await stop_gracefully(sp, problems, f"SIGTERM ({wal_dir})")
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


async def test_a_clone_of_a_gateways_disk_run_beside_it_overwrites_nothing_either_landed(tmp_path, gateways):
    """A gateway's disk cloned with its WAL and its configuration, ``gateway_id`` included (an image
    taken from an instance), and the clone run beside the original on the same lake: both number their
    next records from where the copy was taken, so their next objects have the same hour and LSN
    range. Each acknowledged record must be in the lake: neither object may replace the other.
    (Before object keys ended in a tag drawn at sealing, the clone's object replaced the original's.)"""
    sp, devices, lake = setup(tmp_path, gateways, 2, lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.2})
    ledger = Ledger()
    problems: list[str] = []
    await sp.astart(workers_env(1), workers=1)  # one worker: one WAL, copied whole
    async with DeviceClient(sp.url, devices[0], ledger) as client:
        await client.send(devices[0].records(50))
    await stop_gracefully(sp, problems, "SIGTERM before the copy")  # everything landed and recorded
    shutil.copytree(tmp_path / "wal", tmp_path / "wal-clone")
    clone_port = free_port()
    clone_env = {"EDGE_GATEWAY__WAL__DIR": str(tmp_path / "wal-clone"), "EDGE_GATEWAY__LISTEN__PORT": str(clone_port)}
    clone = gateways.new(sp.config, clone_port, env=clone_env, name="clone")
    await sp.astart(workers_env(1), workers=1)
    await clone.astart(workers_env(1), workers=1)
    # As many records to each: their next objects end at the same LSN too.
    for gateway, device in ((sp, devices[0]), (clone, devices[1])):
        async with DeviceClient(gateway.url, device, ledger) as client:
            answer = await client.send(device.records(50))
            if answer.status != 202:
                problems.append(f"{gateway.name} answered {answer.status}: {answer.body[:200]!r}")
    await stop_gracefully(sp, problems, "SIGTERM (the original)")
    await stop_gracefully(clone, problems, "SIGTERM (the clone)")
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


def wal_frames(segment: Path) -> list[tuple[int, int, int]]:
    """(where its payload starts, payload bytes, records) of each frame of a WAL segment, from its headers."""
    from gateway.durable.wal import HEADER_SIZE, MAGIC, META, PREFIX

    data, at, found = segment.read_bytes(), len(MAGIC), []
    while at + HEADER_SIZE <= len(data):
        length = PREFIX.unpack_from(data, at)[0]
        found.append((at + HEADER_SIZE, length, META.unpack_from(data, at + PREFIX.size)[0]))
        at += HEADER_SIZE + length
    return found


@pytest.mark.parametrize("damage", ["byte in a sealed segment", "frame length in a sealed segment", "byte in the newest segment",
                                    "frame length in the newest segment", "frame header in the newest segment",
                                    "frame header in the newest segment, landed by the lake process",
                                    "segment header in the newest segment", "sealed segment removed"])
@pytest.mark.timeout(120)
async def test_damage_to_the_wal_on_disk_costs_only_the_records_it_hit(tmp_path, gateways, damage):
    """One byte of one frame's payload flipped at rest while the gateway is down (a bad sector, a bit
    rotting), or of its header's length (and kind), or a whole sealed segment removed by hand: those
    records cannot land, but every other acknowledged record must, and a log line must count what
    was lost. A damaged length in the newest segment is mended from the frame's checksum, and a
    damaged segment header written again: nothing is lost (a damaged segment header once emptied
    the segment, as if a crash had left it before its header was written). (Before, a flipped byte cost the rest of its sealed segment, 11 frames here, or cut the
    newest segment back to it as if a crash had torn it, 6 frames, with only a warning; a removed
    segment was not logged at all; a damaged length cost the rest of its sealed segment until the
    next stop, and in the newest segment everything after it, for good.)"""
    from gateway.durable.wal import HEADER_SIZE, META, PREFIX  # the on-disk layout, to hit a header's fields

    kind_at = PREFIX.size + META.size - 4  # after count, hour and three u64 times

    sp, devices, lake = setup(tmp_path, gateways, 4, lake={"max_object_age_secs": 3600, "target_object_bytes": 1 << 30},
                              wal={"segment_bytes": 512 * KiB, "max_total_bytes": 16 * MiB})
    ledger = Ledger()
    problems: list[str] = []
    # Two workers: the lake process, started beside them, may read a WAL while its worker mends it.
    workers = 2 if damage.endswith("lake process") else 1
    await sp.astart(workers_env(workers), workers=workers)
    for device in devices:
        async with DeviceClient(sp.url, device, ledger, fresh_connections=True) as client:
            for _ in range(30):
                await client.send(device.records(100))
    await sp.akill()  # nothing has landed: objects roll only at the hour's age
    segments = sorted((tmp_path / "wal").rglob("*.wal"))
    if "in the newest segment" in damage:
        newest = [sorted(wal.glob("*.wal"))[-1] for wal in {segment.parent for segment in segments}]
        victim = max(newest, key=lambda segment: segment.stat().st_size)
    else:
        victim = segments[1]
    records = [f for f in wal_frames(victim) if f[2] > 0]
    if damage == "sealed segment removed":
        lost = sum(f[2] for f in records)
        victim.unlink()
    else:
        payload, length, lost = records[len(records) // 3]
        header = payload - HEADER_SIZE
        hits = {
            "frame length in a sealed segment": [header + 1],
            "frame length in the newest segment": [header + 1],
            "frame header in the newest segment": [header + 1, header + kind_at],
            "frame header in the newest segment, landed by the lake process": [header + 1, header + kind_at],
            "segment header in the newest segment": [2],  # its magic, before any frame
        }.get(damage, [payload + length // 2])
        with open(victim, "r+b") as f:
            for at in hits:
                f.seek(at)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x20]))
        if damage in ("frame length in the newest segment", "segment header in the newest segment"):
            lost = 0
    await sp.astart(workers_env(workers), workers=workers)
    await stop_gracefully(sp, problems)
    raw = lake_counts(lake, ("raw",))["raw"]
    missing = ledger.acked - set(raw)
    if len(missing) != lost:
        problems.append(f"{len(missing)} acknowledged records missing from raw, not the {lost} that were hit: {first(sorted(missing))}")
    if any(n > 1 for n in raw.values()):
        problems.append("records landed twice")
    said = {
        "frame length in the newest segment": "mended from its checksum; nothing is lost",
        "segment header in the newest segment": "header was damaged on disk",
    }.get(damage, f'"records_lost":{lost}')
    if said not in sp.all_logs():
        problems.append(f"no log line says what was lost ({said!r})")
    check(problems, ledger, sp)


SECTOR = 4096


@pytest.mark.timeout(240)
async def test_sectors_lost_from_the_newest_segments_across_kills_cost_only_the_requests_they_hit(tmp_path, gateways):
    """After each of four SIGKILLs mid-load (two workers, the curated zone on), a 4 KiB block of the
    fullest newest WAL segment is zeroed while the gateway is down, as a sector a disk lost: the
    requests that block touched may be lost, no other acknowledged record, and nothing lands twice.
    (Before, a block that hit a frame header cut the segment back to it: every record after it that
    had not landed yet was lost.)"""
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        6,
        inference=True,
        wal={"segment_bytes": 1 * MiB, "max_total_bytes": 16 * MiB},
        lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.5},
    )
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    hit: set = set()  # the records of every request a zeroed block touched
    blocks: list[str] = []
    load: asyncio.Task | None = None
    try:
        for life in range(4):
            await sp.astart(workers_env(2), workers=2, timeout=30)
            if load is None:
                load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.01,
                                                       retry_deadline_secs=30.0, fresh_connections=True))
            await asyncio.sleep(2.5)
            await sp.akill()
            newest = [sorted(wal.glob("*.wal"))[-1] for wal in {p.parent for p in (tmp_path / "wal").rglob("*.wal")}]
            segment = max(newest, key=lambda p: p.stat().st_size)
            size = segment.stat().st_size
            if size < 4 * SECTOR:
                problems.append(f"life {life}: the newest segment holds only {size} bytes: too little load to damage")
                continue
            # In the segment's second quarter: whole requests follow it, most of them not landed yet.
            start = rng.randrange(size // 4, size // 2) // SECTOR * SECTOR
            hit |= records_of_requests_touching(segment, start, start + SECTOR)
            with open(segment, "r+b") as f:
                f.seek(start)
                f.write(bytes(SECTOR))
            blocks.append(f"{segment.parent.parent.name}/{segment.name}@{start}")
        await sp.astart(workers_env(2), workers=2, timeout=30)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        if load is not None:
            await load
    await stop_gracefully(sp, problems)
    logs = sp.all_logs()
    if "the requests after it will" not in logs and "mended from its checksum" not in logs:
        problems.append("no zeroed block was mended: the test did not reach what it is about")
    problems += landing_problems(lake, ledger, ("raw", "curated"), only=ledger.sent - hit)
    for zone, counts in lake_counts(lake, ("raw", "curated")).items():
        twice = [key for key in hit if counts[key] > 1]
        if twice:
            problems.append(f"{len(twice)} records of damaged requests landed twice in {zone}: {first(sorted(twice))}")
    check(problems, ledger, sp, notes=[f"blocks zeroed (random.Random({seed})): {blocks}; records in the requests they hit: {len(hit)}"])


def records_of_requests_touching(segment: Path, start: int, end: int) -> set:
    """(device_id, seq) of every record in a request of ``segment`` with a byte in ``[start, end)``;
    a request runs from its marker to the next one."""
    from gateway.durable.wal import HEADER_SIZE, KIND_RECORDS_SHARED, KIND_TXN, MAGIC, META, PREFIX, expand_shared

    data, at = segment.read_bytes(), len(MAGIC)
    requests: list[tuple[int, list[bytes]]] = []  # (where it begins, its record lines)
    while at + HEADER_SIZE <= len(data):
        length = PREFIX.unpack_from(data, at)[0]
        count, *_, kind = META.unpack_from(data, at + PREFIX.size)
        payload = data[at + HEADER_SIZE : at + HEADER_SIZE + length]
        if kind == KIND_TXN or not requests:
            requests.append((at, []))
        if count:
            lines = expand_shared(payload) if kind == KIND_RECORDS_SHARED else payload
            requests[-1][1].extend(line for line in lines.split(b"\n") if line)
        at += HEADER_SIZE + length
    touched = set()
    for (begins, lines), (ends, _) in zip(requests, [*requests[1:], (len(data), [])]):
        if begins < end and ends > start:
            touched |= {raw_line_key(line) for line in lines}
    return touched



def setup_on_a_disk_that_loses_power(
    tmp_path: Path, gateways: Gateways, disk: PowerLossDisk, n_devices: int, *, max_object_age_secs: float
) -> tuple[ServeProcess, list[Device], Path]:
    """A gateway with the curated zone on, its WAL, retry ledger and local lake on ``disk``."""
    lake = disk.mountpoint / "lake"
    sp, devices, _ = setup(
        tmp_path,
        gateways,
        n_devices,
        inference=True,
        wal={"dir": str(disk.mountpoint / "wal"), "segment_bytes": 256 * KiB, "max_total_bytes": 16 * MiB},
        lake={"dir": str(lake), "target_object_bytes": 64 * KiB, "max_object_age_secs": max_object_age_secs},
    )
    return sp, devices, lake


@pytest.mark.timeout(300)
@pytest.mark.parametrize("also_while_starting", [False, True], ids=["mid-load", "mid-load-and-while-starting"])
async def test_power_losses_lose_no_acknowledged_record(tmp_path, gateways, power_loss_disk, also_while_starting):
    """The machine loses power four times mid-load (the curated zone on; the WAL, the retry ledger and
    the local lake on one disk; 2, 3, 1 and 2 workers; once 0.05-0.5 s into a clean stop, while it
    drains and seals the ledger; once soon after a clean stop and start): each
    time the gateway's processes are gone at once and the disk loses, at random, what was not
    fsynced (tests/fixtures/power_loss_disk.py): pages written since a file's last fsync, a file's
    new size, names created or removed since their directory's last fsync. ``also_while_starting``:
    after each, the power goes again 0.05-1 s into the next start, while it recovers the WALs and
    mends what the first loss tore. Every acknowledged record must be once in raw and in curated
    after the last start, and nothing twice. (Without the directory fsync after a WAL segment is
    created, or after a lake object is renamed into place, or without the WAL's group fsync, it
    fails: thousands of acknowledged records missing.)"""
    sp, devices, lake = setup_on_a_disk_that_loses_power(tmp_path, gateways, power_loss_disk, 6, max_object_age_secs=0.5)
    ledger, problems = Ledger(), []
    notes = await lives_ended_by_power_losses(sp, power_loss_disk, devices, ledger, problems, also_while_starting=also_while_starting)
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(problems, ledger, sp, notes=notes)


@pytest.mark.timeout(240)
async def test_resends_after_a_power_loss_of_records_whose_segments_were_deleted_land_nothing_twice(tmp_path, gateways, power_loss_disk):
    """Devices whose answers were lost on the way (a proxy, a dropped connection) resend them once the
    gateway is back, and the machine lost power in between. The records had been acknowledged,
    landed in raw and curated, and their WAL segments deleted before the power went: the retry
    ledger, rebuilt after the restart, must still know them (from its journal, fsynced before each
    deletion), so every resend is answered 202 (with the first answer, under an Idempotency-Key) and
    lands nothing. (Without the journal, every record of a deleted segment landed a second time.)"""
    sp, devices, lake = setup_on_a_disk_that_loses_power(tmp_path, gateways, power_loss_disk, 4, max_object_age_secs=0.3)
    ledger, problems = Ledger(), []
    sent: list[tuple[Device, list[dict], bytes, str | None, dict]] = []

    async def send_all(device: Device, keyed: bool) -> None:
        async with DeviceClient(sp.url, device, ledger, fresh_connections=True) as client:
            for n in range(30):
                records = device.records(50)
                body, key = ndjson(records), (f"{device.device_id}-{n}" if keyed else None)
                answer = await client.send(records, body=body, idempotency_key=key)
                if answer.status == 202:
                    sent.append((device, records, body, key, answer.json()))

    await sp.astart(workers_env(2), workers=2, timeout=30)
    await asyncio.gather(*(send_all(device, keyed=i % 2 == 0) for i, device in enumerate(devices)))
    if not await wait_until(lambda: not landing_problems(lake, ledger, ("raw", "curated")), timeout=30.0):
        problems.append(f"not landed in 30 s: {landing_problems(lake, ledger, ('raw', 'curated'))[:2]}")
    await asyncio.sleep(1.0)  # the releases that follow the landing, and their deletions
    in_wal = set().union(*(records_of_requests_touching(s, 0, s.stat().st_size) for s in (power_loss_disk.mountpoint / "wal").rglob("*.wal")))
    deleted = ledger.acked - in_wal
    if len(deleted) < len(ledger.acked) // 2:
        problems.append(f"only {len(deleted)} of {len(ledger.acked)} acked records were in deleted segments: the test reached too little")
    await sp.akill()
    loss = await asyncio.to_thread(power_loss_disk.lose_power, random.randrange(1 << 30))
    restart_the_machine(power_loss_disk.mountpoint / "wal" / "ledger")
    await sp.astart(workers_env(3), workers=3, timeout=30)
    resent, other_answers = collections.Counter(), []
    for device in devices:
        async with DeviceClient(sp.url, device, ledger, fresh_connections=True) as client:
            for _, records, body, key, first_answer in (entry for entry in sent if entry[0] is device):
                answer = await client.send(records, body=body, idempotency_key=key)
                resent[answer.status] += 1
                if key is not None and answer.status == 202 and answer.json() != first_answer:
                    other_answers.append((key, first_answer, answer.body[:200]))
    if set(resent) != {202}:
        problems.append(f"resends answered {dict(resent)}")
    if other_answers:
        problems.append(f"{len(other_answers)} resends under an Idempotency-Key got another answer than the first; first: {other_answers[:2]}")
    await asyncio.sleep(1.0)
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(problems, ledger, sp, notes=[f"power loss: {loss}", f"acked records in deleted segments: {len(deleted)}", f"resends: {dict(resent)}"])


@pytest.mark.timeout(300)
async def test_power_losses_with_an_s3_lake_lose_no_record_and_no_event_of_a_landed_object(
    tmp_path, gateways, power_loss_disk, moto_endpoint, landed_queue
):
    """The production path through power losses: the lake is S3 (moto's server), every landed object
    is announced to EventBridge through the outbox beside each WAL, and the WALs, their outboxes and
    the zones' state are on the disk that loses power (as in the test above); EventBridge is away
    for the first three lives. Every acknowledged record is in the bucket's raw and curated zones
    once, every object in the bucket was announced (at least once: an outbox that lost power may
    send an event again), and no event names an object that is not there. (Without the outbox's
    fsync it fails: events of landed objects lost.)"""
    from aiobotocore.session import get_session

    from tests.fixtures.fault_proxy import FaultProxy

    bus, sqs = landed_queue
    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    async with get_session().create_client("s3", endpoint_url=moto_endpoint, region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=bucket)
    aws = {"endpoint_url": moto_endpoint, "region": "us-east-1"}
    events_proxy = FaultProxy(moto_endpoint)
    await events_proxy.start()
    sp, devices, _ = setup(
        tmp_path,
        gateways,
        6,
        inference=True,
        wal={"dir": str(power_loss_disk.mountpoint / "wal"), "segment_bytes": 256 * KiB, "max_total_bytes": 16 * MiB},
        # Fewer, larger objects than above: reading their events back from moto takes most of the test.
        lake={"kind": "s3", "target_object_bytes": 512 * KiB, "max_object_age_secs": 1.5},
        s3={"bucket": bucket, "addressing_style": "path", **aws},
        eventbridge={"event_bus_name": bus, **aws, "endpoint_url": events_proxy.url},
    )
    ledger, problems = Ledger(), []

    async def eventbridge_away_for_the_first_three_lives(life: int) -> None:
        # Events then wait in the outboxes through three power losses, where a missing fsync would lose them.
        await (events_proxy.pause() if life < 3 else events_proxy.resume())

    try:
        notes = await lives_ended_by_power_losses(
            sp, power_loss_disk, devices, ledger, problems, before_each_start=eventbridge_away_for_the_first_three_lives
        )
    finally:
        await events_proxy.stop()
    mirror = tmp_path / "bucket"
    objects = await _mirror_bucket(moto_endpoint, bucket, mirror)
    problems += landing_problems(mirror, ledger, ("raw", "curated"))
    announced = collections.Counter(event["detail"]["key"] for event in await every_event(sqs))
    in_bucket = {str(path.relative_to(mirror)) for path in mirror.rglob("*") if path.is_file()}
    if unannounced := in_bucket - set(announced):
        problems.append(f"{len(unannounced)} of {len(in_bucket)} objects in the bucket were never announced: {first(sorted(unannounced))}")
    if phantoms := set(announced) - in_bucket:
        problems.append(f"{len(phantoms)} events name objects the bucket does not hold: {first(sorted(phantoms))}")
    again = sum(n - 1 for n in announced.values())
    check(problems, ledger, sp, notes=[*notes, f"{objects} objects, {sum(announced.values())} events ({again} sent again)"])



@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_start_after_a_power_loss_on_a_full_disk_waits_for_room_and_loses_nothing(tmp_path, gateways, small_filesystem, workers):
    """The WAL's disk (the power-loss filesystem over a 24 MiB tmpfs; a gateway alone, or a
    supervisor with two workers) is filled by another file mid-load and the power goes. After the
    restart of the machine the retry ledger is rebuilt, which needs room: the start waits for it,
    saying so, instead of failing (a service manager gives up restarting after a few failures, and
    the WALs hold acknowledged records). The power goes once more while it waits, and a SIGTERM
    while the next start waits ends it with status 0; then the disk is freed, the waiting start
    goes on by itself, and every acknowledged record lands once. (Before, such a start exited with
    status 2 at once.)"""
    root = tmp_path / "power-loss-disk"
    backing = small_filesystem(root / "backing", 24 * MiB)
    disk = PowerLossDisk(root)
    disk.mount()
    try:
        ops_port = free_port()
        sp, devices, lake = setup(
            tmp_path,
            gateways,
            4,
            listen={"workers": workers},
            ops={"host": "127.0.0.1", "port": ops_port},
            wal={"dir": str(disk.mountpoint / "wal"), "segment_bytes": 512 * KiB, "max_total_bytes": 8 * MiB},
            lake={"target_object_bytes": 128 * KiB, "max_object_age_secs": 0.3},
        )
        seed = random.randrange(1 << 30)
        ledger, problems, losses = Ledger(), [], []
        stop = asyncio.Event()
        waiting = "the WAL's disk is full: the retry ledger cannot be opened"
        await sp.astart(workers=workers, timeout=30)
        load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.02,
                                               timeout_secs=10.0, retry_deadline_secs=90.0, fresh_connections=True))
        try:
            await asyncio.sleep(1.5)
            # Another tenant of the disk, outside the filesystem's bookkeeping: a power loss keeps it.
            async with Ballast(backing) as ballast:
                await asyncio.sleep(2.0)
                for life in range(2):
                    await sp.akill()
                    losses.append(await asyncio.to_thread(disk.lose_power, seed + life))
                    restart_the_machine(disk.mountpoint / "wal" / "ledger")
                    sp.launch()
                    if not await wait_until(lambda: waiting in sp.log_text(), 30.0, 0.1):
                        problems.append(f"start {sp.starts} on the full disk did not say it waits for room")
                    problems += await answered_while_starting(sp.url, ops_port, "waiting_for_room")
                    await asyncio.sleep(2.0)
                    if not sp.running():
                        problems.append(f"start {sp.starts} on the full disk exited ({sp.proc.returncode}) instead of waiting for room")
                        break
                if sp.running():
                    rc = await sp.aterminate(timeout=20)
                    if rc != 0 or "stopped while the WAL's disk was full" not in sp.log_text():
                        problems.append(f"a SIGTERM while the start waited for room: exit status {rc}, not 0 with a line saying why")
                    sp.launch()
                    if not await wait_until(lambda: waiting in sp.log_text(), 30.0, 0.1):
                        problems.append(f"start {sp.starts} on the full disk did not say it waits for room")
            if ballast.least_free is None or ballast.least_free > 64 * KiB:
                problems.append(f"the ballast did not fill the disk (least free: {ballast.least_free} bytes)")
            if sp.running():
                # Freed: the waiting start goes on by itself.
                await asyncio.to_thread(sp.wait_ready, 60.0, workers)
                if "room on the WAL's disk again" not in sp.log_text():
                    problems.append("the start that waited did not say it went on")
            else:
                await sp.astart(workers=workers, timeout=60)
            await asyncio.sleep(3.0)
        finally:
            stop.set()
            await load
        await stop_gracefully(sp, problems)
        if not any(lost_writes(loss) for loss in losses):
            problems.append(f"no power loss lost a write: the test did not reach what it is about ({losses})")
        problems += landing_problems(lake, ledger, ("raw",))
        answers = dict(collections.Counter(a.status for a in ledger.attempts))
        check(problems, ledger, sp, notes=[f"power losses (seeds from {seed}): {losses}", f"answers: {answers}"])
    finally:
        gateways.kill_all()
        disk.unmount()

async def answered_while_starting(url: str, ops_port: int, state: str) -> list[str]:
    """What is wrong with the listeners' answers while a start is in ``state`` ("starting", or
    "waiting_for_room"): on the device listener alive (the host's watchdog must not replace the
    instance), not ready, and a device told to come back; on the ops listener a scrape that says so
    (not one that times out, as for an instance that is down)."""
    import aiohttp

    wanted = {
        ("GET", "/healthz"): (200, {"status": state}),
        ("GET", "/readyz"): (503, {"status": state}),
        ("POST", "/v1/telemetry"): (503, "unavailable"),
    }
    problems = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for (method, path), (status, body) in wanted.items():
            try:
                async with http.request(method, url + path, data=b'{"device_id":"d","ts":1,"metrics":{}}\n') as resp:
                    got = await resp.json(content_type=None)
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problems.append(f"{method} {path} while the start was {state}: {type(exc).__name__} {exc}")
                continue
            got_body = got.get("error") if isinstance(body, str) else got
            if (resp.status, got_body) != (status, body) or (status == 503 and not retry_after):
                problems.append(f"{method} {path} while the start was {state}: {resp.status} {got}, "
                                f"Retry-After {retry_after} (wanted {status} {body})")
    scraped = await scrape(ops_port)
    if isinstance(scraped, str):
        problems.append(f"GET /metrics while the start was {state}: {scraped}")
    elif (scraped.get("edge_gateway_starting"), scraped.get("edge_gateway_start_waiting_for_room")) != (1, float(state == "waiting_for_room")):
        problems.append(f"GET /metrics while the start was {state}: {scraped}")
    return problems


async def scrape(ops_port: int) -> dict[str, float] | str:
    """The ops listener's unlabelled samples (summed over workers), or what went wrong."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"http://127.0.0.1:{ops_port}/metrics") as resp:
                text = await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__} {exc}"
    if resp.status != 200:
        return f"{resp.status} {text[:200]}"
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if set(sample.labels) <= {"worker"}:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


@contextlib.contextmanager
def lock_held_for_a_killed_holder(lock: Path, pid: int, *, kill_it: bool = False):
    """Another process holds ``lock`` (a WAL directory's) for the duration of the block, the file
    naming ``pid``, a process that is gone: what the kernel does for a holder killed during an fsync
    on a slow disk until that I/O ends. A start waits for such a lock (up to 30 s) instead of refusing.
    ``kill_it``: ``pid`` holds the lock now and is killed here, the lock taken over as it goes."""
    import subprocess
    import sys

    script = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o640); fcntl.flock(fd, fcntl.LOCK_EX); "
        "os.ftruncate(fd, 0); os.pwrite(fd, sys.argv[2].encode() + b'\\n', 0); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(lock), str(pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if kill_it:
        time.sleep(0.5)  # by then the holder waits in flock() for the lock the kill releases
        os.kill(pid, signal.SIGKILL)
    try:
        assert holder.stdout.readline().strip() == "held", f"{lock} could not be taken"
        yield
    finally:
        holder.stdin.close()  # the holder exits, and the kernel releases its lock
        holder.wait(10)
        holder.stdout.close()


@contextlib.asynccontextmanager
async def killed_mid_load(tmp_path: Path, gateways: Gateways, workers: int, ops_port: int):
    """A gateway (alone, or a supervisor with ``workers``) under load from four devices that keep
    sending, kill -9'd after 1.5 s: yields it, what the devices saw, the killed PID and a list for
    the problems found. On leaving, the devices stop; then (unless the block raised) the gateway is
    stopped gracefully and every acknowledged record must be in the raw zone once."""
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        listen={"workers": workers},
        ops={"host": "127.0.0.1", "port": ops_port},
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": 8 * MiB},
        lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.3},
    )
    ledger, stop, problems = Ledger(), asyncio.Event(), []
    await sp.astart(workers=workers)
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.02, retry_deadline_secs=60.0))
    try:
        await asyncio.sleep(1.5)
        killed = sp.pid
        await sp.akill()
        yield sp, ledger, killed, problems
    finally:
        stop.set()
        await load
    await stopped_and_judged(sp, lake, ledger, problems)


async def stopped_and_judged(sp: ServeProcess, lake: Path, ledger: Ledger, problems: list[str]) -> None:
    """Stop the gateway gracefully; every acknowledged record must then be in the raw zone once."""
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


def wal_lock(tmp_path: Path, workers: int) -> Path:
    """The lock of the (first) WAL directory ``setup`` gives a gateway with ``workers``."""
    return tmp_path / "wal" / ("w0" if workers > 1 else "") / "wal.lock"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_long_catch_up_at_start_is_answered_on_both_listeners_and_loses_nothing(tmp_path, gateways, workers):
    """After a kill -9 mid-load the next start catches its retry ledger up with the WALs before
    anyone is served; a long catch-up is stood in for by a WAL directory's lock that the kernel keeps
    for the killed process a few seconds longer (a catch-up after a machine restart reads every WAL
    whole: minutes for full ones). Meanwhile (a gateway alone, or a supervisor with two workers) the
    device listener answers: alive, not ready, come back later; and the ops listener's ``/metrics``
    says the instance is starting and for how long. Then the start goes on by itself, ``/metrics``
    says ``edge_gateway_starting 0``, and every acknowledged record lands once. (Before, a gateway
    alone refused connections meanwhile, and a scrape of either kind timed out as for one that is down.)"""
    ops_port = free_port()
    async with killed_mid_load(tmp_path, gateways, workers, ops_port) as (sp, ledger, killed, problems):
        acked_before_start = ledger.acked_requests
        with lock_held_for_a_killed_holder(wal_lock(tmp_path, workers), killed):
            sp.launch()
            if not await wait_until_answering(sp, 0, 20.0):
                problems.append("the start gave no HTTP answer within 20 s while its WAL's lock was held")
            problems += await answered_while_starting(sp.url, ops_port, "starting")
            first = await scrape(ops_port)
            await asyncio.sleep(1.5)
            second = await scrape(ops_port)
            if isinstance(first, str) or isinstance(second, str) or second["edge_gateway_start_seconds"] < first["edge_gateway_start_seconds"] + 1.0:
                problems.append(f"/metrics did not say for how long the start went on: {first} then {second}")
            if ledger.acked_requests != acked_before_start:
                problems.append("a request was acknowledged while the start had not caught its ledger up")
            if not sp.running():
                problems.append(f"the start exited ({sp.proc.returncode}) while its WAL's lock was held")
        await asyncio.to_thread(sp.wait_ready, 60.0, workers)
        serving = await scrape(ops_port)
        if isinstance(serving, str) or serving.get("edge_gateway_starting") != 0 or "edge_gateway_start_seconds" in serving:
            problems.append(f"/metrics once serving: {serving}")
        await asyncio.sleep(1.5)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stop_while_a_start_waits_for_a_lock_ends_it_at_once_and_loses_nothing(tmp_path, gateways, workers):
    """The start after a kill -9 waits for a WAL directory's lock the kernel still holds for the
    killed process (up to 30 s); a SIGTERM meanwhile ends it with status 0 within a few seconds, as
    a service manager's stop expects, and the start after it (the lock released) lands every
    acknowledged record once. (Before, the SIGTERM waited for the lock, and then for the whole
    catch-up of the retry ledger.)"""
    async with killed_mid_load(tmp_path, gateways, workers, free_port()) as (sp, ledger, killed, problems):
        with lock_held_for_a_killed_holder(wal_lock(tmp_path, workers), killed):
            sp.launch()
            if not await wait_until_answering(sp, 0, 20.0):
                problems.append("the start gave no HTTP answer within 20 s while its WAL's lock was held")
            await stopped_while_waiting_for_a_lock(sp, problems, "the start")
        await sp.astart(workers=workers, timeout=30)
        await asyncio.sleep(1.5)


async def stopped_while_waiting_for_a_lock(sp: ServeProcess, problems: list[str], who: str) -> None:
    """SIGTERM while ``who`` waits for a WAL directory's lock: status 0 within 5 s, and a line saying why."""
    signalled = time.monotonic()
    rc = await sp.aterminate(timeout=40)
    took = time.monotonic() - signalled
    if rc != 0 or took > 5.0 or "stopped while waiting for the lock" not in sp.log_text():
        problems.append(f"a SIGTERM while {who} waited for a lock: exit {rc} after {took:.1f} s (wanted 0 within 5 s, and a line saying why)")


@pytest.mark.timeout(150)
async def test_a_stop_while_a_restarted_worker_waits_for_its_wal_lock_ends_it_at_once_and_loses_nothing(tmp_path, gateways):
    """A worker killed alone mid-load is restarted by the supervisor at once, and its WAL directory's
    lock is still held for it (as the kernel holds it for a process killed in an fsync on a slow
    disk), so the new worker waits for it, up to 30 s. A SIGTERM to the gateway meanwhile ends every
    process with status 0 within a few seconds, and the start after it (the lock released) lands
    every acknowledged record once. (Before, the stop waited for the lock.)"""
    sp, lake, ledger, stop, load = await two_workers_under_load(tmp_path, gateways)
    problems: list[str] = []
    try:
        with lock_held_for_a_killed_holder(wal_lock(tmp_path, 2), worker_with_index(sp, 0), kill_it=True):
            if not await wait_until(lambda: "still held by a process that has exited" in sp.log_text(), timeout=20.0):
                problems.append("the restarted worker did not wait for its WAL's lock: the test reached nothing")
            await stopped_while_waiting_for_a_lock(sp, problems, "a restarted worker")
        await sp.astart(workers_env(2), workers=2, timeout=30)
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        await load
    await stopped_and_judged(sp, lake, ledger, problems)


async def lives_ended_by_power_losses(
    sp: ServeProcess,
    disk: PowerLossDisk,
    devices: list[Device],
    ledger: Ledger,
    problems: list[str],
    *,
    also_while_starting: bool = False,
    before_each_start: Callable[[int], Awaitable[None]] | None = None,
) -> list[str]:
    """Four lives of the gateway under load (2, 3, 1 and 2 workers; in the third a clean stop and
    start first), each ended by a power loss (the second's 0.05-0.5 s into a clean stop) (and, ``also_while_starting``, another 0.05-1 s into
    the next start), then a last start that runs a second and stops cleanly; ``before_each_start``
    is given the life's number (4: the last start). Problems go to ``problems``; the notes a failure
    should show are returned."""
    ledger_dir = disk.mountpoint / "wal" / "ledger"  # where both tests put wal.dir
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    stop = asyncio.Event()
    losses: list[dict] = []
    load: asyncio.Task | None = None
    try:
        for life, workers in enumerate((2, 3, 1, 2)):
            if before_each_start is not None:
                await before_each_start(life)
            await sp.astart(workers_env(workers), workers=workers, timeout=30)
            if load is None:
                load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.01,
                                                       retry_deadline_secs=60.0, fresh_connections=True))
            if life == 2:
                # A clean stop seals the ledger as whole: the start after it must not trust it for
                # longer than it stays so.
                await asyncio.sleep(1.0)
                await stop_gracefully(sp, problems)
                await sp.astart(workers_env(workers), workers=workers, timeout=30)
            await asyncio.sleep(2.5)
            if life == 1:
                # The power goes while a clean stop drains the WALs and seals the ledger.
                sp.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(rng.uniform(0.05, 0.5))
            await sp.akill()  # every process at once, as the power takes them
            losses.append(await asyncio.to_thread(disk.lose_power, seed + life))
            restart_the_machine(ledger_dir)
            if also_while_starting:
                sp.launch(workers_env(workers))
                await asyncio.sleep(rng.uniform(0.05, 1.0))
                await sp.akill()
                losses.append(await asyncio.to_thread(disk.lose_power, seed + 100 + life))
                restart_the_machine(ledger_dir)
        if before_each_start is not None:
            await before_each_start(4)
        await sp.astart(workers_env(2), workers=2, timeout=30)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        if load is not None:
            await load
    await stop_gracefully(sp, problems)
    if not any(lost_writes(loss) for loss in losses):
        problems.append(f"no power loss lost a write: the test did not reach what it is about ({losses})")
    logged = collections.Counter(
        (e.get("level"), e.get("msg")) for e in log_entries(sp.all_logs()) if isinstance(e, dict) and e.get("level") in ("ERROR", "CRITICAL")
    )
    return [f"power losses (seeds from {seed}): {losses}", f"errors logged: {dict(logged)}"]


async def every_event(sqs) -> list[dict]:
    """Every event the ``landed_queue`` fixture's queue holds, once: until two receives come back empty."""
    events: list[dict] = []
    empty = 0
    while empty < 2:
        # Hidden for an hour once received: none comes back while the rest are read.
        response = await sqs.receive_message(QueueUrl=sqs.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=3600)
        messages = response.get("Messages", [])
        events += [orjson.loads(m["Body"]) for m in messages]
        empty = 0 if messages else empty + 1
        if not messages:
            await asyncio.sleep(0.2)
    return events


def restart_the_machine(ledger: Path) -> None:
    """What the test cannot do for real: give the next start a new boot of the machine, which the
    retry ledger reads to tell a restarted machine (its file may be torn) from a restarted process."""
    boot = ledger / "boot"
    try:
        state = orjson.loads(boot.read_bytes())
    except (FileNotFoundError, ValueError):
        return  # never written, or torn by the power loss: the ledger is not trusted either way
    state["boot_id"] = str(uuid.uuid4())
    payload = orjson.dumps(state).ljust(len(boot.read_bytes()))
    boot.write_bytes(payload)


# -- 11 -----------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_renaming_the_gateway_or_its_dataset_across_kills_lands_nothing_twice(tmp_path, gateways):
    """``gateway.gateway_id`` and ``gateway.dataset`` name every lake object. Changed between a SIGKILL
    and the next start, an object that landed before the kill but was not yet recorded as landed
    must be replayed under the key it already has, not landed again under the new names."""
    sp, devices, lake = setup(tmp_path, gateways, 4, lake={"target_object_bytes": 16 * KiB, "max_object_age_secs": 0.5})
    ledger = Ledger()
    problems: list[str] = []
    stop = asyncio.Event()
    load: asyncio.Task | None = None
    # A kill finds an object landed but not yet recorded only now and then: many short phases.
    names = [(f"gw-{phase % 3}", f"fleet-{phase % 2}") for phase in range(8)]
    for phase, (gateway_id, dataset) in enumerate(names):
        env = workers_env(2) | {"EDGE_GATEWAY__GATEWAY__GATEWAY_ID": gateway_id, "EDGE_GATEWAY__GATEWAY__DATASET": dataset}
        await sp.astart(env, workers=2)
        if load is None:
            load = asyncio.create_task(
                run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.01, retry_deadline_secs=20.0)
            )
        await asyncio.sleep(1.5)
        if phase < len(names) - 1:
            await sp.akill()  # objects mid-upload, some landed but not yet recorded
    stop.set()
    await load
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


# -- 12 -----------------------------------------------------------------------------------------


async def _mirror_bucket(endpoint: str, bucket: str, into: Path) -> int:
    """Every object of ``bucket`` written under ``into`` by its key, so the lake readers count it."""
    from aiobotocore.session import get_session

    count = 0
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                obj = await s3.get_object(Bucket=bucket, Key=item["Key"])
                path = into / item["Key"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(await obj["Body"].read())
                count += 1
    return count


@pytest.mark.timeout(240)
async def test_s3_lake_through_kills_and_wal_wraps_holds_each_record_once(tmp_path, gateways, moto_endpoint):
    """The production path: the lake is S3 (moto's server), two workers and the lake process, the
    curated zone on, small WALs wrapped several times over; the whole group is SIGKILLed twice and
    one worker once, and one device resends an identical body on fresh connections. Every
    acknowledged record is in the bucket's raw and curated zones exactly once."""
    from aiobotocore.session import get_session

    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    async with get_session().create_client("s3", endpoint_url=moto_endpoint, region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=bucket)
    wal_capacity = 2 * MiB
    sp, devices, _ = setup(
        tmp_path,
        gateways,
        6,
        inference=True,
        listen={"workers": 2},
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": wal_capacity},
        lake={"kind": "s3", "target_object_bytes": 128 * KiB, "max_object_age_secs": 0.3},
        s3={"bucket": bucket, "endpoint_url": moto_endpoint, "region": "us-east-1", "addressing_style": "path"},
    )
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    load: asyncio.Task | None = None
    resender = DeviceClient(sp.url, devices[-1], ledger, fresh_connections=True, retry_deadline_secs=20.0)
    for phase in range(3):
        await sp.astart(workers=2)
        if load is None:
            load = asyncio.create_task(
                run_devices(sp.url, devices[:-1], ledger, stop, records_per_request=100, pause_secs=0.05, retry_deadline_secs=30.0)
            )
        bytes_before = ledger.acked_bytes
        await asyncio.sleep(1.0)
        if phase == 1:
            os.kill(sp.children()[0], 9)  # one worker: the supervisor starts it again
        async with resender:
            records = devices[-1].records(50)
            body = ndjson(records)
            await resender.send(records, body=body)
            await _resend(resender, records, body, 5, None)
        # Two WALs of 2 MiB: 1.5x their sum per phase wraps each about twice over the three phases.
        await wait_for_acks(ledger, lambda: ledger.acked_bytes - bytes_before >= 3 * wal_capacity, budget_secs=40.0, stall_secs=8.0)
        if phase < 2:
            await sp.akill()
    stop.set()
    await load
    await stop_gracefully(sp, problems)
    if ledger.acked_bytes < 9 * wal_capacity:
        problems.append(f"only {ledger.acked_bytes / MiB:.2f} MiB acknowledged: the WALs did not wrap twice over")
    mirror = tmp_path / "bucket"
    objects = await _mirror_bucket(moto_endpoint, bucket, mirror)
    problems += landing_problems(mirror, ledger, ("raw", "curated"))
    check(problems, ledger, sp, notes=[f"{objects} objects in the bucket"])


@pytest.mark.timeout(200)
async def test_wal_segment_size_and_capacity_changed_between_kills(tmp_path, gateways):
    """Segments written under one ``wal.segment_bytes`` are read, landed and released under another."""
    sp, devices, lake = setup(tmp_path, gateways, 4, lake={"target_object_bytes": 256 * KiB, "max_object_age_secs": 0.2})
    ledger = Ledger()
    problems: list[str] = []
    stop = asyncio.Event()
    load = None
    for segment, total, workers in ((256 * KiB, 4 * MiB, 2), (1 * MiB, 6 * MiB, 1), (64 * KiB, 2 * MiB, 2), (512 * KiB, 3 * MiB, 3)):
        env = workers_env(workers) | {"EDGE_GATEWAY__WAL__SEGMENT_BYTES": str(segment), "EDGE_GATEWAY__WAL__MAX_TOTAL_BYTES": str(total)}
        await sp.astart(env, workers=workers, timeout=30)
        if load is None:
            load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.01, retry_deadline_secs=60.0))
        acked_before = ledger.acked_requests
        await wait_for_acks(ledger, lambda: ledger.acked_requests - acked_before > 300, budget_secs=40, stall_secs=10)
        await sp.akill()
    await sp.astart(workers_env(2), workers=2, timeout=30)
    acked_before = ledger.acked_requests
    await wait_for_acks(ledger, lambda: ledger.acked_requests - acked_before > 100, budget_secs=40, stall_secs=10)
    stop.set()
    await load
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


def _damage_ledger(data: Path, how: str, rng: random.Random) -> None:
    """What a power loss can leave of a file LMDB writes without fsync: torn pages, or a short file."""
    if how == "truncated":
        os.truncate(data, data.stat().st_size // 3)
        return
    page = 4096
    with open(data, "r+b") as f:
        pages = data.stat().st_size // page
        for number in rng.sample(range(2, pages), max(1, pages // 4)):  # pages 0 and 1 are LMDB's meta pages
            f.seek(number * page)
            f.write(rng.randbytes(page))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("how", ["torn_pages", "truncated"])
async def test_a_damaged_retry_ledger_is_rebuilt_from_the_wal(tmp_path, gateways, how):
    """The retry ledger is never fsynced (durability follows the WAL): a damaged one must not keep
    the gateway from starting, and the WAL it is rebuilt from still lands everything once."""
    sp, devices, lake = setup(tmp_path, gateways, 4, wal={"segment_bytes": 256 * KiB, "max_total_bytes": 4 * MiB},
                              lake={"target_object_bytes": 256 * KiB, "max_object_age_secs": 0.2})
    ledger = Ledger()
    problems: list[str] = []
    stop = asyncio.Event()
    rng = random.Random(11)
    ledger_dir = tmp_path / "wal" / "ledger"
    await sp.astart(workers_env(2), workers=2)
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.01, retry_deadline_secs=60.0))
    for _ in range(2):
        acked_before = ledger.acked_requests
        await wait_for_acks(ledger, lambda: ledger.acked_requests - acked_before > 300, budget_secs=40, stall_secs=10)
        await sp.akill()
        assert orjson.loads((ledger_dir / "boot").read_bytes())["closed"] is False, "a killed instance did not seal it"
        _damage_ledger(ledger_dir / "data.mdb", how, rng)
        await sp.astart(workers_env(2), workers=2, timeout=30)
        assert "retry ledger damaged; starting a new one" in sp.log_text()
    acked_before = ledger.acked_requests
    await wait_for_acks(ledger, lambda: ledger.acked_requests - acked_before > 300, budget_secs=40, stall_secs=10)
    stop.set()
    await load
    await stop_gracefully(sp, problems)
    assert orjson.loads((ledger_dir / "boot").read_bytes())["closed"] is True, "a clean stop flushes and seals the ledger"
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("killed", [False, True], ids=["running", "sigkill_midway"])
async def test_records_rebatched_while_their_first_request_runs_land_once(tmp_path, gateways, killed):
    """A device that gave up waiting re-batches unacknowledged records into new bodies and sends them
    on other connections while the first request is still running: two workers checking the same
    records at once must not both find them new, and the claims of a gateway killed midway hold
    nothing back after its restart."""
    sp, (device,), lake = setup(tmp_path, gateways, 1, lake={"target_object_bytes": 256 * KiB, "max_object_age_secs": 0.2})
    await sp.astart(workers_env(2), workers=2)
    ledger = Ledger()
    problems: list[str] = []
    rng = random.Random(5)
    records = device.records(3000, with_seq=True)

    async def resend_slices(client: DeviceClient) -> None:
        for _ in range(10):
            start = rng.randrange(0, len(records) - 400)
            await client.send(records[start : start + rng.randrange(50, 400)], retry=False)

    async def kill_and_restart_midway() -> None:
        await wait_until(lambda: ledger.acked_requests >= 40, timeout=30)
        await sp.akill()
        await sp.astart(workers_env(2), workers=2)

    clients = [DeviceClient(sp.url, device, ledger, fresh_connections=True) for _ in range(16)]
    for client in clients:
        await client.__aenter__()
    try:
        await asyncio.gather(*(resend_slices(client) for client in clients), *([kill_and_restart_midway()] if killed else []))
        if killed:  # after the restart, every record once more, overlapping: nothing may wait on a dead claim
            assert sp.starts == 2
            acked_before = ledger.acked_requests
            await asyncio.gather(*(resend_slices(client) for client in clients))
            assert ledger.acked_requests - acked_before == 160, f"after the restart: {ledger.summary()}"
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    await stop_gracefully(sp, problems)
    ledger.refused -= ledger.acked  # a record refused in one body and acknowledged in another was acknowledged
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp, notes=[f"statuses {dict(ledger.statuses)}"])


@pytest.mark.timeout(150)
async def test_rebatched_records_are_recognised_long_after_and_across_a_kill(tmp_path, gateways):
    """The ledger keeps a run of consecutive seqs as one entry: records re-batched into new bodies
    are still duplicates after thousands of later records and a SIGKILL, with room for 400 entries
    per generation (one per record, the first 12,000 would have been forgotten many times over)."""
    sp, devices, lake = setup(tmp_path, gateways, 4, limits={"dedup_max_keys": 400},
                              lake={"target_object_bytes": 256 * KiB, "max_object_age_secs": 0.2})
    await sp.astart(workers_env(2), workers=2)
    ledger = Ledger()
    problems: list[str] = []
    sent = {device.device_id: device.records(4000, with_seq=True) for device in devices}

    async def send_all(device: Device) -> None:
        async with DeviceClient(sp.url, device, ledger) as client:
            records = sent[device.device_id]
            for start in range(0, len(records), 100):
                if (await client.send(records[start:start + 100])).status != 202:
                    problems.append(f"{device.device_id}: records {start}-{start + 99} were not acknowledged")

    await asyncio.gather(*(send_all(device) for device in devices))
    await sp.akill()
    await sp.astart(workers_env(1), workers=1)
    for device in devices:
        records = sent[device.device_id]
        async with DeviceClient(sp.url, device, ledger) as client:
            for rebatched in (records[:150][::-1], records[1950:2050], records[3990:] + records[:10]):
                answer = await client.send(rebatched, retry=False)
                got = answer.json() if answer.status == 202 else answer.body[:200]
                if answer.status != 202 or got["duplicates"] != len(rebatched):
                    problems.append(f"{device.device_id}: {len(rebatched)} re-batched records answered {answer.status} {got}")
    # What the SIGKILL left unlanded in the second worker's WAL lands from its drain as an orphaned
    # directory, behind the acks; the stop waits for it (within the drain deadline).
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


@pytest.mark.timeout(120)
async def test_a_stop_right_after_fewer_workers_start_lands_the_orphaned_wal_first(tmp_path, gateways):
    """SIGKILLed with two workers and objects still open, restarted with one and told to stop at once:
    the WAL directory no worker owns now must land within the drain deadline, and the drain report
    must say so only when it did (it was cancelled at once, and the report still said everything)."""
    sp, devices, lake = setup(tmp_path, gateways, 4, lake={"target_object_bytes": 64 * MiB, "max_object_age_secs": 600})
    await sp.astart(workers_env(2), workers=2)
    ledger = Ledger()
    problems: list[str] = []

    await send_numbered(sp.url, devices, ledger, 2000)
    await sp.akill()
    if zone_records(lake, "raw"):
        problems.append("records landed before the SIGKILL: the restart would have nothing left to drain")
    await sp.astart(workers_env(1), workers=1)
    await stop_gracefully(sp, problems)
    entries = [e for e in log_entries(sp.log_text()) if isinstance(e, dict)]
    drained = [e for e in entries if e.get("msg") in {"drained", "orphaned WAL directory drained"}]
    if not drained or not all(e.get("landed_everything") for e in drained):
        problems.append(f"the drain reports: {drained}")
    if any(e.get("msg", "").startswith("orphaned WAL drain stopped") for e in entries):
        problems.append("the orphaned WAL's drain was cut short by the stop")
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


@pytest.mark.timeout(150)
async def test_a_worker_added_while_the_lake_is_down_takes_the_devices_its_full_siblings_refuse(tmp_path, gateways):
    """Landing fails (the raw zone's directory is a file), both workers' WALs fill, SIGKILL, restart
    with three: the new worker's WAL is empty, so every device must get its next request acknowledged
    there. A full worker answered 503 on kept-alive connections and went on taking its share of new
    ones, so a device that had reached it was refused until its WAL drained, while /readyz said 200."""
    cap, segment = 1 * MiB, 128 * KiB
    sp, devices, lake = setup(tmp_path, gateways, 6, wal={"max_total_bytes": cap, "segment_bytes": segment, "retry_after_secs": 1},
                              lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.2})
    lake.mkdir()
    blocker = lake / "raw"
    blocker.write_text("not a directory: landing the raw zone fails until this is removed")
    ledger = Ledger()
    problems: list[str] = []
    await sp.astart(workers_env(2), workers=2)
    stop = asyncio.Event()
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=100, fresh_connections=True,
                                           retry_deadline_secs=0.5))
    full = await wait_until(lambda: all(wal_bytes(tmp_path / "wal" / w) >= cap - 2 * segment for w in ("w0", "w1")), 60, 0.1)
    stop.set()
    await load
    if not full:
        problems.append(f"the two workers' WALs did not fill: {[wal_bytes(tmp_path / 'wal' / w) for w in ('w0', 'w1')]}")
    await sp.akill()
    await sp.astart(workers_env(3), workers=3)
    acked_before = ledger.acked_requests

    async def one_more(device: Device) -> None:
        async with DeviceClient(sp.url, device, ledger, retry_deadline_secs=20.0) as client:  # one kept-alive connection
            answer = await client.send(device.records(50, with_seq=True))
            if answer.status != 202:
                problems.append(f"{device.device_id}: answered {answer.status} after {answer.attempts} attempts: {answer.body[:150]!r}")

    await asyncio.gather(*(one_more(device) for device in devices))
    if ledger.acked_requests - acked_before != len(devices):
        problems.append(f"{ledger.acked_requests - acked_before} of {len(devices)} devices were acknowledged after the restart")
    blocker.unlink()  # the lake is back: everything acknowledged lands
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


@pytest.mark.timeout(120)
async def test_a_body_of_duplicates_resent_to_another_worker_gets_its_first_answer(tmp_path, gateways):
    """A body whose every record was already accepted writes nothing; its answer must still be kept,
    or a resend reaching another worker finds the body "still running" and is refused."""
    sp, (device,), lake = setup(tmp_path, gateways, 1, lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.2})
    await sp.astart(workers_env(2), workers=2)
    ledger = Ledger()
    problems: list[str] = []
    records = device.records(60, with_seq=True)
    async with DeviceClient(sp.url, device, ledger, fresh_connections=True) as client:
        first = await client.send(records, retry=False)
        rebatched = list(reversed(records[:40]))  # the same records in a new body: every one a duplicate
        body = ndjson(rebatched)
        answers = [await client.send(rebatched, body=body, retry=False) for _ in range(8)]
    if first.status != 202:
        problems.append(f"the first send got {first.status}: {first.body[:300]!r}")
    bad = [(a.status, a.body[:200]) for a in answers if a.status != 202 or a.json().get("duplicates") != 40]
    if bad:
        problems.append(f"{len(bad)} of 8 sends of a body of duplicates were not answered 202 with 40 duplicates: {bad[:3]}")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


# -- 13 -----------------------------------------------------------------------------------------


def log_entries(text: str) -> list[dict | str]:
    """The gateway's log lines: a dict for each JSON line, the raw text of any other (an uncaught exception's output)."""
    entries: list[dict | str] = []
    for line in text.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = line
        entries.append(entry if isinstance(entry, dict) else line)
    return entries


def accepted_lately(ledger: Ledger, seconds: float) -> bool:
    """Whether requests were answered in the last ``seconds``, every one of them 202."""
    recent = ledger.attempts_since(time.monotonic() - seconds)
    return bool(recent) and all(a.status == 202 for a in recent)


class Phases:
    """What the devices were answered in each named stretch of a scenario."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.answers: dict[str, collections.Counter] = {}

    async def run(self, name: str, seconds: float) -> None:
        t = time.monotonic()
        await asyncio.sleep(seconds)
        self.answers[name] = collections.Counter(a.status for a in self.ledger.attempts_since(t))

    def __str__(self) -> str:
        return str({name: dict(answers) for name, answers in self.answers.items()})


def answer_problems(ledger: Ledger, kill_window: tuple[float, float] | None) -> list[str]:
    """A gateway whose lake is away answers 202 or 503 with Retry-After, and nothing else but around its SIGKILL."""

    def around_the_kill(a) -> bool:
        return kill_window is not None and a.started <= kill_window[1] and a.started + a.latency >= kill_window[0]

    problems = []
    wrong = collections.Counter(a.status for a in ledger.attempts if a.status not in (202, 503) and not around_the_kill(a))
    if wrong:
        problems.append(f"answers other than 202 or 503 away from the SIGKILL: {dict(wrong)} (a timeout is a request hanging for 10 s)")
    no_retry_after = sum(1 for a in ledger.attempts if a.status == 503 and a.retry_after is None)
    if no_retry_after:
        problems.append(f"{no_retry_after} answers 503 came without Retry-After")
    return problems


async def wait_until_answering(sp: ServeProcess, workers: int, timeout: float) -> bool:
    """Until ``/readyz`` gives any HTTP answer with ``workers`` children up; False if the gateway exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sp.running():
        if isinstance(await asyncio.to_thread(readyz, sp.url), int) and len(sp.children()) >= workers:
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.timeout(120)
async def test_full_lake_filesystem_holds_acks_in_the_wal_until_it_frees(tmp_path, gateways, small_filesystem):
    """The local lake's filesystem fills up while devices keep sending (the WAL's has room): the
    gateway acknowledges while its WALs have room, then answers 503 with Retry-After (never 500,
    never a crash), is SIGKILLed and restarted while the lake is still full, and once the lake has
    room again every acknowledged record lands in raw and curated exactly once."""
    lakefs = small_filesystem(tmp_path / "lakefs", 64 * MiB)
    lake = lakefs / "lake"
    workers = 2
    sp, devices, _ = setup(
        tmp_path,
        gateways,
        4,
        inference=True,
        listen={"workers": workers},
        # Small WALs fill within seconds of the lake; a Retry-After of their own tells a full WAL's 503 from others.
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": 4 * MiB, "retry_after_secs": 3},
        lake={"dir": str(lake), "target_object_bytes": 128 * KiB, "max_object_age_secs": 0.3},
    )
    await sp.astart(workers=workers, timeout=30)
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    t0 = time.monotonic()
    kill_window: tuple[float, float] | None = None
    acked_while_full = 0
    ballast: Ballast | None = None

    def wal_full_refusal(a) -> bool:
        return a.status == 503 and a.retry_after == "3"

    def answers_since(t: float) -> dict:
        return dict(collections.Counter((a.status, a.retry_after) for a in ledger.attempts_since(t)))

    load = asyncio.create_task(
        run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.05, timeout_secs=10.0, retry_deadline_secs=40.0)
    )
    try:
        await wait_for_acks(ledger, lambda: ledger.acked_requests >= 40, budget_secs=15.0, stall_secs=8.0)
        if not await wait_until(lambda: bool(lake_counts(lake, ("raw",))["raw"]), 10.0, 0.5):
            problems.append(f"nothing landed before the lake filled up: {ledger.summary()}")
        t_full = time.monotonic()
        async with Ballast(lakefs) as ballast:
            if not await wait_until(lambda: any(wal_full_refusal(a) for a in ledger.attempts_since(t_full)), 30.0, 0.1):
                problems.append(f"no 503 for a full WAL within 30 s of the lake filling up: answers since {answers_since(t_full)}")
            acked_while_full = sum(1 for a in ledger.attempts_since(t_full) if a.status == 202)
            await asyncio.sleep(2.0)  # devices go on being refused for a while
            if not sp.running():
                problems.append(f"the gateway exited (status {sp.proc.returncode}) while the lake was full")
            t_kill = time.monotonic()
            await sp.akill()
            # Its WALs are still full, so /readyz rightly answers 503: wait for an answer, not for a 200.
            await asyncio.to_thread(sp.launch)
            if not await wait_until_answering(sp, workers, 30.0):
                problems.append(f"the gateway restarted while the lake was full did not answer /readyz within 30 s:\n{sp.log_tail(1500)}")
            t_restarted = time.monotonic()
            kill_window = (t_kill, t_restarted)
            if not await wait_until(lambda: any(wal_full_refusal(a) for a in ledger.attempts_since(t_restarted)), 15.0, 0.1):
                problems.append(f"no 503 for a full WAL within 15 s of the restart while the lake was full: {answers_since(t_restarted)}")
            await asyncio.sleep(2.0)
        t_freed = time.monotonic()
        if await wait_until(lambda: any(a.status == 202 for a in ledger.attempts_since(t_freed)), 30.0, 0.1):
            await asyncio.sleep(1.0)
        else:
            problems.append(f"ingest did not resume within 30 s of the lake having room: answers since {answers_since(t_freed)}")
    finally:
        stop.set()
        await load
    if ballast is None or ballast.least_free is None or ballast.least_free > 256 * KiB:
        problems.append(f"the ballast did not fill the lake's filesystem (least free: {ballast and ballast.least_free} bytes)")
    if acked_while_full == 0:
        problems.append("nothing was acknowledged after the lake filled up, though the WALs had room")

    problems += answer_problems(ledger, kill_window)
    # What the full lake held back lands while the gateway runs, not only at the drain.
    if not await wait_until(lambda: not landing_problems(lake, ledger, ("raw", "curated")), 40.0, 1.0):
        problems.append(f"40 s after the devices stopped the lake still lacks records: {landing_problems(lake, ledger, ('raw', 'curated'))[:2]}")
    await stop_gracefully(sp, problems)
    entries = log_entries(sp.all_logs())
    tracebacks = [f"{e.get('msg')}: {e['exc'][-1200:]}" for e in entries if isinstance(e, dict) and e.get("exc")]
    tracebacks += [e for e in entries if isinstance(e, str) and "Traceback" in e]
    if tracebacks:
        problems.append(f"{len(tracebacks)} tracebacks in the gateway's logs; first:\n" + "\n".join(tracebacks[:2]))
    logged = collections.Counter((e.get("level"), e.get("msg")) for e in entries if isinstance(e, dict) and e.get("level") in ("WARNING", "ERROR", "CRITICAL"))
    # A full lake is a retried landing failure; any other error (a process died, a dead-letter) is not expected.
    unexpected = {k: n for k, n in logged.items() if k[0] != "WARNING" and k[1] != "landing failed; will retry"}
    if unexpected:
        problems.append(f"errors logged besides the retried landing failures: {unexpected}")
    if not any(msg == "landing failed; will retry" for _, msg in logged):
        problems.append("the gateway never logged a failed landing: the lake was not full for it")
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(
        problems,
        ledger,
        sp,
        notes=[
            f"acks while the lake was full: {acked_while_full}; answers (status, Retry-After): {answers_since(t0)}",
            f"warnings and errors logged: {dict(logged.most_common(8))}",
        ],
    )


# -- 14 -----------------------------------------------------------------------------------------


def process_of(sp: ServeProcess, role: str) -> int | None:
    """The pid of the gateway's lake process, or of one of its workers."""
    pids = lake_process_pids(sp) if role == "lake process" else worker_pids(sp)
    return pids[0] if pids else None


def beating(pid: int) -> bool:
    """Whether a supervised process has begun its heartbeat (``gateway/heartbeat.py``): until then,
    the supervisor counts it as starting, not as silent."""
    try:
        process = psutil.Process(pid)
        runtime, cmdline = Path(process.environ()["EDGE_GATEWAY_RUNTIME_DIR"]), process.cmdline()
    except (psutil.Error, KeyError):
        return False
    index = "lake" if "--lake-process" in cmdline else cmdline[cmdline.index("--worker-index") + 1]
    return (runtime / f"alive-{index}").exists()


async def two_workers_under_load(tmp_path: Path, gateways: Gateways, **listen: float):
    """Two workers and the lake process, four devices sending, small segments and objects, 20
    requests acknowledged: returns the gateway, its lake, the ledger, what stops the load, and the load."""
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        listen=listen,
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": 8 * MiB},
        lake={"target_object_bytes": 64 * KiB, "max_object_age_secs": 0.3},
    )
    await sp.astart(workers_env(2), workers=2)
    ledger = Ledger()
    stop = asyncio.Event()
    load = asyncio.create_task(
        run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.02, timeout_secs=8.0, retry_deadline_secs=40.0)
    )
    await wait_for_acks(ledger, lambda: ledger.acked_requests >= 20, budget_secs=15.0, stall_secs=8.0)
    return sp, lake, ledger, stop, load


async def acks_go_on(ledger: Ledger, problems: list[str], after: str) -> None:
    acked = ledger.acked_requests
    await asyncio.sleep(2.0)
    if ledger.acked_requests == acked:
        problems.append(f"nothing acknowledged in the 2 s after {after}: {ledger.statuses}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("role", ["worker", "lake process"])
async def test_a_stuck_process_is_killed_and_restarted_losing_nothing(tmp_path, gateways, role):
    """A worker or the lake process stopped by SIGSTOP is alive but silent: it would hold its
    connections and answer nothing, or land nothing while the WALs fill, for as long as it stays so.
    The supervisor kills it after listen.stall_timeout_secs and restarts it as if it had died, and
    every acknowledged record lands once."""
    sp, lake, ledger, stop, load = await two_workers_under_load(tmp_path, gateways, stall_timeout_secs=3.0)
    problems: list[str] = []
    stuck = None
    try:
        stuck = process_of(sp, role)
        assert stuck is not None, f"no {role} among {sp.children()}"
        # Stopped before its first beat, a process is still starting to the supervisor, never silent.
        assert await wait_until(lambda: beating(stuck), 15.0), f"the {role} (pid {stuck}) never began its heartbeat"
        os.kill(stuck, signal.SIGSTOP)
        stopped_at = time.monotonic()
        replaced = await wait_until(lambda: stuck not in sp.children() and process_of(sp, role) is not None, 20.0, 0.1)
        replaced_after = time.monotonic() - stopped_at
        if not replaced:
            problems.append(f"the stopped {role} (pid {stuck}) was not replaced within 20 s: processes {sp.children()}")
        await acks_go_on(ledger, problems, f"the {role} was replaced")
    finally:
        stop.set()
        await load
        if stuck is not None and psutil.pid_exists(stuck):
            os.kill(stuck, signal.SIGCONT)  # never leave a stopped process behind
    logged = sp.all_logs()
    if "stopped answering" not in logged:
        problems.append("the supervisor never said why it killed the process")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp, notes=[f"the {role} was replaced {replaced_after:.1f} s after SIGSTOP"])


@pytest.mark.timeout(120)
async def test_a_worker_stuck_while_starting_is_killed_and_restarted_losing_nothing(tmp_path, gateways):
    """A worker stuck before its first beat (stopped here by SIGSTOP, as one waiting on a disk or a
    lock that never answers while it recovers) is neither silent nor dead to the supervisor: it
    would hold its WAL and its share of the connections for good. Past listen.start_timeout_secs
    the supervisor kills it, says why, and starts another; every acknowledged record lands once."""
    sp, lake, ledger, stop, load = await two_workers_under_load(tmp_path, gateways, stall_timeout_secs=3.0, start_timeout_secs=4.0)
    problems: list[str] = []
    stuck = None
    try:
        killed, sibling = worker_pids(sp)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while stuck is None and time.monotonic() < deadline:  # catch its successor while it imports
            stuck = next((pid for pid in worker_pids(sp) if pid not in (killed, sibling)), None)
            await asyncio.sleep(0.005)
        assert stuck is not None, f"no worker replaced pid {killed} within 10 s: {sp.children()}"
        os.kill(stuck, signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert not beating(stuck), "the new worker began its heartbeat before it was stopped: a start too quick to catch"
        replaced = await wait_until(lambda: stuck not in sp.children() and len(worker_pids(sp)) == 2
                                    and all(beating(pid) for pid in worker_pids(sp)), 25.0, 0.1)
        replaced_after = time.monotonic() - stopped_at
        if not replaced:
            problems.append(f"the worker stuck while starting (pid {stuck}) was not replaced within 25 s: processes {sp.children()}")
        await acks_go_on(ledger, problems, "the worker was replaced")
    finally:
        stop.set()
        await load
        if stuck is not None and psutil.pid_exists(stuck):
            os.kill(stuck, signal.SIGCONT)  # never leave a stopped process behind
    if "has not finished starting" not in sp.all_logs():
        problems.append("the supervisor never said why it killed the worker")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp, notes=[f"the worker stuck while starting was replaced {replaced_after:.1f} s after SIGSTOP"])


@pytest.mark.timeout(120)
async def test_the_whole_instance_paused_kills_nothing_when_it_resumes(tmp_path, gateways):
    """The whole instance stopped (SIGSTOP to its process group, as a paused virtual machine or a
    debugger stops it) for twice listen.stall_timeout_secs, then resumed: every process was silent
    only because the supervisor was stopped with it. None may be killed for it; before, the
    supervisor woke first, found a worker silent past the limit and killed it each time."""
    sp, devices, lake = setup(tmp_path, gateways, 4, listen={"stall_timeout_secs": 2.0})
    await sp.astart(workers_env(2), workers=2)
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.05, retry_deadline_secs=30.0))
    processes = set(sp.children())
    try:
        for _ in range(3):
            await asyncio.sleep(1.0)
            os.killpg(sp.pid, signal.SIGSTOP)
            await asyncio.sleep(4.0)
            os.killpg(sp.pid, signal.SIGCONT)
        acked = ledger.acked_requests
        await asyncio.sleep(3.0)
        if ledger.acked_requests == acked:
            problems.append(f"nothing acknowledged in the 3 s after the last pause: {ledger.statuses}")
    finally:
        os.killpg(sp.pid, signal.SIGCONT)  # never leave a stopped process behind
        stop.set()
        await load
    if set(sp.children()) != processes:
        problems.append(f"processes replaced across the pauses: {sorted(processes)} before, {sorted(sp.children())} after")
    kills = [line for line in sp.all_logs().splitlines() if "stopped answering" in line]
    if kills:
        problems.append(f"the supervisor killed a process for the pause: {kills[:2]}")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


async def hold_idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` kept-alive connections, each answered one request and then left idle (a pool of clients
    that went quiet): opened 5 ms apart, as clients come, so none is shed for a deep accept queue."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # refused (503 and closed) at the cap: counted as held anyway
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        held.append(sock)
        await asyncio.sleep(0.005)
    return held


async def test_idle_connections_beyond_the_open_files_limit_keep_no_device_out(tmp_path, gateways):
    """Started with an open-files limit of 256 (soft and hard: a shell's `ulimit -n` is often 1,024,
    below connections.max_connections), 2 workers hold 500 kept-alive idle connections. Before, they
    took every descriptor: accept() failed with EMFILE and no device could connect until they closed
    (75 s idle timeout). Now each worker holds what the limit leaves (and says so at start), closing
    the connection idle longest for a new one; devices on fresh connections are served throughout."""
    sp, devices, lake = setup(tmp_path, gateways, 4)
    sp.open_files = (256, 256)
    await sp.astart(workers_env(2), workers=2)
    limits = {pid: psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE) for pid in [sp.pid, *sp.children()]}
    assert set(limits.values()) == {(256, 256)}, limits
    held = await hold_idle_connections(sp.port, 500)
    ledger = Ledger()
    problems: list[str] = []
    try:
        await asyncio.wait_for(send_numbered(sp.url, devices, ledger, 2_000), 60)
    except TimeoutError:
        problems.append("the devices' 8,000 records were not all acknowledged within 60 s")
    finally:
        for sock in held:
            sock.close()
    if len(ledger.acked) != 8_000:
        problems.append(f"{len(ledger.acked)} of 8,000 records acknowledged while the idle connections were held")
    warnings = [line for line in sp.log_text().splitlines() if "open-files limit leaves room" in line]
    if len(warnings) != 2:
        problems.append(f"expected each worker to warn once that the limit caps its connections: {warnings}")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


async def test_serve_raises_its_open_files_limit_to_the_hard_limit(tmp_path, gateways):
    """A soft limit below the hard one (as a shell sets it) is raised by every process at start, so
    connections.max_connections is not capped by an accident of how the gateway was started."""
    sp, _, _ = setup(tmp_path, gateways, 1)
    sp.open_files = (256, 8192)
    await sp.astart(workers_env(2), workers=2)
    processes = [sp.pid, *sp.children()]
    assert len(processes) == 4  # the supervisor, two workers, the lake process
    limits = {pid: psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE) for pid in processes}
    assert set(limits.values()) == {(8192, 8192)}, limits
    assert "open-files limit leaves room" not in sp.log_text()
    assert await sp.aterminate() == 0


def pipe_fill(read_end: int) -> float:
    """How full a pipe is, from its reading end: 0 empty, 1 full."""
    waiting = array.array("i", [0])
    fcntl.ioctl(read_end, termios.FIONREAD, waiting)
    return waiting[0] / fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)


async def pipe_filled(read_end: int, timeout: float) -> bool:
    """Whether the pipe fills within ``timeout``: over half full and taking nothing more for a second
    while lines keep coming. A pipe's pages take whole writes, so a full one may hold a few KiB less
    than its size (92% was seen)."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        fill = pipe_fill(read_end)
        if fill == last and fill > 0.5:
            return True
        last = fill
        await asyncio.sleep(1.0)
    return False


async def test_a_log_reader_that_stops_reading_stops_no_acknowledgement(tmp_path, gateways):
    """stderr is a pipe whose reader stops reading (a stalled log shipper, Docker's blocking log
    driver): once the pipe is full, a log line written from the event loop blocked it. Before, every
    acknowledgement and health check stopped within seconds (the access log on), and the supervisor
    replaced the silent workers, whose first line blocked too. Lines are written by a thread now."""
    sp, devices, lake = setup(tmp_path, gateways, 4, log={"level": "INFO", "access_log": True})
    read_end, sp.output = os.pipe()
    try:
        await sp.astart(workers_env(2), workers=2)
    finally:
        os.close(sp.output)
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    written = bytearray()
    load = asyncio.create_task(run_devices(sp.url, devices, ledger, stop, records_per_request=50, retry_deadline_secs=30.0))
    try:
        if not await pipe_filled(read_end, 20.0):
            problems.append(f"the log pipe never filled: {pipe_fill(read_end):.0%}")
        acked = ledger.acked_requests
        await asyncio.sleep(3.0)
        if ledger.acked_requests == acked:
            problems.append(f"nothing acknowledged in the 3 s after the log pipe filled: {dict(ledger.statuses)}")
        if (ready := readyz(sp.url)) != 200:
            problems.append(f"/readyz answered {ready} while the log pipe was full")
    finally:
        reader = asyncio.create_task(asyncio.to_thread(drain_pipe, read_end, written))
        stop.set()
        await load
        await stop_gracefully(sp, problems)
        await reader
        os.close(read_end)
    lines = written.decode(errors="replace").splitlines()
    if not any('"msg":"drained"' in line for line in lines):
        problems.append(f"the lines written before the exit never reached the reader: {lines[-3:]}")
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger)


def drain_pipe(read_end: int, into: bytearray) -> None:
    """Read until every writer has closed the pipe."""
    while chunk := os.read(read_end, 1 << 16):
        into += chunk


# -- 15 -----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_an_s3_lake_that_hangs_fails_and_refuses_loses_and_repeats_nothing(tmp_path, gateways, moto_endpoint):
    """The lake is S3 behind a proxy that breaks the ways S3 and networks do: first it hangs (every
    request held: the gateway meets its own read timeouts), and the gateway is SIGKILLed and
    restarted while it hangs; then it answers most requests 503 SlowDown or 500 InternalError; then
    it refuses connections outright; then it comes back. Devices keep sending all along: the gateway
    acknowledges while its WALs have room and answers 503 with Retry-After after that (never 500),
    and once S3 answers again every acknowledged record is in the bucket's raw and curated zones
    exactly once."""
    from aiobotocore.session import get_session

    from tests.fixtures.fault_proxy import FaultProxy, s3_error

    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    async with get_session().create_client("s3", endpoint_url=moto_endpoint, region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=bucket)
    workers = 2
    problems: list[str] = []
    ledger = Ledger()
    stop = asyncio.Event()
    phases = Phases(ledger)
    proxy = FaultProxy(moto_endpoint, seed=7)
    await proxy.start()
    sp, devices, _ = setup(
        tmp_path,
        gateways,
        4,
        inference=True,
        listen={"workers": workers},
        wal={"segment_bytes": 256 * KiB, "max_total_bytes": 2 * MiB, "retry_after_secs": 2},
        lake={"kind": "s3", "target_object_bytes": 128 * KiB, "max_object_age_secs": 0.3},
        s3={
            "bucket": bucket,
            "endpoint_url": proxy.url,
            "region": "us-east-1",
            "addressing_style": "path",
            "connect_timeout_secs": 1.0,
            "read_timeout_secs": 2.0,
        },
    )
    await sp.astart(workers=workers, timeout=30)
    load = asyncio.create_task(
        run_devices(sp.url, devices, ledger, stop, records_per_request=100, pause_secs=0.05, timeout_secs=10.0, retry_deadline_secs=60.0)
    )

    kill_window: tuple[float, float] | None = None
    try:
        await wait_for_acks(ledger, lambda: ledger.acked_requests >= 40, budget_secs=15.0, stall_secs=8.0)
        await phases.run("S3 answering", 2.0)
        proxy.delay_when, proxy.delay_secs = (lambda request: True), 60.0
        await phases.run("S3 hanging", 6.0)
        t_kill = time.monotonic()
        await sp.akill()
        await asyncio.to_thread(sp.launch)  # while S3 still hangs: start-up must not wait on it
        if not await wait_until_answering(sp, workers, 30.0):
            problems.append(f"the gateway restarted while S3 hung did not answer /readyz within 30 s:\n{sp.log_tail(1500)}")
        kill_window = (t_kill, time.monotonic())
        await phases.run("S3 hanging after the restart", 3.0)
        proxy.delay_when = None
        proxy.throttle_fraction = 0.5
        proxy.fail_when = lambda request: s3_error(500, "InternalError") if request.method == "PUT" else None
        await phases.run("S3 throttling and failing", 4.0)
        proxy.throttle_fraction, proxy.fail_when = 0.0, None
        await proxy.pause()
        await phases.run("S3 refusing connections", 4.0)
        t_back = time.monotonic()
        await proxy.resume()
        if not await wait_until(lambda: any(a.status == 202 for a in ledger.attempts_since(t_back)), 30.0, 0.1):
            problems.append(f"ingest did not resume within 30 s of S3 answering again: {ledger.statuses}")
        await phases.run("S3 answering again", 3.0)
    finally:
        stop.set()
        await load
    problems += answer_problems(ledger, kill_window)
    if not any(a.status == 503 for a in ledger.attempts):
        problems.append("no request was refused: the WALs never filled while S3 was away")
    mirror = tmp_path / "bucket"

    async def landed_everything() -> bool:
        shutil.rmtree(mirror, ignore_errors=True)
        await _mirror_bucket(moto_endpoint, bucket, mirror)
        return not landing_problems(mirror, ledger, ("raw", "curated"))

    # What S3's absence held back lands while the gateway runs, not only when it drains.
    deadline = time.monotonic() + 40.0
    while not await landed_everything() and time.monotonic() < deadline:
        await asyncio.sleep(2.0)
    await stop_gracefully(sp, problems)
    await proxy.stop()
    logged = collections.Counter(
        (e.get("level"), e.get("msg")) for e in log_entries(sp.all_logs()) if isinstance(e, dict) and e.get("level") in ("ERROR", "CRITICAL")
    )
    unexpected = {k: n for k, n in logged.items() if k[1] != "landing failed; will retry"}
    if unexpected:
        problems.append(f"errors logged besides the retried landing failures: {unexpected}")
    await landed_everything()
    problems += landing_problems(mirror, ledger, ("raw", "curated"))
    notes = [f"answers by phase: {phases}", f"S3 requests: {len(proxy.seen)}, throttled {proxy.throttled}"]
    check(problems, ledger, sp, notes=notes)


# -- 16 -----------------------------------------------------------------------------------------


async def devices_sending_to_a_wal_on(
    disk: FailingDisk,
    tmp_path: Path,
    gateways: Gateways,
    *,
    inference: bool = True,
    patience_secs: float = 10.0,
    keyless: bool = False,
    fresh_connections: bool = False,
    **sections,
):
    """A gateway (two workers, the curated zone on unless ``inference`` is off) with its WAL on
    ``disk``, and four devices sending 100-record requests with ``seq`` to it until ``stop`` is set,
    each waiting ``patience_secs`` for an answer; with ``keyless``, the fourth sends records without
    one; with ``fresh_connections``, each request comes on a new connection (so every worker gets some)."""
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        4,
        inference=inference,
        listen={"workers": 2, **sections.pop("listen", {})},
        wal={"dir": str(disk.mountpoint / "wal"), "segment_bytes": 256 * KiB, "max_total_bytes": 4 * MiB, "retry_after_secs": 1},
        lake={"target_object_bytes": 128 * KiB, "max_object_age_secs": 0.3},
        **sections,
    )
    await sp.astart(workers=2, timeout=30)
    ledger = Ledger()
    stop = asyncio.Event()
    numbered, keyless_devices = (devices[:3], devices[3:]) if keyless else (devices, [])
    load = asyncio.gather(
        run_devices(
            sp.url,
            numbered,
            ledger,
            stop,
            records_per_request=100,
            pause_secs=0.05,
            timeout_secs=patience_secs,
            retry_deadline_secs=60.0,
            fresh_connections=fresh_connections,
        ),
        *(keyless_bodies(sp.url, device, ledger, stop, timeout_secs=patience_secs) for device in keyless_devices),
    )
    return sp, lake, ledger, stop, load


async def keyless_bodies(url: str, device: Device, ledger: Ledger, stop: asyncio.Event, *, timeout_secs: float) -> None:
    """A device whose records carry no ``seq``: only its body's digest tells a resend from new data."""
    tag = uuid.uuid4().hex[:6]
    async with DeviceClient(url, device, ledger, timeout_secs=timeout_secs, retry_deadline_secs=60.0) as client:
        n = 0
        while not stop.is_set():
            await client.send(device.records(20, with_seq=False, probe_prefix=f"{tag}-{n}"))
            n += 1
            await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_failing_fsyncs_refuse_what_they_covered_and_lose_nothing(tmp_path, gateways, failing_disk):
    """The WAL's disk fails fsyncs, through the kernel, for every process of the gateway: first a
    few of the WAL's own, then every fsync for seconds on end, then again with the gateway SIGKILLed
    and started while the disk still fails. A request whose fsync failed is never acknowledged (the
    device sends it again); when the disk works again the running gateway acknowledges again by
    itself; one that could not start says why and exits non-zero, and starts once the disk works
    (as its service manager starts it again). Every acknowledged record lands in raw and curated once."""
    sp, lake, ledger, stop, load = await devices_sending_to_a_wal_on(failing_disk, tmp_path, gateways)
    problems: list[str] = []
    phases = Phases(ledger)

    async def resumes(after: float, what: str) -> None:
        if not await wait_until(lambda: any(a.status == 202 for a in ledger.attempts_since(after)), 20.0, 0.1):
            problems.append(f"nothing acknowledged within 20 s of {what}: {ledger.statuses}")

    kill_window: tuple[float, float] | None = None
    start_refused = ""
    try:
        await wait_for_acks(ledger, lambda: ledger.acked_requests >= 40, budget_secs=15.0, stall_secs=8.0)
        failing_disk.fail_next(3, only=".wal")
        await phases.run("three of the WAL's fsyncs failing", 3.0)
        failing_disk.fail_always()
        await phases.run("every fsync failing", 4.0)
        t = time.monotonic()
        failing_disk.heal()
        await resumes(t, "the disk healing")
        await phases.run("healed", 3.0)
        failing_disk.fail_always()
        await phases.run("failing again", 2.0)
        t_kill = time.monotonic()
        await sp.akill()
        await asyncio.to_thread(sp.launch)
        await phases.run("started on the failing disk", 4.0)
        if not sp.running():
            start_refused = sp.log_text()
            await asyncio.to_thread(sp.launch)  # systemd's Restart=on-failure, after the disk healed
        t = time.monotonic()
        failing_disk.heal()
        await resumes(t, "the disk healing after the restart")
        kill_window = (t_kill, time.monotonic())
        await phases.run("healed again", 3.0)
    finally:
        stop.set()
        await load
    if start_refused and not ("the gateway cannot start" in start_refused and "Input/output error" in start_refused and "Traceback" in start_refused):
        problems.append(f"the gateway that could not start on the failing disk did not say where it failed:\n{start_refused[-1500:]}")
    for name in ("three of the WAL's fsyncs failing", "every fsync failing"):
        if not phases.answers.get(name, {}).get(503):
            problems.append(f"no request was refused while {name}: {dict(phases.answers.get(name, {}))}")
    problems += answer_problems(ledger, kill_window)
    if failing_disk.failed < 10:
        problems.append(f"only {failing_disk.failed} fsyncs failed: the scenario did not happen")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(problems, ledger, sp, notes=[f"answers by phase: {phases}", f"fsyncs failed: {failing_disk.failed}"])


@pytest.mark.timeout(180)
async def test_failing_reads_and_writes_of_the_wal_lose_nothing(tmp_path, gateways, failing_disk):
    """The WAL's disk fails reads (the lake process cannot read what it lands) and then writes (the
    workers cannot append): landing waits and reads again, a request whose write failed is rolled
    back and answered 503, and when the disk works again everything acknowledged lands once, without
    a restart."""
    sp, lake, ledger, stop, load = await devices_sending_to_a_wal_on(failing_disk, tmp_path, gateways)
    problems: list[str] = []
    phases = Phases(ledger)
    try:
        await wait_for_acks(ledger, lambda: ledger.acked_requests >= 40, budget_secs=15.0, stall_secs=8.0)
        failing_disk.fail_always(".wal", call="read")
        await phases.run("reads failing", 5.0)
        failing_disk.heal()
        await phases.run("healed", 3.0)
        # The WALs filled while nothing could land: a request is refused (503, WAL full) before any
        # write until the lake has caught up, and a write that fails must be one that was tried.
        if not await wait_until(lambda: accepted_lately(ledger, 1.0), 30.0, 0.2):
            problems.append(f"requests were still refused 30 s after the disk healed: {phases}")
        failing_disk.fail_always(".wal", call="write")
        await phases.run("writes failing", 3.0)
        # On a busy machine the lake may still be catching up, every request refused as the WAL is
        # full before any write is tried: the disk stays failing until one was.
        if not await wait_until(lambda: "WAL: a write failed" in sp.all_logs(), 20.0, 0.2):
            problems.append(f"no write was tried while the WAL's writes failed: {phases}")
        failing_disk.heal()
        await phases.run("healed again", 3.0)
    finally:
        stop.set()
        await load
    if not phases.answers.get("writes failing", {}).get(503):
        problems.append(f"no request was refused while the WAL's writes failed: {phases}")
    for name in ("healed", "healed again"):
        if not phases.answers.get(name, {}).get(202):
            problems.append(f"nothing acknowledged once the disk {name}: {phases}")
    problems += answer_problems(ledger, None)
    if not await wait_until(lambda: not landing_problems(lake, ledger, ("raw", "curated")), 40.0, 1.0):
        problems.append("40 s after the devices stopped the lake still lacks records")
    await stop_gracefully(sp, problems)
    logged = collections.Counter(
        e.get("msg") for e in log_entries(sp.all_logs()) if isinstance(e, dict) and e.get("level") in ("ERROR", "CRITICAL")
    )
    expected = {"reading or preparing frames failed; will read them again", "WAL: a write failed; the request was rolled back and refused"}
    if set(logged) != expected:
        problems.append(f"errors logged: {dict(logged)}; expected exactly these: {sorted(expected)}")
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(problems, ledger, sp, notes=[f"answers by phase: {phases}", f"calls failed: {failing_disk.failed}"])


@pytest.mark.timeout(240)
async def test_bursts_of_disk_failures_across_kills_and_worker_changes_lose_nothing(tmp_path, gateways, failing_disk):
    """The WAL's disk fails in bursts (the next 1-4 fsyncs, fdatasyncs, reads or writes, or all of
    them for up to 3 s; seeded) while the gateway is SIGKILLed and restarted with 2, 3, 1 and 2
    workers and its small WALs wrap many times over: every acknowledged record lands in raw and
    curated once, and no answer is a 500."""
    rng = random.Random(5)
    sp, lake, ledger, stop, load = await devices_sending_to_a_wal_on(failing_disk, tmp_path, gateways)
    problems: list[str] = []
    bursts: collections.Counter = collections.Counter()
    kill_windows: list[tuple[float, float]] = []
    try:
        for phase, workers in enumerate((2, 3, 1, 2)):
            if phase:
                t_kill = time.monotonic()
                await sp.akill()
                await sp.astart(workers_env(workers), workers=workers, timeout=30)
                kill_windows.append((t_kill, time.monotonic()))
            phase_ends = time.monotonic() + 10.0
            while time.monotonic() < phase_ends:
                await asyncio.sleep(rng.uniform(1.0, 2.5))
                call = rng.choice(["fsync", "fdatasync", "read", "write"])
                if rng.random() < 0.5:
                    failing_disk.fail_next(rng.randint(1, 4), ".wal", call=call)
                    bursts[(call, "next")] += 1
                else:
                    failing_disk.fail_always(".wal", call=call)
                    bursts[(call, "always")] += 1
                    await asyncio.sleep(rng.uniform(0.5, 3.0))
                    failing_disk.heal()
            failing_disk.heal()
    finally:
        stop.set()
        await load
    wrong = collections.Counter(
        a.status
        for a in ledger.attempts
        if a.status not in (202, 503) and not any(a.started <= end and a.started + a.latency >= begin for begin, end in kill_windows)
    )
    if wrong:
        problems.append(f"answers other than 202 or 503 away from the SIGKILLs: {dict(wrong)}")
    if ledger.acked_bytes < 5 * 4 * MiB:  # each worker's WAL holds 4 MiB
        problems.append(f"only {ledger.acked_bytes / MiB:.1f} MiB acknowledged: the WALs did not wrap often enough")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw", "curated"))
    check(problems, ledger, sp, notes=[f"bursts: {dict(bursts)}", f"calls failed: {failing_disk.failed}"])


@pytest.mark.timeout(300)
async def test_lives_with_settings_and_faults_drawn_at_random_lose_and_repeat_nothing(tmp_path, gateways, small_filesystem):
    """Each life draws its settings (workers, where landing runs, the curated zone, WAL segment and
    capacity), is struck by faults drawn during it (the WAL's disk full for a moment, the lake process
    or a worker SIGKILLed, SIGHUP) and ends by SIGKILL of the group or SIGTERM. Found this way: a
    restart on a disk still full did not start. Every acked record is once in raw at the end."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    walfs = small_filesystem(tmp_path / "walfs", 24 * MiB)
    sp, devices, lake = setup(
        tmp_path,
        gateways,
        6,
        inference=True,
        wal={"dir": str(walfs / "wal"), "segment_bytes": 512 * KiB, "max_total_bytes": 4 * MiB, "retry_after_secs": 1},
        lake={"target_object_bytes": 256 * KiB, "max_object_age_secs": 0.5},
    )
    ledger = Ledger()
    stop = asyncio.Event()
    problems: list[str] = []
    lives: list[str] = []
    load: asyncio.Task | None = None
    try:
        for life in range(7):
            workers = rng.choice([1, 2, 3])
            env = workers_env(workers) | {
                "EDGE_GATEWAY__LAKE__LANDING": rng.choice(["process", "worker"]),
                "EDGE_GATEWAY__INFERENCE__ENABLED": rng.choice(["true", "false"]),
                "EDGE_GATEWAY__WAL__SEGMENT_BYTES": str(rng.choice([256, 512, 1024]) * KiB),
                "EDGE_GATEWAY__WAL__MAX_TOTAL_BYTES": str(rng.choice([2, 3, 4]) * MiB),
            }
            try:
                await sp.astart(env, workers=workers, timeout=30)
            except RuntimeError as exc:
                problems.append(f"life {life} did not start: {exc}")
                break
            if load is None:
                load = asyncio.create_task(
                    run_devices(sp.url, devices, ledger, stop, records_per_request=50, pause_secs=0.02, retry_deadline_secs=60.0)
                )
            faults = []
            life_ends = time.monotonic() + rng.uniform(3.0, 5.0)
            while time.monotonic() < life_ends:
                await asyncio.sleep(rng.uniform(0.5, 1.2))
                fault = rng.choice(["disk full", "lake process", "worker", "sighup", "none"])
                if fault == "disk full":
                    async with Ballast(walfs):
                        await asyncio.sleep(rng.uniform(0.5, 1.5))
                elif fault == "lake process" and lake_process_pids(sp):
                    os.kill(lake_process_pids(sp)[0], signal.SIGKILL)
                elif fault == "worker" and worker_pids(sp):
                    os.kill(rng.choice(worker_pids(sp)), signal.SIGKILL)
                elif fault == "sighup":
                    os.kill(sp.pid, signal.SIGHUP)
                faults.append(fault)
            ending = rng.choice(["SIGKILL", "SIGKILL", "SIGTERM"])
            lives.append(f"{env} {faults} {ending}")
            if ending == "SIGKILL":
                await sp.akill()
            else:
                await stop_gracefully(sp, problems, f"SIGTERM (life {life})")
        if not problems:
            await sp.astart(workers_env(2), workers=2, timeout=30)
            await asyncio.sleep(2.0)
    finally:
        stop.set()
        if load is not None:
            await load
    await stop_gracefully(sp, problems, "the last SIGTERM")
    if len(ledger.acked) < 100_000:
        problems.append(f"only {len(ledger.acked)} records acknowledged: too little load to judge")
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp, notes=[f"drawn with random.Random({seed}): " + "; ".join(lives)])



@pytest.mark.timeout(180)
async def test_a_worker_killed_while_stuck_in_the_kernel_holds_up_no_other_restart(tmp_path, gateways, failing_disk):
    """A worker whose WAL fsync hangs on its disk and whose event loop has stopped (SIGSTOP here) is
    killed by the watchdog, but the kernel lets it exit only when the fsync returns (a FUSE request
    already taken by the file system waits uninterruptibly). The supervisor once waited for it, and
    restarted nothing meanwhile: a sibling that died then stayed dead. Now the sibling is restarted
    at once, the stuck worker once it exits, and every acknowledged record lands once."""
    hang = 20.0  # how long worker 0's fsyncs take: it outlives its SIGKILL by about this much
    # Fresh connections: kept-alive ones could all go to worker 1, leaving worker 0 nothing to fsync.
    sp, lake, ledger, stop, load = await devices_sending_to_a_wal_on(
        failing_disk, tmp_path, gateways, inference=False, fresh_connections=True, listen={"stall_timeout_secs": 2.0}
    )
    problems: list[str] = []
    stuck = None
    try:
        await wait_for_acks(ledger, lambda: ledger.acked_requests >= 20, budget_secs=15.0, stall_secs=8.0)
        stuck, sibling = worker_with_index(sp, 0), worker_with_index(sp, 1)
        assert stuck and sibling, f"workers 0 and 1 not found among {sp.children()}"
        # Worker 0's segments only: the lake process fsyncs worker 0's zone state under w0 too, and a
        # slow fsync of its own would say nothing about where worker 0 is.
        failing_disk.slow_fsyncs(hang, only=f"{os.sep}w0{os.sep}segments{os.sep}")
        in_fsync = await wait_until(lambda: failing_disk.slowed > 0, 10.0, 0.05)
        assert in_fsync, "worker 0 began no fsync in 10 s: it had nothing to write"
        os.kill(stuck, signal.SIGSTOP)
        killed = await wait_until(lambda: "stopped answering" in sp.all_logs(), 10.0, 0.1)
        assert killed, "the watchdog did not kill the stopped worker"
        said = await wait_until(lambda: "stuck in the kernel" in sp.all_logs(), 10.0, 0.1)
        if not said:
            problems.append("the supervisor never said the killed worker had not exited")
        if not psutil.pid_exists(stuck):
            check([*problems, "the killed worker exited at once: its fsync was not stuck"], ledger, sp)
        os.kill(sibling, signal.SIGKILL)
        restarted = await wait_until(lambda: worker_with_index(sp, 1) not in (None, sibling), 5.0, 0.1)
        if not restarted:
            problems.append("worker 1, killed while worker 0 was stuck in the kernel, was not restarted within 5 s")
        elif not psutil.pid_exists(stuck):
            problems.append("worker 0 exited before worker 1 was restarted: the test did not show a restart while it was stuck")
        failing_disk.slow_fsyncs(0)
        if not await wait_until(lambda: worker_with_index(sp, 0) not in (None, stuck), hang + 10.0, 0.2):
            problems.append(f"worker 0 was not restarted once it exited: processes {sp.children()}")
        await acks_go_on(ledger, problems, "both workers were restarted")
    finally:
        stop.set()
        await load
        failing_disk.slow_fsyncs(0)
        if stuck is not None and psutil.pid_exists(stuck):
            os.kill(stuck, signal.SIGCONT)  # never leave a stopped process behind
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "keyless"])
async def test_a_request_resent_as_it_was_sent_after_a_kill_left_it_unanswered_is_taken_once(tmp_path, gateways, failing_disk, keyed):
    """A device resends exactly the bytes it sent, signature and all (signed again within the same
    second gives the same one, and some firmware never signs a retry again), after the gateway died
    with the request unanswered: its WAL append waited behind an fsync taking seconds when a kill -9
    came. Its retry key (its Idempotency-Key, or else its body's hash, which the dead sending claimed
    in the retry ledger) runs it once whoever sends it, so the resend is taken (202), a second resend
    gets the same answer, and its records land once. (Before, the replay guard still held the dead
    request's signature, kept across the restart: 401, which a device may take for a revoked key.)"""
    sp, devices, lake = setup(tmp_path, gateways, 1, listen={"workers": 1}, wal={"dir": str(failing_disk.mountpoint / "wal")})
    device = devices[0]
    problems: list[str] = []
    await sp.astart(workers=1, timeout=30)
    sent: dict[str, tuple[bytes, dict[str, str]]] = {}

    def new_request(key: str) -> tuple[bytes, dict[str, str]]:
        body = ndjson(device.records(20))
        sent[key] = (body, {**device.headers_for(body), "Idempotency-Key": key} if keyed else device.headers_for(body))
        return sent[key]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:

        async def post(key: str) -> tuple[int | str, bytes]:
            body, headers = sent[key]
            try:
                async with http.post(f"{sp.url}/v1/telemetry", data=body, headers=headers) as response:
                    return response.status, await response.read()
            except aiohttp.ClientError as exc:
                return type(exc).__name__, b""

        new_request("before")
        assert (await post("before"))[0] == 202
        failing_disk.slow_fsyncs(3.0, only=f"{os.sep}segments{os.sep}")
        new_request("in-fsync")
        in_fsync = asyncio.create_task(post("in-fsync"))
        assert await wait_until(lambda: failing_disk.slowed > 0, 10.0), "the request began no fsync"
        new_request("queued")
        queued = asyncio.create_task(post("queued"))
        await asyncio.sleep(0.5)  # received, verified, its signature claimed: waiting for the WAL
        await sp.akill()
        unanswered = await asyncio.gather(in_fsync, queued)
        if any(status == 202 for status, _ in unanswered):
            problems.append(f"a request was answered before the kill: the test reached nothing ({unanswered})")
        failing_disk.slow_fsyncs(0)
        await sp.astart(workers=1, timeout=30)
        for key in ("in-fsync", "queued"):
            first, again = await post(key), await post(key)
            if first[0] != 202 or again != first:
                problems.append(f"the {key} request resent as sent: {first[0]} {first[1][:160]!r}, then {again[0]}, not 202 twice with one answer")
    await stop_gracefully(sp, problems)
    landed = lake_counts(lake, ("raw",))["raw"]
    for key, (body, _) in sent.items():
        counts = [landed[(device.device_id, orjson.loads(line)["seq"])] for line in body.splitlines()]
        if counts != [1] * len(counts):
            problems.append(f"the {key} request's records landed {collections.Counter(counts)} times, not once each")
    check(problems, Ledger(), sp)


def worker_with_index(sp: ServeProcess, index: int) -> int | None:
    for pid in worker_pids(sp):
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        # A process that died since it was listed reads as a zombie, with no command line.
        if "--worker-index" in cmdline and cmdline[cmdline.index("--worker-index") + 1] == str(index):
            return pid
    return None


@pytest.mark.timeout(240)
async def test_fsyncs_that_take_seconds_time_devices_out_and_land_nothing_twice(tmp_path, gateways, failing_disk):
    """The WAL's disk degrades: each fsync takes seconds, longer than the devices wait for an answer,
    so every request in flight times out and is sent again while the first is still being made
    durable; then a SIGTERM whose drain deadline passes mid-fsync, and a SIGKILL mid-fsync followed
    at once by a start (the dead gateway's lock lingers until its last fsync returns: the start waits
    for it). Devices with ``seq`` and one whose records carry none (only its body's digest dedups its
    resends): every acknowledged record lands once, and no request gets an error. (Requests whose
    handlers the cut-short drain cancelled were once committed empty and their records acknowledged
    to the retries as duplicates: 100 records missing, in one run of eight.)"""
    patience = 1.0  # what a device waits for an answer: less than one slow fsync
    sp, lake, ledger, stop, load = await devices_sending_to_a_wal_on(
        failing_disk, tmp_path, gateways, inference=False, patience_secs=patience, keyless=True, drain={"deadline_secs": 1.5}
    )
    problems: list[str] = []
    phases = Phases(ledger)
    exits: list[int] = []
    try:
        await wait_for_acks(ledger, lambda: ledger.acked_requests >= 30, budget_secs=15.0, stall_secs=8.0)
        failing_disk.slow_fsyncs(2.5)
        await phases.run("fsyncs taking 2.5 s", 4.0)
        failing_disk.slow_fsyncs(0)
        await phases.run("fast again", 2.0)
        failing_disk.slow_fsyncs(3.0)
        await asyncio.sleep(1.0)
        exits.append(await sp.aterminate(timeout=60))  # the drain's 1.5 s pass inside a 3 s fsync
        failing_disk.slow_fsyncs(0)
        await sp.astart(workers=2, timeout=30)
        await phases.run("after a drain cut short", 2.0)
        failing_disk.slow_fsyncs(3.0)
        await asyncio.sleep(1.0)
        await sp.akill()
        failing_disk.slow_fsyncs(0)
        await sp.astart(workers=2, timeout=30)
        await phases.run("after a SIGKILL mid-fsync", 2.0)
    finally:
        stop.set()
        await load
    if exits != [0]:
        problems.append(f"the SIGTERM whose drain deadline passed exited with {exits}, not 0")
    if not any(a.status == "timeout" for a in ledger.attempts):
        problems.append(f"no device timed out: the fsyncs were not slow enough for this scenario ({ledger.statuses})")
    # Waiting out a slow fsync is right, and a stop closes connections: anything else is wrong.
    wrong = collections.Counter(a.status for a in ledger.attempts if a.status not in (202, 503, "timeout", "connection"))
    if wrong:
        problems.append(f"answers other than 202, 503, a device's timeout or a closed connection: {dict(wrong)}")
    if sum(1 for a in ledger.attempts if a.status == 503 and a.retry_after is None):
        problems.append("answers 503 came without Retry-After")
    await stop_gracefully(sp, problems)
    problems += landing_problems(lake, ledger, ("raw",))
    check(problems, ledger, sp, notes=[f"answers by phase: {phases}"])
