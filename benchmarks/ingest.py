"""Ingest benchmark: the gateway end to end against the bare aiohttp + msgspec ceiling, same run.

    python -m benchmarks.ingest [--reps 3] [--seconds 6] [--records 300] [--workers N] [--raw-only] [--with-seq] [--profile DIR] [--json out.json]

For each repetition: the disk's own fsync latency (an append + fdatasync probe beside the WAL);
the ceiling's maximum throughput (closed loop); the gateway's maximum (HTTP in, authenticated,
validated, enriched, WAL-fsynced, acked, landed in the local lake) with its records per
CPU-second, all its processes counted, and the CPU of each; ack latency at half of that maximum
(open loop, from intended send time) next to the WAL's fsync p99 over the same run (from the
gateway's /metrics); and an overload at 1.5x the maximum (status shares, goodput, peak RSS).
Medians over repetitions, ratios per rep. The curated zone (scoring + Parquet) is on, as by
default; ``--raw-only`` turns inference off, so only the raw and quarantine zones land. Records carry
no ``seq`` unless ``--with-seq``: then each device numbers its records as devices do, and the retry
ledger remembers every one.
``--profile DIR`` adds, after the first repetition's measurements, a run at maximum load under
py-spy: flame graphs and CPU per stage of the record path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import profile, servers
from benchmarks.disk import fsync_latency
from benchmarks.gateway_metrics import with_wal_fsync_p99_ms
from benchmarks.loadgen import closed_loop, prepare
from benchmarks.servers import GATEWAY_CONFIG, make_devices, measure_max, measure_open, start_ceiling, start_gateway

RAW_ONLY = "\n[inference]\nenabled = false\n"

__all__ = ["GATEWAY_CONFIG", "make_devices", "measure_max", "measure_open", "start_ceiling", "start_gateway", "main"]


async def one_rep(args, workdir: Path, profile_dir: Path | None = None) -> dict:
    root = Path(tempfile.mkdtemp(dir=workdir))
    devices = make_devices(root, args.devices)
    prepared = prepare(devices, records_per_request=args.records, with_seq=args.with_seq)
    disk = await asyncio.to_thread(fsync_latency, root)
    ceiling = start_ceiling(root)
    try:
        ceiling_max = await measure_max(ceiling, prepared, args.seconds, args.concurrency)
    finally:
        ceiling.stop()
    gateway = start_gateway(root, workers=args.workers, extra=RAW_ONLY if args.raw_only else "")
    stages = None
    try:
        startup_secs = gateway.startup_secs
        gw_max = await measure_max(gateway, prepared, args.seconds, args.concurrency)
        half, half["wal_fsync_p99_ms"] = await with_wal_fsync_p99_ms(
            gateway.ops_url, measure_open(gateway, prepared, gw_max["requests_per_sec"] / 2, args.seconds)
        )
        overload = await measure_open(gateway, prepared, gw_max["requests_per_sec"] * 1.5, args.seconds)
        if profile_dir is not None:
            stages = await profiled_run(gateway, prepared, args, profile_dir)
    finally:
        exit_code = gateway.stop()
    landed = sum(1 for _ in (root / "lake" / "raw").rglob("*.ndjson.zst"))
    shutil.rmtree(root, ignore_errors=True)
    return {
        "ceiling": ceiling_max,
        "gateway": gw_max,
        "half_load": half,
        "overload": overload,
        "disk_fsync": disk,
        "ratio_gateway_to_ceiling": gw_max["records_per_sec"] / ceiling_max["records_per_sec"],
        "cpu_by_stage": stages,
        "startup_secs": startup_secs,
        "gateway_exit_code": exit_code,
        "raw_objects_landed": landed,
        "body_bytes": prepared.bytes_per_request,
    }


async def profiled_run(gateway, prepared, args, out_dir: Path) -> list[dict]:
    """Maximum load once more, with py-spy on every gateway process: CPU per stage and record."""
    profiler = profile.Profiler(gateway.proc.pid, out_dir, args.seconds, label=f"ingest-w{args.workers}")
    cpu0 = gateway.cpu_seconds()
    run = await closed_loop(gateway.url, prepared, concurrency=args.concurrency, duration_secs=args.seconds)
    cpu_secs = gateway.cpu_seconds() - cpu0
    result = await asyncio.to_thread(profiler.finish, run.records, cpu_secs)
    profile.print_table(result)
    return result.table()


def summarize(reps: list[dict]) -> dict:
    def stat(path: list[str]) -> dict:
        values = []
        for rep in reps:
            v = rep
            for p in path:
                v = v[p]
            values.append(v)
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {
        "ratio_gateway_to_ceiling": stat(["ratio_gateway_to_ceiling"]),
        "ceiling_records_per_sec": stat(["ceiling", "records_per_sec"]),
        "gateway_records_per_sec": stat(["gateway", "records_per_sec"]),
        "gateway_mb_per_sec": stat(["gateway", "mb_per_sec"]),
        "gateway_records_per_cpu_secs": stat(["gateway", "records_per_cpu_secs"]),
        "half_load_p50_ms": stat(["half_load", "p50_ms"]),
        "half_load_p99_ms": stat(["half_load", "p99_ms"]),
        "half_load_wal_fsync_p99_ms": stat(["half_load", "wal_fsync_p99_ms"]),
        "disk_fsync_p99_ms": stat(["disk_fsync", "p99_ms"]),
        "overload_goodput_records_per_sec": stat(["overload", "goodput_records_per_sec"]),
        "overload_shed_share": stat(["overload", "shed_share"]),
        "overload_refused_p99_ms": stat(["overload", "refused_p99_ms"]),
        "overload_accepted_max_ms": stat(["overload", "accepted_max_ms"]),
        "overload_peak_rss_mb": stat(["overload", "peak_rss_mb"]),
        "gateway_peak_rss_mb": stat(["gateway", "peak_rss_mb"]),
        "startup_secs": stat(["startup_secs"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--records", type=int, default=300, help="records per request (300 ~ 64 KiB)")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=servers.workers_per_gateway,
                        help="the gateway's listen.workers (default: one per CPU, as deployed)")
    parser.add_argument("--raw-only", action="store_true", help="inference off: no curated zone, only raw and quarantine land")
    parser.add_argument("--with-seq", action="store_true",
                        help="records carry seq numbers, new in every request, as devices send them: the retry ledger remembers each")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="also profile with py-spy; flame graphs go here")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    if args.profile and not profile.available():
        parser.error("--profile needs py-spy (pip install py-spy)")
    workdir = Path(tempfile.mkdtemp(prefix="edge-gateway-bench-"))
    reps = []
    for i in range(args.reps):
        rep = asyncio.run(one_rep(args, workdir, args.profile if i == 0 else None))
        reps.append(rep)
        print(
            f"rep {i + 1}/{args.reps}: ceiling {rep['ceiling']['records_per_sec']:,.0f} rec/s, "
            f"gateway {rep['gateway']['records_per_sec']:,.0f} rec/s (ratio {rep['ratio_gateway_to_ceiling']:.2f}), "
            f"{rep['gateway']['records_per_cpu_secs']:,.0f} rec/CPU-s, p99 at half load {rep['half_load']['p99_ms']:.1f} ms "
            f"(WAL fsync p99 {rep['half_load']['wal_fsync_p99_ms']:.1f} ms, disk {rep['disk_fsync']['p99_ms']:.1f} ms), "
            f"overload peak RSS {rep['overload']['peak_rss_mb']:.0f} MiB",
            flush=True,
        )
    shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "scenario": "ingest",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summarize(reps),
        "reps": reps,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    s = result["summary"]
    print(
        "\nmedian over {n} reps: gateway/ceiling {r:.2f} [{rmin:.2f}-{rmax:.2f}]; gateway {g:,.0f} rec/s ({mb:.1f} MB/s, "
        "{cpu:,.0f} rec/CPU-s); ack p99 at half load {p99:.1f} ms vs disk fsync p99 {disk:.1f} ms; "
        "overload (1.5x): {shed:.0%} shed (503 p99 {refused:.0f} ms), longest accepted {accepted_max:.0f} ms, "
        "peak RSS {rss:.0f} MiB".format(
            n=len(reps),
            r=s["ratio_gateway_to_ceiling"]["median"],
            rmin=s["ratio_gateway_to_ceiling"]["min"],
            rmax=s["ratio_gateway_to_ceiling"]["max"],
            g=s["gateway_records_per_sec"]["median"],
            mb=s["gateway_mb_per_sec"]["median"],
            p99=s["half_load_p99_ms"]["median"],
            cpu=s["gateway_records_per_cpu_secs"]["median"],
            disk=s["disk_fsync_p99_ms"]["median"],
            shed=s["overload_shed_share"]["median"],
            refused=s["overload_refused_p99_ms"]["median"],
            accepted_max=s["overload_accepted_max_ms"]["median"],
            rss=s["overload_peak_rss_mb"]["median"],
        )
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
