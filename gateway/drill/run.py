"""``edge-gateway drill``: start the fleet, drive devices, run the runbook's steps, write the report."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import msgspec

from gateway.drill.devices import Clock, Devices
from gateway.drill.fleet import Fleet, FleetError
from gateway.drill.lake import LakeIndex, S3Store
from gateway.drill.monitor import Monitor
from gateway.drill.report import headline, write_report
from gateway.drill.runbook import STEP_IDS, Runbook, RunbookError, load_runbook
from gateway.drill.settings import DrillConfigError, DrillSettings, dump_drill_settings, load_drill_settings
from gateway.drill.steps import Drill, StepResult, planned_shift, postcheck, precheck, restore, unplanned_loss

MARKER = ".az-failover-drill"

LIMITS = (
    "It proves, with real processes, sockets and disks, that the gateway's drain, readiness and WAL "
    "behave as the failover plan assumes: a drained zone stops receiving requests before it exits and "
    "lands its WAL; devices ride out a drain and a sudden loss by retrying; a restarted instance replays "
    "its own WAL; and every acknowledged record reaches each zone of the lake once. It cannot prove what "
    "one machine does not have: real zone latency and partitions, the ALB's and ARC's own timings, EBS and "
    "S3 behaviour in a zone outage. A real zone loss takes the instance's disk with it until the zone "
    "returns: records acknowledged there are delayed, not lost, only if the WAL volume survives (the drill "
    "counts them, with their delay, under 'records delayed by the lost zone'); a volume that does not "
    "survive loses them. A retry that another instance accepts after an attempt that got no answer may "
    "land twice; the report counts those copies and the Athena view curated_telemetry_deduplicated keeps one."
)


class Progress:
    def __init__(self, clock: Clock, out: TextIO) -> None:
        self.clock = clock
        self.out = out

    def __call__(self, text: str) -> None:
        self.out.write(f"[{self.clock.now():6.1f} s] {text}\n")
        self.out.flush()


def prepare_workdir(workdir: Path) -> Path:
    """Empty the drill's working directory, refusing one the drill did not create."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise DrillConfigError(f"{workdir} is not empty and was not made by the drill; choose another workdir")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by edge-gateway drill; emptied at the start of every drill\n")
    return workdir


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if value == int(value) else f"{value:g}"


def _summary(step: StepResult) -> str:
    if step.skipped:
        return f"skipped ({step.skipped})"
    parts = [f"{c.name} {_number(c.value)}{c.unit if c.unit in ('s', '%') else ''}"
             f"{'' if c.passed else ' FAIL (' + c.op + ' ' + format(c.limit, 'g') + ')'}" for c in step.checks]
    verdict = "passed" if step.passed else "FAILED"
    early = f"; rolled back early: {step.rolled_back_early}" if step.rolled_back_early else ""
    return f"{verdict}{early}: " + "; ".join(parts)


Body = Callable[[Drill, StepResult], Awaitable[None]]
BODIES: dict[str, Body] = {"precheck": precheck, "planned_shift": planned_shift, "unplanned_loss": unplanned_loss,
                           "restore": restore}


async def run_steps(d: Drill, steps: dict[str, StepResult], say: Callable[[str], None],
                    bodies: dict[str, Body] = BODIES) -> None:
    """Steps 1-4 in the runbook's order: a failed pre-check changes nothing; a blocking alarm during
    the planned shift skips the loss; the restore (the rollback) runs whenever anything was changed."""

    async def run(step_id: str) -> StepResult:
        step = steps[step_id]
        step.started = d.clock.now()
        say(f"{STEP_IDS.index(step_id) + 1} {step.title} ...")
        try:
            await bodies[step_id](d, step)
        except Exception as exc:  # noqa: BLE001 - a step that breaks fails, and the rollback still runs
            step.notes.append(f"the step raised {type(exc).__name__}: {exc}")
            step.check("step ran to its end", 0, 1, ">=", detail=f"{type(exc).__name__}: {exc}")
        step.ended = d.clock.now()
        say(f"{STEP_IDS.index(step_id) + 1} {step.title}: {_summary(step)}")
        return step

    if not (await run("precheck")).passed:
        for step_id in ("planned_shift", "unplanned_loss", "restore"):
            steps[step_id].skipped = "the pre-check failed; nothing was changed"
        return
    shift = await run("planned_shift")
    if shift.rolled_back_early:
        steps["unplanned_loss"].skipped = f"rolled back early: {shift.rolled_back_early}"
    else:
        await run("unplanned_loss")
    await run("restore")


