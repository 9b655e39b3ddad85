"""Abuse resistance (``benchmarks/abuse.py``): do polite devices keep their throughput beside an abuser?

``abuse.run`` starts its own gateway with per-device rate limits, measures the polite devices alone,
then beside one device sending as fast as it can from another process. This adapter runs it once per
repetition and turns its figures into the harness's: the polite devices' throughput with the abuser
over without (target: close to 1), and their p99 ack latency with over without.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from benchmarks.scenario import Collector, Context
from benchmarks.stats import ratio


class AbuseScenario:
    name = "abuse"
    title = "Abuse: one device flooding the gateway beside polite ones (per-device rate limits on)"

    def unavailable(self, ctx: Context) -> str | None:
        if importlib.util.find_spec("benchmarks.abuse") is None:
            return "benchmarks/abuse.py is not in this tree yet"
        try:
            module = importlib.import_module("benchmarks.abuse")
        except Exception as exc:  # noqa: BLE001 - being written by someone else
            return f"benchmarks/abuse.py does not import: {type(exc).__name__}: {exc}"
        if not callable(getattr(module, "run", None)):
            return "benchmarks/abuse.py has no run(args)"
        return None

    async def run(self, ctx: Context, out: Collector) -> None:
        module = importlib.import_module("benchmarks.abuse")
        p = ctx.profile
        seconds = {"quick": 2.0, "default": 6.0}.get(p.name, 12.0)
        for rep in range(p.reps):
            args = argparse.Namespace(seconds=seconds, devices=8, rate=20.0, records=50, abuser_records=500, limit=2000.0, abuse=None)
            res = await module.run(args)
            statuses = {str(k): v for k, v in (res.get("abuser_statuses") or {}).items()}
            total = sum(statuses.values())
            out.figure("polite_offered_records_per_s", res["polite_offered_records_per_s"], "rec/s")
            out.figure("polite_records_per_s_alone", res["polite_records_per_s_alone"], "rec/s")
            out.figure("polite_records_per_s_with_abuser", res["polite_records_per_s_with_abuser"], "rec/s")
            out.figure("polite_p99_ack_ms_alone", res["polite_p99_ack_ms_alone"], "ms")
            out.figure("polite_p99_ack_ms_with_abuser", res["polite_p99_ack_ms_with_abuser"], "ms")
            out.figure("abuser_requests", total, "requests")
            out.figure("abuser_429_share", statuses.get("429", 0) / total if total else float("nan"))
            out.ratio("polite_throughput_with_abuser_to_alone",
                      ratio(res["polite_records_per_s_with_abuser"], res["polite_records_per_s_alone"]), better="higher",
                      description="polite devices' acknowledged records/s beside a flooding device over alone (1.0: unaffected)")
            out.ratio("polite_p99_with_abuser_to_alone", ratio(res["polite_p99_ack_ms_with_abuser"], res["polite_p99_ack_ms_alone"]),
                      better="lower", tolerance=0.5,
                      description="polite devices' p99 ack latency beside a flooding device over alone")
            ctx.log(f"  abuse rep {rep + 1}: polite {res['polite_records_per_s_alone']:,.0f} -> {res['polite_records_per_s_with_abuser']:,.0f} rec/s "
                    f"with the abuser, p99 {res['polite_p99_ack_ms_alone']:.1f} -> {res['polite_p99_ack_ms_with_abuser']:.1f} ms")
