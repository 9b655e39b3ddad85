"""The runbook's five steps, run for real against the fleet, each with its checks and figures.

    1 precheck        every instance ready; error rate and WAL backlog under thresholds
    2 planned_shift   SIGTERM zone a: readiness 503, HAProxy moves devices, requests finish, WAL lands
    3 unplanned_loss  SIGKILL zone b under load; devices fail over to zone c
    4 restore         restart a and b on their own WALs; ready, backlog landed, traffic rebalanced
    5 postcheck       every acknowledged (device_id, seq) once per zone; delayed records counted

A blocking alarm (runbook ``blocking``) that fires during step 2 or 3 ends that step at once and
the drill goes straight to step 4, as the cloud drill's Catch goes to its rollback.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.drill.devices import Attempt, Clock, Devices, Key, Request
from gateway.drill.fleet import Fleet, http_status, serving
from gateway.drill.lake import LakeIndex
from gateway.drill.monitor import Monitor
from gateway.drill.runbook import Runbook
from gateway.drill.settings import DrillSettings


@dataclass
class Check:
    name: str
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    unit: str = ""
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit


@dataclass
class StepResult:
    id: str
    title: str
    started: float | None = None
    ended: float | None = None
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    rolled_back_early: str = ""  # the blocking alarm that ended the step

    @property
    def passed(self) -> bool:
        return not self.skipped and not self.rolled_back_early and all(c.passed for c in self.checks)

    def check(self, name: str, value: float | None, limit: float, op: str = "<=", unit: str = "", detail: str = "") -> Check:
        c = Check(name, None if value is None else round(float(value), 3), limit, op, unit, detail)
        self.checks.append(c)
        return c


@dataclass
class Drill:
    """What every step works with."""

    settings: DrillSettings
    runbook: Runbook
    clock: Clock
    fleet: Fleet
    devices: Devices
    monitor: Monitor
    lake: LakeIndex
    http: aiohttp.ClientSession
    events: list[tuple[float, str]] = field(default_factory=list)
    kill_at: float | None = None
    acked_before_kill: set[Key] = field(default_factory=set)

    def event(self, text: str) -> float:
        t = self.clock.now()
        self.events.append((round(t, 3), text))
        return t

    def threshold(self, step: str, name: str) -> float:
        return self.runbook.threshold(step, name)

    # -- what the devices saw -------------------------------------------------------------------

    def attempts(self, start: float, end: float | None = None) -> list[tuple[Request, Attempt]]:
        """Attempts whose answer (or failure) came in ``[start, end]``."""
        return [(r, a) for r, a in self.devices.attempts() if a.ended >= start and (end is None or a.ended <= end)]

    def error_rate_percent(self, start: float, end: float) -> tuple[float, int]:
        """Device-visible 5xx and lost connections per attempt, as the ALB's target 5xx ratio counts them."""
        window = [a for _, a in self.attempts(start, end)]
        if not window:
            return 0.0, 0
        errors = sum(1 for a in window if isinstance(a.status, str) or a.status >= 500)
        return 100.0 * errors / len(window), len(window)

    def blocking_breach(self) -> str:
        """The first blocking alarm in ALARM now, or ""."""
        b = self.runbook.blocking
        now = self.clock.now()
        rate, n = self.error_rate_percent(now - b.error_rate_window_secs, now)
        if n and rate > b.device_error_rate_percent:
            return (f"device error rate {rate:.1f}% over the last {b.error_rate_window_secs:g} s "
                    f"(> {b.device_error_rate_percent:g}%, {n} attempts)")
        sample = self.monitor.latest()
        for zone, inst in (sample.instances.items() if sample else ()):
            if not inst.scraped:
                continue
            if inst.wal_fill_percent > b.wal_fill_percent:
                return f"zone {zone} WAL {inst.wal_fill_percent:.0f}% full (> {b.wal_fill_percent:g}%)"
            if inst.oldest_age_secs > b.wal_oldest_unlanded_age_secs:
                return f"zone {zone} oldest unlanded record {inst.oldest_age_secs:.0f} s old (> {b.wal_oldest_unlanded_age_secs:g} s)"
        return ""

    async def observe(self, until: float, *, alarms: bool) -> str:
        """Wait until drill time ``until``; with ``alarms``, return early with the first blocking breach."""
        interval = self.settings.timing.sample_interval_secs
        while self.clock.now() < until:
            await asyncio.sleep(min(interval, max(0.0, until - self.clock.now())))
            if alarms:
                breach = self.blocking_breach()
                if breach:
                    self.event(f"blocking alarm: {breach}")
                    return breach
        return ""

    def lb_change(self, zone: str, after: float, *, to_serving: bool) -> float | None:
        """Drill time of the first sample after ``after`` where HAProxy (stopped / started) sending to ``zone``."""
        for sample in self.monitor.samples:
            if sample.t < after:
                continue
            state = sample.instances[zone].lb_state
            if state and serving(state) == to_serving:
                return sample.t
        return None

    def redispatched(self, zone: str, start: float) -> int:
        """Requests HAProxy moved from ``zone`` to another instance (its connection refused) since ``start``."""
        values = [s.instances[zone].redispatched for s in self.monitor.samples if s.t >= start and s.instances[zone].lb_state]
        before = [s.instances[zone].redispatched for s in self.monitor.samples if s.t < start and s.instances[zone].lb_state]
        return (max(values) - (before[-1] if before else 0)) if values else 0

    def ready_zones(self) -> list[str]:
        sample = self.monitor.latest()
        if sample is None:
            return []
        return [z for z, i in sample.instances.items() if i.running and serving(i.lb_state)]

    def landed_keys(self, zone_name: str, lake_zone: str) -> set[Key]:
        self.lake.refresh()
        return self.lake.count(lake_zone, gateway_id=self.fleet[zone_name].gateway_id).keys()


