"""The drill's report: ``report.json`` (every figure), ``report.md`` (for people), ``timeline.png``.

The timeline has the drill's steps as bands over four panels: offered and acknowledged load per
zone (from the devices' log), the errors devices saw, each instance's WAL backlog (its
``/metrics``), and each instance's state (running, and whether HAProxy sends to it).
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any

from gateway.drill.devices import Devices
from gateway.drill.monitor import Sample
from gateway.drill.steps import StepResult

STEP_COLOURS = ("#dbe9f6", "#fde2c8", "#f8d0d0", "#d8efd3", "#e8e0f3")
ZONE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray")


def _step_dict(step: StepResult) -> dict[str, Any]:
    return {
        "id": step.id, "title": step.title, "passed": step.passed, "skipped": step.skipped,
        "rolled_back_early": step.rolled_back_early,
        "started": None if step.started is None else round(step.started, 3),
        "ended": None if step.ended is None else round(step.ended, 3),
        "checks": [{"name": c.name, "value": c.value, "limit": c.limit, "op": c.op, "unit": c.unit,
                    "passed": c.passed, "detail": c.detail} for c in step.checks],
        "figures": step.figures, "notes": step.notes,
    }


def headline(steps: list[StepResult]) -> dict[str, Any]:
    """The figures the drill is run for."""
    by_id = {s.id: s for s in steps}

    def fig(step: str, name: str) -> Any:
        return by_id[step].figures.get(name) if step in by_id else None

    post = by_id.get("postcheck")
    zones = post.figures.get("zones", {}) if post else {}
    return {
        "shift_secs": fig("planned_shift", "shift_secs"),
        "balancer_stopped_sending_secs": fig("planned_shift", "balancer_stopped_sending_secs"),
        "requests_moved_by_balancer": fig("planned_shift", "requests_haproxy_moved_to_another_zone"),
        "planned_shift_device_errors": fig("planned_shift", "device_errors"),
        "recovery_secs": fig("unplanned_loss", "recovery_secs"),
        "unplanned_loss_device_errors": fig("unplanned_loss", "device_errors"),
        "backlog_landed_secs": fig("restore", "backlog_landed_secs"),
        "rebalance_secs": fig("restore", "rebalance_secs"),
        "acked_records": post.figures.get("acked_records") if post else None,
        "lost_records": sum(z.get("missing", 0) for z in zones.values()) if zones else None,
        "duplicated_records": sum(z.get("duplicated", 0) for z in zones.values()) if zones else None,
        "retry_copies_across_instances": post.figures.get("retry_copies_across_instances") if post else None,
        "delayed_by_lost_zone": post.figures.get("delayed_by_lost_zone") if post else None,
    }


def write_report(out: Path, *, passed: bool, steps: list[StepResult], devices: Devices, samples: list[Sample],
                 events: list[tuple[float, str]], context: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    timeline = _timeline(devices, samples, list(context["zones"]))
    document = {
        "passed": passed,
        "headline": headline(steps),
        "steps": [_step_dict(s) for s in steps],
        "events": [{"t": t, "event": e} for t, e in events],
        **context,
        "timeline": timeline,
    }
    (out / "report.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    with open(out / "devices.jsonl", "w") as log:  # every request and attempt, as the devices saw them
        for request in devices.requests():
            log.write(json.dumps({
                "device_id": request.device_id, "first_seq": request.first_seq, "records": request.count,
                "scheduled": round(request.scheduled, 3), "acked_at": None if request.acked_at is None else round(request.acked_at, 3),
                "acked_by": request.acked_by, "gave_up": request.gave_up, "accepted": request.accepted,
                "duplicates": request.duplicates,
                "attempts": [[round(a.started, 3), round(a.ended, 3), a.status, a.served_by, a.retry_after, a.error]
                             for a in request.attempts],
            }) + "\n")
    (out / "report.md").write_text(_markdown(document))
    try:
        _plot(out / "timeline.png", timeline, steps, events, list(context["zones"]))
    except ImportError as exc:  # matplotlib is part of the test extra
        (out / "timeline.txt").write_text(f"no plot: {exc}\n")
    return document


def _timeline(devices: Devices, samples: list[Sample], zones: list[str], bin_secs: float = 1.0) -> dict[str, Any]:
    offered: collections.Counter = collections.Counter()
    reached: dict[str, collections.Counter] = {z: collections.Counter() for z in zones}
    acked: dict[str, collections.Counter] = {z: collections.Counter() for z in zones}
    errors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    last = 0.0
    for request, attempt in devices.attempts():
        b = int(attempt.started // bin_secs)
        last = max(last, attempt.ended)
        if attempt is request.attempts[0]:
            offered[b] += 1
        if attempt.served_by in reached:
            reached[attempt.served_by][b] += 1
            if attempt.status == 202:
                acked[attempt.served_by][int(attempt.ended // bin_secs)] += 1
        if attempt.status != 202:
            kind = str(attempt.status) if attempt.status in (502, 503, 504, 429) else (
                "no answer" if isinstance(attempt.status, str) else "other")
            errors[kind][int(attempt.ended // bin_secs)] += 1
    n = int(math.ceil(last / bin_secs)) + 1
    series = lambda c: [c.get(i, 0) / bin_secs for i in range(n)]  # noqa: E731
    return {
        "bin_secs": bin_secs,
        "t": [round((i + 0.5) * bin_secs, 3) for i in range(n)],  # bin centres
        "offered_requests_per_sec": series(offered),
        "requests_reaching_zone_per_sec": {z: series(c) for z, c in reached.items()},
        "acked_requests_per_sec": {z: series(c) for z, c in acked.items()},
        "device_errors_per_sec": {k: series(c) for k, c in sorted(errors.items())},
        "samples": {
            "t": [round(s.t, 3) for s in samples],
            "backlog_bytes": {z: [s.instances[z].backlog_bytes if s.instances[z].scraped else None for s in samples]
                              for z in zones},
            "backlog_bytes_by_lake_zone": {z: [dict(s.instances[z].backlog_by_zone) if s.instances[z].scraped else None
                                               for s in samples] for z in zones},
            "running": {z: [s.instances[z].running for s in samples] for z in zones},
            "balancer_state": {z: [s.instances[z].lb_state for s in samples] for z in zones},
        },
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.3f}".rstrip("0").rstrip(".")
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{text} {unit}".strip() if unit in ("s", "%", "bytes") else text


def _markdown(doc: dict[str, Any]) -> str:
    h = doc["headline"]
    lines = [
        f"# AZ failover drill: {'PASSED' if doc['passed'] else 'FAILED'}",
        "",
        f"Runbook `{doc['runbook']['name']}` v{doc['runbook']['version']}; zones {', '.join(doc['zones'])} "
        f"(shifted {doc['runbook']['zones']['shifted']}, lost {doc['runbook']['zones']['lost']}, "
        f"survivor {doc['runbook']['zones']['survivor']}); {doc['load']['devices']} devices offering "
        f"{doc['load']['requests_per_sec']:g} requests/s of {doc['load']['records_per_request']} records; "
        f"lake {doc.get('lake', '?')}; "
        f"started {doc['started_at']}, {doc['duration_secs']:.0f} s.",
        "",
        "## Figures",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| planned shift: seconds until no device request reaches zone {doc['runbook']['zones']['shifted']} | {_fmt(h['shift_secs'])} |",
        f"| planned shift: seconds until HAProxy's /readyz check stopped sending to it | {_fmt(h['balancer_stopped_sending_secs'])} |",
        f"| planned shift: requests HAProxy moved to another zone (connection refused) | {_fmt(h['requests_moved_by_balancer'])} |",
        f"| planned shift: attempts devices saw fail (retried) | {_fmt(h['planned_shift_device_errors'])} |",
        f"| unplanned loss: seconds until every device request succeeds again | {_fmt(h['recovery_secs'])} |",
        f"| unplanned loss: attempts devices saw fail (retried) | {_fmt(h['unplanned_loss_device_errors'])} |",
        f"| restore: seconds until the lost zone's backlog landed | {_fmt(h['backlog_landed_secs'])} |",
        f"| restore: seconds until traffic rebalanced | {_fmt(h['rebalance_secs'])} |",
        f"| acknowledged records | {_fmt(h['acked_records'])} |",
        f"| acknowledged records lost / duplicated | {_fmt(h['lost_records'])} / {_fmt(h['duplicated_records'])} |",
        f"| copies of retried requests across instances (the Athena view keeps one) | {_fmt(h['retry_copies_across_instances'])} |",
    ]
    for zone, d in (h.get("delayed_by_lost_zone") or {}).items():
        lines.append(f"| records delayed by the lost zone ({zone}): count, median, max delay | "
                     f"{_fmt(d['records'])}, {_fmt(d['median_delay_secs'], 's')}, {_fmt(d['max_delay_secs'], 's')} |")
    lines += ["", "![timeline](timeline.png)", "", "## Steps", ""]
    for step in doc["steps"]:
        verdict = "skipped: " + step["skipped"] if step["skipped"] else ("passed" if step["passed"] else "FAILED")
        span = "" if step["started"] is None else f" (t = {step['started']:.1f}–{step['ended']:.1f} s)"
        lines += [f"### {step['title']}: {verdict}{span}", ""]
        if step["rolled_back_early"]:
            lines += [f"Rolled back early: {step['rolled_back_early']}", ""]
        if step["checks"]:
            lines += ["| check | value | limit | |", "| --- | --- | --- | --- |"]
            for c in step["checks"]:
                detail = f" ({c['detail']})" if c["detail"] else ""
                lines.append(f"| {c['name']}{detail} | {_fmt(c['value'], c['unit'])} | {c['op']} {_fmt(c['limit'], c['unit'])} | "
                             f"{'ok' if c['passed'] else '**FAIL**'} |")
            lines.append("")
        if step["figures"]:
            lines += ["```json", json.dumps(step["figures"], indent=2, default=str), "```", ""]
        lines += [f"- {note}" for note in step["notes"]]
        if step["notes"]:
            lines.append("")
    lines += ["## Events", "", *(f"- t = {e['t']:.2f} s: {e['event']}" for e in doc["events"]), ""]
    if doc.get("overrides"):
        lines += ["## Thresholds changed for this run", "", "```json", json.dumps(doc["overrides"], indent=2), "```", ""]
    lines += ["## What this drill proves, and what it cannot", "", doc["limits"], ""]
    return "\n".join(lines)


def _plot(path: Path, tl: dict[str, Any], steps: list[StepResult], events: list[tuple[float, str]], zones: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {z: ZONE_COLOURS[i % len(ZONE_COLOURS)] for i, z in enumerate(zones)}
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2, 1.2]})
    t = tl["t"]
    ax = axes[0]
    ax.plot(t, tl["offered_requests_per_sec"], color="black", linewidth=1.5, label="offered (all zones)")
    for z in zones:
        ax.plot(t, tl["requests_reaching_zone_per_sec"][z], color=colour[z], linestyle=":", linewidth=1, label=f"reaching {z}")
        ax.plot(t, tl["acked_requests_per_sec"][z], color=colour[z], linewidth=1.5, label=f"acked by {z}")
    ax.set_ylabel("requests / s")
    ax.set_title("Offered vs acknowledged load per zone", pad=16)
    ax.legend(loc="upper right", fontsize=7, ncol=4)

    ax = axes[1]
    for kind, values in tl["device_errors_per_sec"].items():
        ax.plot(t, values, marker=".", linewidth=1, label=kind)
    ax.set_ylabel("failed attempts / s")
    ax.set_title("Errors devices saw (each one retried)")
    if tl["device_errors_per_sec"]:
        ax.legend(loc="upper right", fontsize=7)

    ax = axes[2]
    st = tl["samples"]["t"]
    for z in zones:
        values = [None if v is None else v / 2**20 for v in tl["samples"]["backlog_bytes"][z]]
        ax.plot(st, [math.nan if v is None else v for v in values], color=colour[z], label=z)
    ax.set_ylabel("MiB")
    ax.set_title("WAL backlog per instance (edge_gateway_wal_backlog_bytes, all zones; whole segments; gaps: down)")
    ax.legend(loc="upper right", fontsize=7)

    ax = axes[3]
    for i, z in enumerate(zones):
        running = tl["samples"]["running"][z]
        states = tl["samples"]["balancer_state"][z]
        for j in range(len(st) - 1):
            if running[j]:
                up = states[j].startswith("UP")
                ax.broken_barh([(st[j], st[j + 1] - st[j])], (i - 0.35, 0.7), color=colour[z], alpha=1.0 if up else 0.3)
    ax.set_yticks(range(len(zones)), [f"zone {z}" for z in zones])
    ax.set_title("Instances: running (pale) and receiving traffic from HAProxy (solid)")
    ax.set_xlabel("seconds since the drill started")

    for k, step in enumerate(steps):
        if step.started is None or step.ended is None:
            continue
        for a in axes:
            a.axvspan(step.started, step.ended, color=STEP_COLOURS[k % len(STEP_COLOURS)], alpha=0.6, zorder=0)
        axes[0].text((step.started + step.ended) / 2, 1.01, step.id, transform=axes[0].get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=8)
    for te, text in events:
        if text.startswith(("SIGTERM", "SIGKILL", "restart", "blocking")):
            for a in axes:
                a.axvline(te, color="black", linewidth=0.7, linestyle="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