async def run_drill(settings: DrillSettings, runbook: Runbook, overrides: dict[str, Any], out: TextIO = sys.stdout) -> dict[str, Any]:
    workdir = prepare_workdir(Path(settings.workdir))
    if settings.lake.kind != "s3":
        return await _run_drill(settings, runbook, overrides, out, workdir, None)
    from gateway.demo import MotoServer

    moto = MotoServer(workdir / "moto.log")
    try:
        try:
            await moto.wait_ready()
            await moto.create_bucket(settings.lake.bucket)
        except Exception as exc:  # noqa: BLE001 - whatever stopped it, the drill cannot run
            raise FleetError(f"moto's S3 server did not start: {exc}") from exc
        return await _run_drill(settings, runbook, overrides, out, workdir, (moto.url, settings.lake.bucket))
    finally:
        moto.stop()


async def _run_drill(settings: DrillSettings, runbook: Runbook, overrides: dict[str, Any], out: TextIO, workdir: Path,
                     s3: tuple[str, str] | None) -> dict[str, Any]:
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    clock = Clock()
    say = Progress(clock, out)
    zones = settings.fleet.zones
    for zone in (runbook.zones.shifted, runbook.zones.lost, runbook.zones.survivor):
        if zone not in zones:
            raise DrillConfigError(f"the runbook's zone {zone!r} is not one of fleet.zones {zones}")
    registry, lake_dir = workdir / "devices.json", workdir / "lake"
    devices = Devices(settings.load, clock)
    devices.register(registry)
    fleet = Fleet(settings.fleet, settings.balancer, workdir, registry, lake_dir, s3)
    gateway_ids = [i.gateway_id for i in fleet.instances.values()]
    lake = LakeIndex(S3Store(*s3) if s3 else lake_dir, gateway_ids)
    monitor = Monitor(fleet, lake, clock, settings.timing.sample_interval_secs)
    steps = {step_id: StepResult(step_id, runbook.steps[step_id].title) for step_id in STEP_IDS}
    stop_devices, stop_monitor = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        async with aiohttp.ClientSession() as http:
            d = Drill(settings, runbook, clock, fleet, devices, monitor, lake, http)
            d.event("starting the fleet")
            await fleet.start(http)
            d.event("fleet ready; devices start")
            say(f"fleet: zones {', '.join(zones)} ({', '.join(f'{z}=:{fleet[z].port}' for z in zones)}) behind HAProxy "
                f"{fleet.balancer.url}; {settings.load.devices} devices, {settings.load.requests_per_sec:g} requests/s "
                f"of {settings.load.records_per_request} records")
            tasks.append(asyncio.create_task(monitor.run(stop_monitor)))
            devices_task = asyncio.create_task(devices.run(fleet.balancer.url, stop_devices))
            tasks.append(devices_task)

            await run_steps(d, steps, say)

            # 5: devices stop (each finishes its request), every instance drains, the lake is counted.
            post = steps["postcheck"]
            post.started = clock.now()
            say(f"5 {post.title} ...")
            d.event("devices stop")
            stop_devices.set()
            try:
                await asyncio.wait_for(devices_task, settings.load.retry_deadline_secs + settings.load.request_timeout_secs + 5)
            except TimeoutError:
                post.notes.append("devices did not finish their requests in time")
            d.event("SIGTERM every instance (drain)")
            running = [z for z in zones if fleet[z].running()]
            codes = await asyncio.gather(*(fleet.terminate(z, settings.fleet.drain_deadline_secs + 30) for z in running))
            for zone, code in zip(running, codes):
                drained = fleet[zone].drain_report()
                post.check(f"zone {zone} drained and landed its WAL", 1 if code == 0 and drained else 0, 1, ">=",
                           detail=f"exit code {code}, landed_everything={drained}")
            d.event("every instance stopped")
            await asyncio.to_thread(postcheck, d, post)
            post.ended = clock.now()
            say(f"5 {post.title}: {_summary(post)}")
            stop_monitor.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        stop_devices.set()
        stop_monitor.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        fleet.close()

    ordered = [steps[s] for s in STEP_IDS]
    passed = all(s.passed for s in ordered)
    context = {
        "runbook": runbook.summary(), "overrides": overrides, "zones": zones,
        "load": {"devices": settings.load.devices, "requests_per_sec": settings.load.requests_per_sec,
                 "records_per_request": settings.load.records_per_request},
        "lake": f"s3://{settings.lake.bucket} (moto's S3 server)" if s3 else str(lake_dir),
        "settings": msgspec.to_builtins(settings),
        "started_at": started_at, "duration_secs": round(clock.now(), 1), "limits": LIMITS,
        "instances": {z: {"gateway_id": fleet[z].gateway_id, "availability_zone": fleet[z].availability_zone,
                          "port": fleet[z].port, "wal_dir": str(fleet[z].wal_dir), "starts": fleet[z].starts,
                          "exit_codes": fleet[z].exit_codes} for z in zones},
    }
    report_dir = settings.report_path
    document = write_report(report_dir, passed=passed, steps=ordered, devices=devices, samples=monitor.samples,
                            events=d.events, context=context)
    _print_figures(document["headline"], out)
    out.write(f"\nAZ failover drill {'PASSED' if passed else 'FAILED'}; report: {report_dir / 'report.md'} "
              f"(+ report.json, timeline.png)\n")
    return document