def statuses(attempts: Iterable[Attempt]) -> dict[str, int]:
    counts = collections.Counter(str(a.status) for a in attempts)
    return dict(sorted(counts.items()))


async def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await asyncio.to_thread(predicate):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)


# -- 1 -------------------------------------------------------------------------------------------


async def precheck(d: Drill, result: StepResult) -> None:
    start = d.clock.now()
    await d.observe(start + d.settings.timing.precheck_secs, alarms=False)
    end = d.clock.now()
    ready = 0
    for zone in d.fleet.zones:
        if d.fleet[zone].running() and await http_status(d.http, d.fleet[zone].url + "/readyz") == 200 \
                and zone in d.ready_zones():
            ready += 1
    rate, n = d.error_rate_percent(start, end)
    sample = d.monitor.latest()
    backlog = max((i.backlog_bytes for i in sample.instances.values() if i.scraped), default=None) if sample else None
    result.figures.update({"window_secs": round(end - start, 2), "attempts": n,
                           "statuses": statuses(a for _, a in d.attempts(start, end))})
    result.check("ready instances (own /readyz and HAProxy)", ready, d.threshold("precheck", "min_ready_instances"), ">=")
    result.check("device error rate", rate, d.threshold("precheck", "max_error_rate_percent"), unit="%")
    result.check("largest WAL backlog", backlog, d.threshold("precheck", "max_wal_backlog_bytes"), unit="bytes")
    breach = d.blocking_breach()
    result.check("blocking alarms in ALARM", 1 if breach else 0, 0, detail=breach)


# -- 2 -------------------------------------------------------------------------------------------


