"""Turn ``results.json`` into ``report.md`` and PNG plots (matplotlib, Agg backend: no display)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.compare import Row, table

HEADLINE = [
    "ingest.gateway_to_ceiling_throughput",
    "ingest.gateway_to_ceiling_cpu_efficiency",
    "s3.gateway_to_ceiling_throughput",
    "ingest-triton.gateway_to_ceiling_throughput",
    "overload.goodput_to_capacity",
    "overload.peak_rss_overload_to_half_load",
    "inference-local.on_time_share_at_0.9",
    "inference-triton.on_time_share_at_0.9",
    "batching.adaptive_to_best_static_calls_per_record",
    "abuse.polite_throughput_with_abuser_to_alone",
    "soak.rss_end_to_start",
    "soak.fds_end_to_start",
    "startup.gateway_to_ceiling_startup",
]

# (label, scenario, figure or ratio, comparison, threshold, source)
TARGETS = [
    ("end to end (signed, validated, enriched, fsynced, acked, scored, landed in S3) >= 70% of the bare ceiling",
     "s3", "ratio:gateway_to_ceiling_throughput", ">=", 0.70, "docs/performance.md"),
    ("the same, landing in the local lake", "ingest", "ratio:gateway_to_ceiling_throughput", ">=", 0.70, "docs/performance.md"),
    ("end to end with scoring and Parquet: >= 150 k records per CPU-second", "ingest", "gateway_records_per_cpu_secs", ">=", 150_000, "docs/performance.md"),
    ("ack latency p99 at half of the maximum load <= the disk's fsync p99 + 10 ms", "ingest", "half_load_p99_over_fsync_p99_ms", "<=", 10.0, "docs/performance.md"),
    ("at 1.5x offered load, goodput >= 90% of capacity", "overload", "ratio:goodput_to_capacity", ">=", 0.90, "docs/performance.md"),
    ("at 3x offered load, goodput >= 90% of capacity", "overload", "ratio:goodput_to_capacity_at_3x", ">=", 0.90, "docs/performance.md"),
    ("at 1.5x, the excess answered 503 within 50 ms (p99)", "overload", "refused_p99_ms", "<", 50.0, "docs/performance.md"),
    ("at 3x, the excess answered 503 within 50 ms (p99)", "overload", "refused_p99_ms_at_3x", "<", 50.0, "docs/performance.md"),
    ("at 1.5x, no accepted request waits over 1 s", "overload", "accepted_max_ms", "<=", 1000.0, "docs/performance.md"),
    ("at 3x, no accepted request waits over 1 s", "overload", "accepted_max_ms_at_3x", "<=", 1000.0, "docs/performance.md"),
    ("start-up under one second", "startup", "gateway_startup_secs", "<", 1.0, "docs/performance.md"),
    ("no late records at 0.9x capacity (embedded model)", "inference-local", "steady_0.9_late_share", "<=", 0.001, "docs/batching.md §5 (0.1%)"),
    ("at 1.5x capacity, >= 90% of capacity scored on time (embedded model)", "inference-local", "ratio:overload_goodput_to_capacity", ">=", 0.90, "docs/batching.md §5"),
    ("at 1.5x capacity, >= 90% of capacity scored on time (PyTriton)", "inference-triton", "ratio:overload_goodput_to_capacity", ">=", 0.90, "docs/batching.md §5"),
    ("model ready to first scored record < 3 s (PyTriton)", "readiness-triton", "ready_to_first_score_secs", "<", 3.0, "docs/batching.md §5"),
    ("bounded memory in the soak: RSS end/start <= 1.10", "soak", "ratio:rss_end_to_start", "<=", 1.10, "harness threshold"),
    ("bounded memory under overload: peak RSS <= 2x half load", "overload", "ratio:peak_rss_overload_to_half_load", "<=", 2.0, "harness threshold"),
]


def _fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, float)):
        a = abs(v)
        text = f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.3g}" if a >= 0.01 or a == 0 else f"{v:.2e}"
    else:
        text = str(v)
    return f"{text} {unit}".strip()


def _span(spec: dict, unit: str = "") -> str:
    if spec.get("n", 0) > 1:
        return f"{_fmt(spec['median'], unit)} [{_fmt(spec['min'])}–{_fmt(spec['max'])}]"
    return _fmt(spec.get("median"), unit)


def _lookup(doc: dict, scenario: str, key: str) -> dict | None:
    result = doc["scenarios"].get(scenario) or {}
    if key.startswith("ratio:"):
        return result.get("ratios", {}).get(key[6:])
    return result.get("figures", {}).get(key)


# ----------------------------------------------------------------------------------------------- plots


def _grouped(points: list[dict], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    by: dict[float, list[float]] = {}
    for p in points:
        v = p.get(key)
        if v is not None and math.isfinite(v):
            by.setdefault(p["fraction"], []).append(v)
    xs = sorted(by)
    return xs, [statistics.median(by[x]) for x in xs], [min(by[x]) for x in xs], [max(by[x]) for x in xs]


def plots(doc: dict, out: Path) -> list[tuple[str, str]]:
    """Write every plot the results allow; returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    scen = doc["scenarios"]
    sweep = (scen.get("ingest") or {}).get("series", {}).get("sweep") or []
    over = (scen.get("overload") or {}).get("series", {}).get("points") or []
    points = sweep + over

    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts, marker in (("gateway, load sweep", sweep, "o-"), ("gateway, overload", over, "s")):
            if not pts:
                continue
            cap = [p["capacity_records_per_sec"] for p in pts]
            xs, med, lo, hi = _grouped(pts, "goodput_records_per_sec")
            offered = [x * statistics.median(cap) for x in xs]
            ax.errorbar(offered, med, yerr=[[m - l for m, l in zip(med, lo)], [h - m for m, h in zip(med, hi)]], fmt=marker, capsize=3, label=label)
        xmax = max(p["fraction"] * p["capacity_records_per_sec"] for p in points)
        ax.plot([0, xmax], [0, xmax], ":", color="grey", label="goodput = offered")
        ceiling = (scen.get("ingest") or {}).get("figures", {}).get("ceiling_records_per_sec", {}).get("median")
        if ceiling:
            ax.axhline(ceiling, color="tab:red", linestyle="--", label="bare ceiling (closed loop)")
        ax.set_xlabel("offered load (records/s, Poisson arrivals)")
        ax.set_ylabel("goodput (accepted records/s)")
        ax.set_title("Throughput vs offered load (median, min-max over repetitions)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_load.png", dpi=110)
        plt.close(fig)
        made.append(("throughput_vs_load.png", "Throughput vs offered load (gateway to the local lake; overload point from the overload scenario)"))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for q, style in (("p50", "o-"), ("p90", "^-"), ("p99", "s-"), ("p99.9", "d-")):
            xs, med, lo, hi = _grouped(points, f"{q}_ms")
            if xs:
                ax.errorbar(xs, med, yerr=[[m - l for m, l in zip(med, lo)], [h - m for m, h in zip(med, hi)]], fmt=style, capsize=3, label=q)
        ax.axhline(10.0, color="tab:red", linestyle="--", linewidth=1, label="p99 target at half load (10 ms)")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (fraction of the measured capacity)")
        ax.set_ylabel("ack latency from intended send time (ms)")
        ax.set_title("Latency percentiles vs offered load")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(out / "latency_vs_load.png", dpi=110)
        plt.close(fig)
        made.append(("latency_vs_load.png", "Ack latency percentiles vs offered load (open loop, no coordinated omission)"))

    timelines = ("timeline_steady_0.5", "timeline_steady_0.9", "timeline_burst", "timeline_overload_1.5")
    for name in [n for n in scen if (scen[n].get("series") or {}).keys() & set(timelines)]:
        series = scen[name]["series"]
        runs = [k for k in timelines if series.get(k)]
        fig, axes = plt.subplots(3, len(runs), figsize=(4.2 * len(runs), 8), squeeze=False, sharex="col")
        for col, key in enumerate(runs):
            tl = series[key]
            t = [s["t_secs"] for s in tl]
            axes[0][col].plot(t, [s["mean_batch"] for s in tl], label="mean batch size")
            axes[0][col].plot(t, [s["last_batch"] for s in tl], alpha=0.5, label="last batch size")
            axes[0][col].set_title(key.removeprefix("timeline_"), fontsize=9)
            axes[1][col].step(t, [s["concurrency_limit"] for s in tl], where="post", label="concurrency limit")
            axes[1][col].step(t, [s["in_flight"] for s in tl], where="post", alpha=0.6, label="in flight")
            axes[2][col].plot(t, [s.get("on_time_share", math.nan) for s in tl], label="on time")
            axes[2][col].plot(t, [s.get("deferred_share", math.nan) for s in tl], alpha=0.6, label="deferred or refused")
            axes[2][col].set_ylim(-0.05, 1.05)
            axes[2][col].set_xlabel("time (s)")
        axes[0][0].set_ylabel("records per batch")
        axes[1][0].set_ylabel("calls")
        axes[2][0].set_ylabel("share of outcomes (per 100 ms)")
        for row in axes:
            row[0].legend(fontsize=7)
        fig.suptitle(f"{name}: batch size, concurrency and on-time share over time (first repetition)")
        fig.tight_layout()
        fname = f"batching_{name}.png"
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made.append((fname, f"{scen[name]['title']}: batch size, concurrency and on-time share over time"))

    for name, result in scen.items():
        timeline = (result.get("series") or {}).get("batching_timeline")
        if not timeline:
            continue
        # Plugins may hand over {"run label": [{"t_secs", "batch_size", "concurrency"}, ...]}.
        fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
        for label, tl in timeline.items():
            axes[0].plot([s["t_secs"] for s in tl], [s.get("batch_size", math.nan) for s in tl], label=label)
            axes[1].plot([s["t_secs"] for s in tl], [s.get("concurrency", math.nan) for s in tl], label=label)
        axes[0].set_ylabel("batch size")
        axes[1].set_ylabel("concurrency")
        axes[1].set_xlabel("time (s)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fname = f"batching_{name}.png"
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made.append((fname, f"{result['title']}: batch size and concurrency over time"))

    soak = (scen.get("soak") or {}).get("series", {})
    if soak.get("timeline"):
        tl = soak["timeline"]
        t = [s["t_secs"] for s in tl]
        fig, axes = plt.subplots(4 if soak.get("latency_windows") else 3, 1, figsize=(8, 8), sharex=True)
        axes[0].plot(t, [s["rss_mb"] for s in tl])
        axes[0].set_ylabel("RSS (MiB)")
        axes[1].plot(t, [s["cpu_pct"] for s in tl], color="tab:orange")
        axes[1].set_ylabel("CPU (% of a core)")
        axes[2].step(t, [s["fds"] for s in tl], where="post", color="tab:green")
        axes[2].set_ylabel("open files")
        if soak.get("latency_windows"):
            w = soak["latency_windows"]
            axes[3].plot([x["t_secs"] for x in w], [x["p50_ms"] for x in w], "o-", label="p50")
            axes[3].plot([x["t_secs"] for x in w], [x["p99_ms"] for x in w], "s-", label="p99")
            axes[3].set_ylabel("ack latency (ms)")
            axes[3].legend(fontsize=7)
        axes[-1].set_xlabel("time (s)")
        fig.suptitle("Soak: gateway RSS, CPU, open files and latency over time")
        fig.tight_layout()
        fig.savefig(out / "soak.png", dpi=110)
        plt.close(fig)
        made.append(("soak.png", "Soak: RSS, CPU, open file descriptors and latency windows over time"))
    return made


# ----------------------------------------------------------------------------------------------- text


def headline_text(doc: dict) -> str:
    lines = [f"headline ratios (median [min-max] over repetitions), {doc['mode']} mode:"]
    for name in HEADLINE:
        spec = doc["ratios"].get(name)
        if spec:
            lines.append(f"  {name:<48} {_span(spec)}  ({spec['better']} is better)")
    for name, result in doc["scenarios"].items():
        if result["status"] != "ok":
            lines.append(f"  {name}: {result['status']}" + (f": {result['reason']}" if result.get("reason") else ""))
    if doc["warnings"]:
        lines.append(f"{len(doc['warnings'])} warning(s) in report.md (busy machine, saturated or lagging generator, ...)")
    return "\n".join(lines)


def markdown(doc: dict, made: list[tuple[str, str]], rows: list[Row] | None) -> str:
    m, g = doc["machine"], doc["git"]
    lines = [
        "# Benchmark report",
        "",
        f"- **Command:** `{doc['command']}` ({doc['mode']} mode: {doc['profile']['reps']} repetition(s), "
        f"{doc['profile']['seconds']} s per measurement, soak {doc['profile']['soak_secs']:.0f} s)",
        f"- **When:** {doc['started_at']} to {doc['finished_at']} ({doc['duration_secs'] / 60:.1f} min)",
        f"- **Machine:** {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB RAM, {m['platform']}, "
        f"Python {m['python']}; load average at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}",
        f"- **Source:** {g.get('commit') or 'unknown'} on {g.get('branch') or '?'}{' (uncommitted changes)' if g.get('dirty') else ''}",
        "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v),
        "",
        "Absolute figures move between machines and with the neighbours' load; the ratios pair the gateway with the bare "
        "ceiling (aiohttp + msgspec, no auth, no WAL) measured in the same repetition, and are what `--compare` gates. "
        "Load is open loop (Poisson arrivals on a schedule fixed in advance) and latency counts from the intended send time. "
        "Every figure is the median over repetitions with [min–max].",
        "",
    ]
    if doc["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in doc["warnings"]] + [""]
    lines += ["## Headline ratios", "", "| ratio | median [min–max] | better | what it is |", "|---|---|---|---|"]
    for name in HEADLINE + [n for n in doc["ratios"] if n not in HEADLINE]:
        spec = doc["ratios"].get(name)
        if spec:
            lines.append(f"| `{name}` | {_span(spec)} | {spec['better']} | {spec['description']} |")
    lines += ["", "## Targets", "", "| target | measured | verdict | source |", "|---|---|---|---|"]
    for label, scenario, key, op, threshold, source in TARGETS:
        spec = _lookup(doc, scenario, key)
        if not spec or spec.get("median") is None:
            lines.append(f"| {label} | - | not measured | {source} |")
            continue
        v = spec["median"]
        ok = {">=": v >= threshold, "<": v < threshold, "<=": v <= threshold}[op]
        lines.append(f"| {label} | {_span(spec)} | {'met' if ok else '**not met**'} | {source} |")
    if rows is not None:
        comp = doc["comparison"]
        bm = comp.get("baseline_machine") or {}
        lines += ["", f"## Comparison with `{comp['baseline']}` (tolerance {comp['tolerance']:.0%})", "",
                  f"Baseline: {comp.get('baseline_mode')} mode, measured {comp.get('baseline_started_at')} on {bm.get('cpu_model')}, "
                  f"{bm.get('logical_cpus')} logical CPUs, {bm.get('memory_gib')} GiB, load average at start {bm.get('load_average_at_start')}; "
                  f"source {(comp.get('baseline_git') or {}).get('commit')}. "
                  f"Verdict: **{'REGRESSED' if comp['failed'] else 'no regression'}**.", "", table(rows, markdown=True)]
    not_run = {n: r for n, r in doc["scenarios"].items() if r["status"] != "ok"}
    if not_run:
        lines += ["", "## Scenarios not run or failed", ""]
        for name, r in not_run.items():
            what = f"not run: {r['reason']}" if r["status"] == "not run" else f"FAILED: {r.get('error', '').splitlines()[0] if r.get('error') else ''}"
            lines.append(f"- **{name}** ({r['title']}): {what}")
    if made:
        lines += ["", "## Plots", ""]
        for fname, caption in made:
            lines += [f"![{caption}]({fname})", "", f"*{caption}*", ""]
    lines += ["## Scenarios", ""]
    for name, r in doc["scenarios"].items():
        if r["status"] == "not run":
            continue
        lines += [f"### {name}: {r['title']}", "", f"Status: {r['status']}, {r['duration_secs']:.0f} s, load average {r.get('load_average_before')} "
                  f"before, {r.get('load_average_after')} after.", ""]
        for note in r.get("notes", []):
            lines.append(f"> {note}")
        if r.get("notes"):
            lines.append("")
        if r.get("figures"):
            lines += ["| figure | median [min–max] | n |", "|---|---|---|"]
            for fname, spec in r["figures"].items():
                lines.append(f"| {fname} | {_span(spec, spec.get('unit', ''))} | {spec.get('n', 0)} |")
            lines.append("")
        gens = [x["generator_cpu_share"] for x in r.get("generator", []) if x.get("generator_cpu_share") is not None]
        if gens:
            lines += [f"Load generator CPU: median {statistics.median(gens):.0%} of a core, max {max(gens):.0%} over {len(gens)} runs.", ""]
        sweep = (r.get("series") or {}).get("sweep")
        if sweep:
            lines += ["Load sweep (median over repetitions):", "",
                      "| offered (x capacity) | offered rec/s | goodput rec/s | p50 ms | p99 ms | p99.9 ms | shed | generator CPU |",
                      "|---|---|---|---|---|---|---|---|"]
            for frac in sorted({p["fraction"] for p in sweep}):
                pts = [p for p in sweep if p["fraction"] == frac]

                def med(key: str, pts=pts) -> float:
                    vals = [p[key] for p in pts if p.get(key) is not None]
                    return statistics.median(vals) if vals else math.nan

                lines.append(f"| {frac:.2f} | {_fmt(med('offered_records_per_sec'))} | {_fmt(med('goodput_records_per_sec'))} | "
                             f"{_fmt(med('p50_ms'))} | {_fmt(med('p99_ms'))} | {_fmt(med('p99.9_ms'))} | {med('shed_share'):.1%} | "
                             f"{med('generator_cpu_share'):.0%} |")
            lines.append("")
        if r["status"] == "failed":
            lines += ["```", r.get("error", ""), "```", ""]
    return "\n".join(lines) + "\n"