def _print_figures(h: dict[str, Any], out: TextIO) -> None:
    out.write("\nFigures:\n")
    out.write(f"  planned shift: {h['shift_secs']} s until no device request reached the drained zone "
              f"(HAProxy's check stopped sending to it after {h['balancer_stopped_sending_secs']} s; "
              f"{h['requests_moved_by_balancer']} requests it moved to another zone); "
              f"failed attempts (all retried): {h['planned_shift_device_errors']}\n")
    out.write(f"  unplanned loss: {h['recovery_secs']} s until every device request succeeded again; "
              f"failed attempts (all retried): {h['unplanned_loss_device_errors']}\n")
    out.write(f"  restore: lost zone's backlog landed after {h['backlog_landed_secs']} s; "
              f"rebalanced after {h['rebalance_secs']} s\n")
    out.write(f"  lake: {h['acked_records']} acknowledged records; lost {h['lost_records']}, duplicated "
              f"{h['duplicated_records']}; copies of retries across instances {h['retry_copies_across_instances']}\n")
    for zone, d in (h.get("delayed_by_lost_zone") or {}).items():
        out.write(f"  delayed by the lost zone ({zone}): {d['records']} records, median {d['median_delay_secs']} s, "
                  f"max {d['max_delay_secs']} s\n")


def main(config: Path | None, report_dir: Path | None = None, runbook_path: Path | None = None,
         print_config: bool = False) -> int:
    try:
        settings = load_drill_settings(config)
        if report_dir is not None:
            settings = msgspec.structs.replace(settings, report_dir=str(report_dir))
        if print_config:
            sys.stdout.write(dump_drill_settings(settings))
            return 0
        try:
            runbook = load_runbook(Path(runbook_path or settings.runbook) if (runbook_path or settings.runbook) else None)
        except ImportError as exc:
            raise DrillConfigError(f"{exc}; the drill needs the test extra (pip install 'edge-gateway[test]')") from None
        overrides = {"blocking": settings.blocking, "thresholds": settings.thresholds}
        runbook = runbook.with_overrides(settings.blocking, settings.thresholds)
    except (DrillConfigError, RunbookError) as exc:
        print(f"edge-gateway drill: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in overrides.items() if v}
    try:
        document = asyncio.run(run_drill(settings, runbook, overrides))
    except ImportError as exc:
        print(f"edge-gateway drill: {exc}; the drill needs the test extra (pip install 'edge-gateway[test]'; "
              "`make drill` installs it)", file=sys.stderr)
        return 2
    except DrillConfigError as exc:
        print(f"edge-gateway drill: {exc}", file=sys.stderr)
        return 2
    except FleetError as exc:
        print(f"edge-gateway drill: the fleet could not run: {exc}", file=sys.stderr)
        return 3
    return 0 if document["passed"] else 1


__all__ = ["main", "run_drill", "headline"]