async def planned_shift(d: Drill, result: StepResult) -> None:
    zone = d.runbook.zones.shifted
    instance = d.fleet[zone]
    deadline = d.settings.fleet.drain_deadline_secs + 30
    start_no = instance.starts
    t0 = d.event(f"SIGTERM zone {zone} (drain)")
    instance.terminate()
    exited: dict[str, Any] = {}

    async def wait_exit() -> None:
        exited["code"] = await asyncio.to_thread(instance.wait_exit, deadline)
        exited["t"] = d.clock.now()
        d.event(f"zone {zone} exited with {exited['code']}")

    exit_task = asyncio.create_task(wait_exit())
    breach = await d.observe(t0 + d.settings.timing.planned_shift_secs, alarms=True)
    await exit_task
    end = d.clock.now()
    result.rolled_back_early = breach

    window = d.attempts(t0, end)
    reached = [a.ended for _, a in window if a.served_by == zone]
    shift_secs = (max(reached) - t0) if reached else 0.0
    lb_out = d.lb_change(zone, t0, to_serving=False)
    failures = [a for _, a in window if a.status != 202]
    unretried = [a for a in failures if a.status != 503]
    abandoned = [r for r in {id(r): r for r, _ in window}.values() if r.gave_up]
    drained = instance.drain_report(start_no)
    acked_here = d.devices.acked_keys(by=zone)
    missing = {z: len(acked_here - d.landed_keys(zone, z)) for z in ("raw", "curated")} if exited.get("code") is not None else {}
    result.figures.update({
        "shift_secs": round(shift_secs, 3),
        "balancer_stopped_sending_secs": None if lb_out is None else round(lb_out - t0, 3),
        "drain_secs": None if "t" not in exited or exited["code"] is None else round(exited["t"] - t0, 3),
        "exit_code": exited.get("code"),
        "requests_reaching_zone_after_sigterm": len(reached),
        "requests_haproxy_moved_to_another_zone": d.redispatched(zone, t0),
        "device_errors": statuses(failures),
        "records_acked_by_zone": len(acked_here),
        "acked_records_missing_from_lake_after_drain": missing,
    })
    result.check(f"seconds until no device request reaches zone {zone}", shift_secs,
                 d.threshold("planned_shift", "max_shift_secs"), unit="s")
    result.check("device-visible errors other than retried 503", len(unretried),
                 d.threshold("planned_shift", "max_unretried_errors"), detail=str(statuses(unretried)) if unretried else "")
    result.check("requests devices gave up", len(abandoned), d.threshold("planned_shift", "max_abandoned_requests"))
    result.check(f"ready instances outside zone {zone}", len([z for z in d.ready_zones() if z != zone]),
                 d.threshold("planned_shift", "min_ready_outside_shifted_zone"), ">=")
    result.check(f"zone {zone} drained within its deadline and landed its WAL", 1 if (exited.get("code") == 0 and drained) else 0,
                 1, ">=", detail=f"exit code {exited.get('code')}, drain report landed_everything={drained}")
    result.check(f"records acknowledged by zone {zone} missing from the lake after its drain",
                 sum(missing.values()) if missing else None, 0)


# -- 3 -------------------------------------------------------------------------------------------


async def unplanned_loss(d: Drill, result: StepResult) -> None:
    zone = d.runbook.zones.lost
    d.acked_before_kill = d.devices.acked_keys(by=zone)
    t1 = d.kill_at = d.event(f"SIGKILL zone {zone} (every process of the instance)")
    await d.fleet.kill(zone)
    breach = await d.observe(t1 + d.settings.timing.unplanned_loss_secs, alarms=True)
    end = d.clock.now()
    result.rolled_back_early = breach

    window = d.attempts(t1, end)
    failures = [a for _, a in window if a.status != 202]
    recovered_at = max((a.ended for a in failures), default=t1)
    recovery_secs = recovered_at - t1
    lb_out = d.lb_change(zone, t1, to_serving=False)
    # Goodput once recovered (over at least the step's last two seconds): requests acknowledged per
    # request offered in the same window.
    g_start = min(recovered_at, end - 2.0)
    requests = list(d.devices.requests())
    acked = sum(1 for r in requests if r.acked and g_start <= r.acked_at <= end)
    offered = max(1, sum(1 for r in requests if g_start <= r.scheduled <= end))
    abandoned = [r for r in {id(r): r for r, _ in window}.values() if r.gave_up]
    ambiguous = [r for r in {id(r): r for r, _ in window}.values() if r.ambiguous]
    result.figures.update({
        "recovery_secs": round(recovery_secs, 3),
        "balancer_stopped_sending_secs": None if lb_out is None else round(lb_out - t1, 3),
        "requests_haproxy_moved_to_another_zone": d.redispatched(zone, t1),
        "device_errors": statuses(failures),
        "requests_with_an_ambiguous_attempt": len(ambiguous),
        "records_acked_by_zone_before_the_loss": len(d.acked_before_kill),
        "goodput_window_secs": round(end - g_start, 2),
    })
    result.check("seconds until every device request succeeds again", recovery_secs,
                 d.threshold("unplanned_loss", "max_recovery_secs"), unit="s")
    result.check("acknowledged per offered requests once recovered", 100.0 * acked / offered,
                 d.threshold("unplanned_loss", "min_goodput_percent"), ">=", unit="%")
    result.check("requests devices gave up", len(abandoned), d.threshold("unplanned_loss", "max_abandoned_requests"))


