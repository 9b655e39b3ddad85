"""The batching protocol (docs/batching.md §5) on the simulated endpoint of ``batching_sim``.

``batching_sim.run_benchmark`` runs the adaptive batcher and static (batch, timeout) arms on a fake
clock at several loads (fractions of the endpoint's capacity at full batches). This adapter runs it
once per repetition with a different seed, in a worker thread (it runs its own event loop), and
derives the protocol's ratios: calls per record against the best static arm that meets the SLO at
each load (target <= 1.10x), the on-time share up to 0.95x (no late records), and goodput at overload.
Burst and slowdown runs come from ``batching_sim.protocol_scenarios`` (the protocol of docs/batching.md §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import math
from collections.abc import AsyncIterator

from benchmarks.scenario import Collector, Context, Repeated, missing_module

# A static arm "meets the SLO" at a load when at most this share of records is late (docs/batching.md §5: 0.1%).
LATE_PCT_OK = 0.1


def _module():
    return importlib.import_module("benchmarks.batching_sim")


class BatchingScenario(Repeated):
    name = "batching"
    title = "Batching protocol on a simulated endpoint (benchmarks/batching_sim.py): adaptive vs static arms"

    def unavailable(self, ctx: Context) -> str | None:
        return missing_module("batching_sim", "run_benchmark")

    @contextlib.asynccontextmanager
    async def around(self, ctx: Context, out: Collector) -> AsyncIterator[None]:
        if getattr(_module(), "protocol_scenarios", None) is None:
            out.note("Steady Poisson loads only: batching_sim.py has no burst or slowdown runs, so those parts of the "
                     "protocol are not run. Batch size and concurrency over time on real endpoints are in the inference scenarios.")
        yield

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        module = _module()
        quick = ctx.profile.name == "quick"
        loads = (0.5, 0.95, 1.2) if quick else tuple(getattr(module, "DEFAULT_LOADS", (0.2, 0.5, 0.8, 0.95, 1.2)))
        duration = 0.3 if quick else 0.5  # simulated seconds; longer runs get slow where static arms drain a backlog
        protocol = getattr(module, "protocol_scenarios", None)
        sim = dataclasses.replace(module.Scenario(), duration_secs=duration, seed=ctx.seed + rep)
        report = await asyncio.to_thread(module.run_benchmark, loads, sim)
        worst_calls = 0.0
        for load, arms in report["results"].items():
            adaptive = arms["adaptive"]
            ok_static = [m for name, m in arms.items() if name != "adaptive" and m["late_pct"] <= LATE_PCT_OK]
            tag = f"{float(load):g}x"
            out.figure(f"adaptive_late_pct_{tag}", adaptive["late_pct"], "%")
            out.figure(f"adaptive_deferred_pct_{tag}", adaptive["deferred_pct"], "%")
            out.figure(f"adaptive_calls_per_record_{tag}", adaptive["calls_per_record"])
            out.figure(f"adaptive_p99_ms_{tag}", adaptive["p99_ms"], "ms")
            out.figure(f"adaptive_mean_batch_{tag}", adaptive["mean_batch_size"])
            out.append_series("points", {"rep": rep, "load": float(load), "arms": arms})
            if float(load) <= 0.95 and ok_static:
                best = min(m["calls_per_record"] for m in ok_static)
                worst_calls = max(worst_calls, adaptive["calls_per_record"] / best if best else math.nan)
            if float(load) > 1.0:
                capacity = report["scenario"]["capacity_per_sec"]
                out.ratio("adaptive_goodput_to_capacity_overload", adaptive["goodput_per_sec"] / capacity, better="higher",
                          description=f"adaptive goodput at {float(load):g}x offered load over the endpoint's capacity (docs/batching.md §5)")
        steady = [float(l) for l in report["results"] if float(l) <= 0.95]
        on_time = min(1 - (report["results"][l]["adaptive"]["late_pct"] + report["results"][l]["adaptive"]["deferred_pct"]) / 100
                      for l in report["results"] if float(l) <= 0.95) if steady else math.nan
        out.ratio("adaptive_to_best_static_calls_per_record", worst_calls or math.nan, better="lower",
                  description="worst over loads <= 0.95x of adaptive calls/record over the best static arm meeting the SLO (target <= 1.10)")
        out.ratio("adaptive_min_on_time_share_steady", on_time, better="higher",
                  description="lowest share of records scored on time by the adaptive batcher at loads <= 0.95x (target: no late records)")
        ctx.log(f"  batching rep {rep + 1}: adaptive/best-static calls per record {worst_calls:.2f}, min on-time share {on_time:.3f}")
        if protocol is not None:
            for name, (proto_loads, proto) in protocol(sim).items():
                if name == "steady":
                    continue
                proto_report = await asyncio.to_thread(module.run_benchmark, proto_loads, proto)
                for load, arms in proto_report["results"].items():
                    tag = f"{name}_{float(load):g}x"
                    adaptive = arms["adaptive"]
                    statics = [m for arm, m in arms.items() if arm != "adaptive"]
                    out.figure(f"adaptive_late_pct_{tag}", adaptive["late_pct"], "%")
                    out.figure(f"adaptive_deferred_pct_{tag}", adaptive["deferred_pct"], "%")
                    out.figure(f"best_static_late_pct_{tag}", min(m["late_pct"] for m in statics), "%")
                    out.append_series("points", {"rep": rep, "load": float(load), "scenario": name, "arms": arms})
                    best_goodput = max(m["goodput_per_sec"] for m in statics)
                    out.ratio(f"adaptive_to_best_static_goodput_{tag}", adaptive["goodput_per_sec"] / best_goodput if best_goodput else math.nan,
                              better="higher", description=f"{name} at {float(load):g}x: on-time records/s, adaptive over the best static arm")
