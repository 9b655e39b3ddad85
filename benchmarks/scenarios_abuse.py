"""Abuse resistance (``benchmarks/abuse.py``): do polite devices keep their throughput beside attackers?

``abuse.run`` starts its own gateway with per-device rate limits, measures the polite devices alone,
then beside each attack (each paired with a run alone just before it) (a flooding device, forged decompression bombs, slow bodies, idle sockets)
run from another process and address. This adapter runs it once per repetition and turns its
figures into the harness's: per attack, the polite devices' throughput over alone (target >= 0.95)
and their p99 ack latency over alone (target <= 2).
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks.scenario import Collector, Context, Repeated, missing_module


class AbuseScenario(Repeated):
    name = "abuse"
    title = "Abuse: one device flooding the gateway beside polite ones (per-device rate limits on)"

    def unavailable(self, ctx: Context) -> str | None:
        return missing_module("abuse", "run")

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        module = importlib.import_module("benchmarks.abuse")
        seconds = {"quick": 1.0, "default": 6.0}.get(ctx.profile.name, 12.0)
        args = argparse.Namespace(seconds=seconds, devices=8, rate=20.0, records=50, abuser_records=500, limit=2000.0,
                                  abuse=None, attacks=module.ATTACKS)
        res = await module.run(args)
        out.figure("polite_offered_records_per_sec", res["polite_offered_records_per_sec"], "rec/s")
        out.figure("polite_records_per_sec_alone", res["polite_records_per_sec_alone"], "rec/s")
        out.figure("polite_p99_ack_ms_alone", res["polite_p99_ack_ms_alone"], "ms")
        for attack in module.ATTACKS:
            got = res[attack]
            name = attack.replace("-", "_")
            out.figure(f"{name}_polite_records_per_sec", got["polite_records_per_sec"], "rec/s")
            out.figure(f"{name}_polite_p99_ack_ms", got["polite_p99_ack_ms"], "ms")
            out.figure(f"{name}_gateway_cores", got["gateway_cores_attacked"], "cores")
            out.ratio(f"polite_throughput_with_{name}_to_alone", got["throughput_ratio"], better="higher",
                      description=f"polite devices' acknowledged records/s beside the {attack} attack over alone (target >= 0.95)")
            out.ratio(f"polite_p99_with_{name}_to_alone", got["p99_ratio"], better="lower", tolerance=0.5,
                      description=f"polite devices' p99 ack latency beside the {attack} attack over alone (target <= 2)")
            ctx.log(f"  abuse rep {rep + 1} {attack}: polite {got['polite_records_per_sec_alone']:,.0f} -> "
                    f"{got['polite_records_per_sec']:,.0f} rec/s, p99 {got['polite_p99_ack_ms_alone']:.1f} -> "
                    f"{got['polite_p99_ack_ms']:.1f} ms, gateway {got['gateway_cores_alone']:.2f} -> "
                    f"{got['gateway_cores_attacked']:.2f} cores; attacker used {got['attacker_cpu_secs']} CPU-s, got {got['attacker_got']}")