# -- 4 -------------------------------------------------------------------------------------------


async def restore(d: Drill, result: StepResult) -> None:
    zones = [z for z in (d.runbook.zones.shifted, d.runbook.zones.lost) if not d.fleet[z].running()]
    t2 = d.event(f"restart zones {', '.join(zones) or '(none down)'} on their own WAL directories")
    for zone in zones:
        d.fleet[zone].launch()
    ready_limit = d.threshold("restore", "max_ready_secs")

    async def ready(zone: str) -> float | None:
        try:
            await d.fleet[zone].wait_ready(d.http, ready_limit)
        except Exception as exc:  # noqa: BLE001 - reported as the check's detail
            result.notes.append(f"zone {zone}: {exc}")
            return None
        return d.clock.now() - t2

    ready_secs = dict(zip(zones, await asyncio.gather(*(ready(z) for z in zones))))
    for zone, secs in ready_secs.items():
        result.check(f"zone {zone} ready (/readyz 200) after restart", secs, ready_limit, unit="s")

    # The lost zone's WAL replays and lands what it acknowledged before it was lost.
    lost = d.runbook.zones.lost
    backlog_limit = d.threshold("restore", "max_backlog_landed_secs")

    def backlog_landed() -> bool:
        return all(not (d.acked_before_kill - d.landed_keys(lost, z)) for z in ("raw", "curated"))

    # Traffic rebalances: every zone gets its share of device requests again.
    share_limit = d.threshold("restore", "min_share_percent")
    rebalance_limit = d.threshold("restore", "max_rebalance_secs")
    shares: dict[str, float] = {}

    def rebalanced() -> bool:
        now = d.clock.now()
        served = collections.Counter(a.served_by for _, a in d.attempts(now - 2.0, now))
        total = sum(served.values())
        shares.clear()
        shares.update({z: 100.0 * served[z] / total if total else 0.0 for z in d.fleet.zones})
        return bool(total) and all(v >= share_limit for v in shares.values())

    async def timed(predicate: Callable[[], bool], limit: float, event: str) -> float | None:
        if not await wait_for(predicate, max(0.0, limit - (d.clock.now() - t2))):
            return None
        d.event(event)
        return d.clock.now() - t2

    backlog_secs, rebalance_secs = await asyncio.gather(
        timed(backlog_landed, backlog_limit, f"zone {lost}: everything it acknowledged before the loss has landed")
        if d.fleet[lost].running() else asyncio.sleep(0),
        timed(rebalanced, rebalance_limit, "traffic rebalanced over every zone"),
    )
    result.check(f"zone {lost}'s backlog from before the loss landed", backlog_secs, backlog_limit, unit="s",
                 detail=f"{len(d.acked_before_kill)} records acknowledged by zone {lost} before it was lost")
    lb_in = {z: d.lb_change(z, t2, to_serving=True) for z in zones}
    result.figures.update({
        "ready_secs": {z: None if v is None else round(v, 3) for z, v in ready_secs.items()},
        "balancer_sending_again_secs": {z: None if v is None else round(v - t2, 3) for z, v in lb_in.items()},
        "backlog_landed_secs": None if backlog_secs is None else round(backlog_secs, 3),
        "rebalance_secs": None if rebalance_secs is None else round(rebalance_secs, 3),
        "shares_percent": {z: round(v, 1) for z, v in shares.items()},
    })
    result.check(f"seconds until every zone serves at least {share_limit:g}% of requests", rebalance_secs,
                 rebalance_limit, unit="s", detail=str({z: round(v, 1) for z, v in shares.items()}))
    await d.observe(d.clock.now() + d.settings.timing.rebalanced_secs, alarms=False)


# -- 5 -------------------------------------------------------------------------------------------


def postcheck(d: Drill, result: StepResult) -> None:
    """After the devices stopped and every instance drained: the lake against the devices' log."""
    d.lake.refresh()
    request_of: dict[Key, Request] = {}
    for request in d.devices.requests():
        for key in request.keys():
            request_of[key] = request
    acked = {k for k, r in request_of.items() if r.acked}
    refused = {k for k, r in request_of.items() if r.refused}
    lost_total = duplicated = retry_copies = refused_landed = unexpected = 0
    per_zone: dict[str, dict[str, int]] = {}
    counts = {zone: d.lake.count(zone) for zone in ("raw", "curated", "quarantine")}
    for zone in ("raw", "curated"):
        copies = counts[zone].copies
        missing = acked - set(copies)
        zone_dup = zone_retry = 0
        for key, where in copies.items():
            if len(where) < 2:
                continue
            gateways = [g for g, _ in where]
            request = request_of.get(key)
            # A retry that reached another instance after an attempt that got no decision: the
            # first instance may have persisted it too. The Athena view keeps one copy of these.
            if request is not None and request.ambiguous and len(set(gateways)) == len(gateways):
                zone_retry += len(where) - 1
            else:
                zone_dup += len(where) - 1
        zone_refused = len(refused & set(copies))
        zone_unexpected = len(set(copies) - set(request_of))
        per_zone[zone] = {"acked": len(acked), "landed_distinct": len(copies), "missing": len(missing),
                          "duplicated": zone_dup, "retry_copies_across_instances": zone_retry,
                          "refused_but_landed": zone_refused, "sent_by_no_device": zone_unexpected}
        lost_total += len(missing)
        duplicated += zone_dup
        retry_copies += zone_retry
        refused_landed += zone_refused
        unexpected += zone_unexpected
    quarantined = len(set(counts["quarantine"].copies) & set(request_of))
    per_zone["quarantine"] = {"records_of_the_drill": quarantined}

    # Records the lost zone had acknowledged before it was lost and that landed only later.
    delayed: dict[str, Any] = {}
    if d.kill_at is not None:
        kill_wall = d.clock.wall(d.kill_at)
        gid = d.fleet[d.runbook.zones.lost].gateway_id
        acked_at = {k: r.acked_at for k, r in request_of.items() if k in d.acked_before_kill}
        for zone in ("raw", "curated"):
            delays = []
            for key in d.acked_before_kill:
                landed = [t for g, t in counts[zone].copies.get(key, ()) if g == gid]
                if landed and min(landed) > kill_wall:
                    delays.append(min(landed) - d.clock.wall(acked_at[key]))
            delayed[zone] = {
                "records": len(delays),
                "median_delay_secs": round(statistics.median(delays), 2) if delays else 0.0,
                "max_delay_secs": round(max(delays), 2) if delays else 0.0,
            }
    result.figures.update({"zones": per_zone, "lake": d.lake.summary(), "delayed_by_lost_zone": delayed,
                           "acked_records": len(acked), "acked_requests": sum(1 for r in d.devices.requests() if r.acked),
                           "retry_copies_across_instances": retry_copies})
    result.check("acknowledged records missing from raw or curated", lost_total, d.threshold("postcheck", "max_lost_records"))
    result.check("acknowledged records landed more than once (beyond retries after a lost answer)", duplicated,
                 d.threshold("postcheck", "max_duplicated_records"))
    result.check("records of refused requests that landed", refused_landed, d.threshold("postcheck", "max_refused_records_landed"))
    result.check("records no device sent, or the drill's records in quarantine", unexpected + quarantined, 0)
