"""Scenarios that drive real servers over loopback HTTP: the ceiling, the gateway to the local lake
and to S3, overload, the soak and start-up. Every gateway figure is paired with the bare ceiling
measured in the same repetition, minutes apart at most, so the ratio survives a noisy machine."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from benchmarks.disk import fsync_latency
from benchmarks.gateway_metrics import with_wal_fsync_p99_ms
from benchmarks.loadgen import Prepared, open_loop, prepare
from benchmarks.processes import AWS_DUMMY_ENV, MotoServer, Server, triton_unavailable
from benchmarks.scenario import Collector, Context, Repeated
from benchmarks.servers import (
    make_devices,
    measure_max,
    measure_open,
    measure_sustained,
    open_result,
    start_ceiling,
    start_gateway,
)
from benchmarks.stats import growth, percentile, ratio


def _prepared(ctx: Context, root: Path, *, with_seq: bool = False) -> Prepared:
    p = ctx.profile
    return prepare(make_devices(root, p.devices), records_per_request=p.records_per_request, with_seq=with_seq)


@contextlib.contextmanager
def _serving(server: Server) -> Iterator[Server]:
    """The server until the block ends, however it ends; its exit code is then ``server.proc.returncode``."""
    try:
        yield server
    finally:
        server.stop()


async def _max(ctx: Context, out: Collector, server: Server, prepared: Prepared, label: str, concurrency: int | None = None) -> dict:
    """The closed-loop maximum, with the generator's load recorded under ``label``."""
    result = await measure_max(server, prepared, ctx.profile.seconds, concurrency or ctx.profile.concurrency)
    out.load(label, generator_cpu_share=result["generator_cpu_share"])
    return result


async def _ceiling_max(ctx: Context, root: Path, prepared: Prepared, out: Collector, rep: int) -> dict:
    with _serving(start_ceiling(root)) as ceiling:
        return await _max(ctx, out, ceiling, prepared, f"ceiling max, rep {rep + 1}")


async def _max_and_half(ctx: Context, out: Collector, server: Server, prepared: Prepared, rep: int, label: str = "gateway max") -> tuple[dict, dict]:
    """The server's start-up time, its maximum, then an open loop at half of that maximum."""
    p = ctx.profile
    out.figure("startup_secs", server.startup_secs, "s")
    top = await _max(ctx, out, server, prepared, f"{label}, rep {rep + 1}")
    half = await measure_open(server, prepared, top["requests_per_sec"] * 0.5, p.seconds, warmup_secs=p.warmup_secs, seed=ctx.seed + rep)
    out.load(f"half load, rep {rep + 1}", generator_cpu_share=half["generator_cpu_share"], send_lag_p99_secs=half["send_lag_p99_secs"])
    return top, half


def _ratios_to_ceiling(out: Collector, gw: dict, ceil: dict, records: str = "") -> None:
    """The gateway's maximum and its records per CPU-second over the bare ceiling's, same repetition."""
    out.ratio("gateway_to_ceiling_throughput", ratio(gw["records_per_sec"], ceil["records_per_sec"]), better="higher",
              description=f"gateway max records/s over the bare ceiling's{records}, same repetition (target >= 0.70)")
    out.ratio("gateway_to_ceiling_cpu_efficiency", ratio(gw["records_per_cpu_secs"], ceil["records_per_cpu_secs"]), better="higher",
              description=f"gateway records per server CPU-second over the ceiling's{records}")


def _sweep_point(out: Collector, label: str, level: float, res: dict) -> None:
    out.load(label, generator_cpu_share=res["generator_cpu_share"], send_lag_p99_secs=res["send_lag_p99_secs"])
    out.append_series("sweep", {"fraction": level, **{k: v for k, v in res.items() if k != "statuses"}})


class CeilingScenario(Repeated):
    name = "ceiling"
    title = "Bare ceiling: aiohttp on uvloop + msgspec decode, no auth, no WAL, no lake"

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        with self.rep_dir(ctx, rep) as root:
            prepared = _prepared(ctx, root)
            with _serving(start_ceiling(root)) as ceiling:
                m, half = await _max_and_half(ctx, out, ceiling, prepared, rep, label="max")
        out.figure("records_per_sec", m["records_per_sec"], "rec/s")
        out.figure("mb_per_sec", m["mb_per_sec"], "MB/s")
        out.figure("records_per_cpu_secs", m["records_per_cpu_secs"], "rec/CPU-s")
        out.figure("server_cpu_share", m["server_cpu_share"], "cores")
        out.figure("generator_cpu_share_at_max", m["generator_cpu_share"], "cores")
        out.figure("half_load_p50_ms", half["p50_ms"], "ms")
        out.figure("half_load_p99_ms", half["p99_ms"], "ms")
        out.figure("generator_to_server_cpu", ratio(m["generator_cpu_share"], m["server_cpu_share"]))
        ctx.log(f"  ceiling rep {rep + 1}: {m['records_per_sec']:,.0f} rec/s, p99 at half load {half['p99_ms']:.1f} ms")


class IngestScenario(Repeated):
    name = "ingest"
    title = ("End to end to the local lake (HMAC auth, validate, enrich, WAL fsync, ack, land raw; score with the embedded "
             "model and land curated Parquet when the build has it) vs the ceiling, with a load sweep")

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        p = ctx.profile
        with self.rep_dir(ctx, rep) as root:
            prepared = _prepared(ctx, root)
            ceil = await _ceiling_max(ctx, root, prepared, out, rep)
            with _serving(start_gateway(root)) as gateway:
                out.figure("startup_secs", gateway.startup_secs, "s")
                gw = await _max(ctx, out, gateway, prepared, f"gateway max, rep {rep + 1}")
                half = None
                for i, level in enumerate(p.sweep):
                    # The WAL's own fsyncs meanwhile: the ack p99 target is fsync p99 + 10 ms.
                    res, res["wal_fsync_p99_ms"] = await with_wal_fsync_p99_ms(gateway.ops_url, measure_open(
                        gateway, prepared, gw["requests_per_sec"] * level, p.seconds, warmup_secs=p.warmup_secs, seed=ctx.seed + 100 * rep + i))
                    res["rep"] = rep
                    res["capacity_records_per_sec"] = gw["records_per_sec"]
                    _sweep_point(out, f"{level:.2f}x, rep {rep + 1}", level, res)
                    if level == 0.5:
                        half = res
                if half is None:
                    half, half["wal_fsync_p99_ms"] = await with_wal_fsync_p99_ms(gateway.ops_url, measure_open(
                        gateway, prepared, gw["requests_per_sec"] * 0.5, p.seconds, warmup_secs=p.warmup_secs, seed=ctx.seed + rep))
                disk = await asyncio.to_thread(fsync_latency, root)  # the disk by itself, beside the WAL
            landed = list((root / "lake" / "raw").rglob("*.ndjson.zst"))
            curated = list((root / "lake" / "curated").rglob("*.parquet"))
        exit_code = gateway.proc.returncode
        out.figure("ceiling_records_per_sec", ceil["records_per_sec"], "rec/s")
        out.figure("ceiling_records_per_cpu_secs", ceil["records_per_cpu_secs"], "rec/CPU-s")
        out.figure("gateway_records_per_sec", gw["records_per_sec"], "rec/s")
        out.figure("gateway_mb_per_sec", gw["mb_per_sec"], "MB/s")
        out.figure("gateway_records_per_cpu_secs", gw["records_per_cpu_secs"], "rec/CPU-s")
        out.figure("gateway_peak_rss_mb", gw["peak_rss_mb"], "MiB")
        out.figure("half_load_p50_ms", half["p50_ms"], "ms")
        out.figure("half_load_p99_ms", half["p99_ms"], "ms")
        out.figure("half_load_p99.9_ms", half["p99.9_ms"], "ms")
        out.figure("half_load_wal_fsync_p99_ms", half["wal_fsync_p99_ms"], "ms")
        out.figure("disk_fsync_p99_ms", disk["p99_ms"], "ms")
        out.figure("half_load_p99_over_fsync_p99_ms", half["p99_ms"] - disk["p99_ms"], "ms")
        for role, cpu_secs in gw["cpu_secs_by_process"].items():
            out.figure(f"gateway_cpu_share_{role.replace(' ', '_')}", cpu_secs / p.seconds, "cores")
        out.figure("raw_objects_landed", len(landed), "objects")
        out.figure("curated_objects_landed", len(curated), "objects")
        out.figure("gateway_exit_code", exit_code if exit_code is not None else math.nan)
        _ratios_to_ceiling(out, gw, ceil)
        ctx.log(f"  ingest rep {rep + 1}: ceiling {ceil['records_per_sec']:,.0f} rec/s, gateway {gw['records_per_sec']:,.0f} rec/s "
                f"(ratio {gw['records_per_sec'] / ceil['records_per_sec']:.2f}), p99 at half load {half['p99_ms']:.1f} ms")
        out.series("body_bytes", prepared.bytes_per_request)


class IngestWithSeqScenario(Repeated):
    name = "ingest-seq"
    title = ("The same end to end with every record numbered (seq), as devices send them, so the retry ledger "
             "remembers each: maximum and half load vs the ceiling")

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        with self.rep_dir(ctx, rep) as root:
            prepared = _prepared(ctx, root, with_seq=True)
            ceil = await _ceiling_max(ctx, root, prepared, out, rep)
            with _serving(start_gateway(root)) as gateway:
                gw, half = await _max_and_half(ctx, out, gateway, prepared, rep)
        out.figure("ceiling_records_per_sec", ceil["records_per_sec"], "rec/s")
        out.figure("gateway_records_per_sec", gw["records_per_sec"], "rec/s")
        out.figure("gateway_records_per_cpu_secs", gw["records_per_cpu_secs"], "rec/CPU-s")
        out.figure("gateway_peak_rss_mb", gw["peak_rss_mb"], "MiB")
        out.figure("half_load_p99_ms", half["p99_ms"], "ms")
        out.figure("gateway_exit_code", gateway.proc.returncode if gateway.proc.returncode is not None else math.nan)
        _ratios_to_ceiling(out, gw, ceil, ", records numbered")
        ctx.log(f"  ingest-seq rep {rep + 1}: ceiling {ceil['records_per_sec']:,.0f} rec/s, gateway {gw['records_per_sec']:,.0f} rec/s "
                f"({gw['records_per_cpu_secs']:,.0f} rec/CPU-s), p99 at half load {half['p99_ms']:.1f} ms")


# The gateway as deployed behind an ALB: the load generator's loopback address is the trusted proxy.
BEHIND_PROXY = '[proxy]\ntrusted_cidrs = ["127.0.0.1/32"]\n'
FLEET_DEVICES = 500

# How long the gateway gets to turn ready again once the overload stops.
READY_AFTER_OVERLOAD_S = 60.0


def _time_to_ready(server, timeout_secs: float) -> float:
    """Seconds until ``/readyz`` answers 2xx again; NaN if it does not within ``timeout_secs``."""
    import urllib.error
    import urllib.request

    begin = time.monotonic()
    while time.monotonic() - begin < timeout_secs:
        try:
            with urllib.request.urlopen(server.url + server.ready_path, timeout=1) as resp:
                if 200 <= resp.status < 300:
                    return time.monotonic() - begin
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.05)
    return math.nan


class OverloadScenario(Repeated):
    name = "overload"
    title = ("Overload at 1.5x and 3x the measured capacity: shed share (429/503) and how fast refusals come, "
             "goodput, the longest wait of an accepted request, memory")

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        p = ctx.profile
        # Figures at the first factor keep their plain names (the baseline's); the second adds "_at_<f>x".
        factors = (p.overload_factor, 2 * p.overload_factor)
        with self.rep_dir(ctx, rep) as root:
            # As deployed: behind a load balancer (trusted, passing each device's address) and with
            # devices that wait out a refusal's Retry-After, as the device API asks. Sources that
            # ignore it are the abuse benchmark's business (they get their refusals late).
            # A fleet, not a few fast senders: a refusal's Retry-After (whole seconds) then idles one
            # device's next request or so, rather than a fiftieth of the offered load for a second.
            devices = max(p.devices, FLEET_DEVICES)
            prepared = prepare(make_devices(root, devices), records_per_request=p.records_per_request, behind_proxy=True, distinct=devices)
            overs = []
            with _serving(start_gateway(root, extra=BEHIND_PROXY)) as gateway:
                # Twice the usual requests in flight: WAL group commit batches more under more concurrency,
                # and an overload must exceed what the gateway can really do.
                cap = await _max(ctx, out, gateway, prepared, f"capacity, rep {rep + 1}", concurrency=2 * p.concurrency)
                half = await measure_open(gateway, prepared, cap["requests_per_sec"] * 0.5, p.seconds, warmup_secs=p.warmup_secs, seed=ctx.seed + rep)
                for i, factor in enumerate(factors):
                    over = await measure_open(gateway, prepared, cap["requests_per_sec"] * factor, p.seconds,
                                              warmup_secs=p.warmup_secs, seed=ctx.seed + 50 + 10 * i + rep, honor_retry_after=True)
                    out.load(f"{factor}x, rep {rep + 1}", generator_cpu_share=over["generator_cpu_share"], send_lag_p99_secs=over["send_lag_p99_secs"])
                    overs.append((factor, over))
                recovery_secs = _time_to_ready(gateway, READY_AFTER_OVERLOAD_S)
        out.figure("capacity_records_per_sec", cap["records_per_sec"], "rec/s")
        out.figure("half_load_peak_rss_mb", half["peak_rss_mb"], "MiB")
        for i, (factor, over) in enumerate(overs):
            self._record(ctx, out, factor, "" if i == 0 else f"_at_{factor:g}x", over, cap, half, rep)
        out.figure("ready_after_overload", 1.0 if math.isfinite(recovery_secs) else 0.0)
        out.figure("seconds_to_ready_after_overload", recovery_secs, "s")
        if not math.isfinite(recovery_secs):
            out.note(f"In some repetitions /readyz did not answer 200 within {READY_AFTER_OVERLOAD_S:.0f} s after the "
                     "overload ended (the figure ready_after_overload counts the repetitions that recovered).")

    @staticmethod
    def _record(ctx: Context, out: Collector, factor: float, suffix: str, over: dict, cap: dict, half: dict, rep: int) -> None:
        over["rep"], over["capacity_records_per_sec"] = rep, cap["records_per_sec"]
        out.append_series("points", {"fraction": factor, **{k: v for k, v in over.items() if k != "statuses"}})
        out.figure(f"offered_records_per_sec{suffix}", over["offered_records_per_sec"], "rec/s")
        out.figure(f"goodput_records_per_sec{suffix}", over["goodput_records_per_sec"], "rec/s")
        out.figure(f"shed_share{suffix}", over["shed_share"])
        out.figure(f"deferred_share{suffix}", over["deferred_share"])
        out.figure(f"error_share{suffix}", over["error_share"])
        out.figure(f"unfinished_share{suffix}", over["unfinished_share"])
        out.figure(f"p50_ms{suffix}", over["p50_ms"], "ms")
        out.figure(f"p99_ms{suffix}", over["p99_ms"], "ms")
        out.figure(f"refused_p99_ms{suffix}", over["refused_p99_ms"], "ms")
        out.figure(f"accepted_max_ms{suffix}", over["accepted_max_ms"], "ms")
        out.figure(f"peak_rss_mb{suffix}", over["peak_rss_mb"], "MiB")
        out.ratio(f"goodput_to_capacity{suffix}", ratio(over["goodput_records_per_sec"], cap["records_per_sec"]), better="higher",
                  description=f"goodput at {factor:g}x offered load over the closed-loop capacity, same repetition (target >= 0.90)")
        out.ratio(f"peak_rss_overload_to_half_load{suffix}", ratio(over["peak_rss_mb"], half["peak_rss_mb"]), better="lower",
                  description=f"peak RSS at {factor:g}x over peak RSS at half load (bounded memory)")
        if over["goodput_records_per_sec"] > cap["records_per_sec"]:
            out.note(f"In some repetitions goodput at {factor:g}x exceeded the closed-loop capacity: the gateway absorbed the "
                     "offered load there, so those repetitions did not overload it.")
        ctx.log(f"  overload {factor:g}x rep {rep + 1}: goodput {over['goodput_records_per_sec']:,.0f} of capacity "
                f"{cap['records_per_sec']:,.0f} rec/s, shed {over['shed_share']:.0%}, deferred {over['deferred_share']:.0%} (503 p99 {over['refused_p99_ms']:.0f} ms), "
                f"longest accepted {over['accepted_max_ms']:.0f} ms, peak RSS {over['peak_rss_mb']:.0f} MiB")


class S3Scenario(Repeated):
    name = "s3"
    title = "End to end to S3 (moto_server on loopback), scored by the embedded model, vs the ceiling"

    def unavailable(self, ctx: Context) -> str | None:
        for module in ("moto", "connectors.aws.s3"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install -e '.[test]')"
        if importlib.util.find_spec("flask") is None:
            return "moto's server mode is not installed (pip install 'moto[server]')"
        if not s3_lake_kind_wired():
            return 'lake.kind = "s3" is not selectable from the gateway configuration in this build'
        return None

    @contextlib.asynccontextmanager
    async def around(self, ctx: Context, out: Collector) -> AsyncIterator[None]:
        """One moto server for every repetition (each gets its own bucket), with dummy AWS credentials."""
        import os

        out.note("moto answers every request with `Connection: close` and spends 3-8 ms of CPU per MB on the same "
                 "2 cores, so these figures bound the gateway from below; the ratio to the ceiling is what to compare.")
        saved = {k: os.environ.get(k) for k in AWS_DUMMY_ENV}
        os.environ.update(AWS_DUMMY_ENV)
        self._moto = moto = MotoServer(ctx.workdir / "moto.log")
        try:
            moto.wait_ready(timeout=60)
            yield
        finally:
            moto.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        moto = self._moto
        with self.rep_dir(ctx, rep) as root:
            prepared = _prepared(ctx, root)
            ceil = await _ceiling_max(ctx, root, prepared, out, rep)
            bucket = f"bench-lake-{rep}"
            await _create_bucket(moto.url, bucket)
            extra = (f'\n[s3]\nbucket = "{bucket}"\nendpoint_url = "{moto.url}"\nregion = "us-east-1"\n'
                     'addressing_style = "path"\n')
            with _serving(start_gateway(root, extra=extra, lake_kind="s3", env=AWS_DUMMY_ENV, timeout=60)) as gateway:
                gw, half = await _max_and_half(ctx, out, gateway, prepared, rep)
                moto_cpu = moto.cpu_seconds()
            objects, size = await _bucket_contents(moto.url, bucket)
        exit_code = gateway.proc.returncode
        out.figure("ceiling_records_per_sec", ceil["records_per_sec"], "rec/s")
        out.figure("gateway_records_per_sec", gw["records_per_sec"], "rec/s")
        out.figure("gateway_records_per_cpu_secs", gw["records_per_cpu_secs"], "rec/CPU-s")
        out.figure("gateway_peak_rss_mb", gw["peak_rss_mb"], "MiB")
        out.figure("half_load_p50_ms", half["p50_ms"], "ms")
        out.figure("half_load_p99_ms", half["p99_ms"], "ms")
        out.figure("objects_in_bucket_after_drain", objects, "objects")
        out.figure("bytes_in_bucket_after_drain", size, "B")
        out.figure("moto_cpu_secs_total", moto_cpu, "s")
        out.figure("gateway_exit_code", exit_code if exit_code is not None else math.nan)
        out.ratio("gateway_to_ceiling_throughput", ratio(gw["records_per_sec"], ceil["records_per_sec"]), better="higher",
                  description="the full path (signed, validated, enriched, WAL-fsynced, acked, scored, landed in S3 through moto): "
                              "max records/s over the bare ceiling's, same repetition (target >= 0.70)")
        ctx.log(f"  s3 rep {rep + 1}: ceiling {ceil['records_per_sec']:,.0f} rec/s, gateway {gw['records_per_sec']:,.0f} rec/s, "
                f"{objects} objects landed, p99 at half load {half['p99_ms']:.1f} ms")


def s3_lake_kind_wired() -> bool:
    """Whether this build selects the S3 lake from the configuration file (``[lake] kind = "s3"`` + ``[s3]``)."""
    from gateway.settings import Settings

    return "s3" in getattr(Settings, "__struct_fields__", ())


def inference_wired() -> bool:
    """Whether this build scores records in the gateway (an ``[inference]`` section)."""
    from gateway.settings import Settings

    return "inference" in getattr(Settings, "__struct_fields__", ())


async def _create_bucket(endpoint_url: str, bucket: str) -> None:
    from connectors.aws import client as aws

    session = aws.build_session()
    async with session.create_client("s3", region_name="us-east-1", endpoint_url=endpoint_url) as client:
        await client.create_bucket(Bucket=bucket)


class TritonIngestScenario(Repeated):
    name = "ingest-triton"
    title = "End to end to the local lake, scored by a real Triton server (PyTriton on CPU, gRPC), vs the ceiling"

    def unavailable(self, ctx: Context) -> str | None:
        if not inference_wired():
            return "the gateway has no [inference] section in this build"
        return triton_unavailable(ctx.profile)

    @contextlib.asynccontextmanager
    async def around(self, ctx: Context, out: Collector) -> AsyncIterator[None]:
        """One Triton server for every repetition; each repetition's gateway scores through it."""
        from benchmarks.processes import TritonServer

        workspace = Path(tempfile.mkdtemp(prefix="triton-", dir=ctx.workdir))
        self._triton = triton = TritonServer(ctx.workdir / "triton-e2e.log", workspace / "ws")
        try:
            out.figure("triton_startup_secs", await asyncio.to_thread(triton.wait_ready, 180.0), "s")
            self._extra = (f'\n[inference]\nbackend = "triton"\n[[inference.endpoints]]\nurl = "127.0.0.1:{triton.grpc_port}"\n'
                           'protocol = "grpc"\n')
            yield
        finally:
            await asyncio.to_thread(triton.stop)
            shutil.rmtree(workspace, ignore_errors=True)

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        triton = self._triton
        with self.rep_dir(ctx, rep) as root:
            prepared = _prepared(ctx, root)
            ceil = await _ceiling_max(ctx, root, prepared, out, rep)
            with _serving(start_gateway(root, extra=self._extra, timeout=60)) as gateway:
                cpu0 = triton.cpu_seconds()
                gw, half = await _max_and_half(ctx, out, gateway, prepared, rep)
                triton_cpu = triton.cpu_seconds() - cpu0
            curated = list((root / "lake" / "curated").rglob("*.parquet"))
        out.figure("ceiling_records_per_sec", ceil["records_per_sec"], "rec/s")
        out.figure("gateway_records_per_sec", gw["records_per_sec"], "rec/s")
        out.figure("gateway_records_per_cpu_secs", gw["records_per_cpu_secs"], "rec/CPU-s")
        out.figure("half_load_p99_ms", half["p99_ms"], "ms")
        out.figure("triton_process_cpu_secs", triton_cpu, "s")
        out.figure("curated_objects_landed", len(curated), "objects")
        out.ratio("gateway_to_ceiling_throughput", ratio(gw["records_per_sec"], ceil["records_per_sec"]), better="higher",
                  description="gateway scoring through Triton (local lake): max records/s over the bare ceiling's, same repetition")
        ctx.log(f"  ingest-triton rep {rep + 1}: ceiling {ceil['records_per_sec']:,.0f} rec/s, gateway {gw['records_per_sec']:,.0f} rec/s, "
                f"{len(curated)} curated objects, p99 at half load {half['p99_ms']:.1f} ms")


async def _bucket_contents(endpoint_url: str, bucket: str) -> tuple[int, int]:
    from connectors.aws import client as aws

    session = aws.build_session()
    count = size = 0
    async with session.create_client("s3", region_name="us-east-1", endpoint_url=endpoint_url) as client:
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                count += 1
                size += item["Size"]
    return count, size


class SoakScenario(Repeated):
    name = "soak"
    title = "Soak at 70% of the measured capacity: refusals, RSS, open files and CPU over time"

    def repetitions(self, ctx: Context) -> int:
        return 1  # one long run; its figures are over time windows

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        p = ctx.profile
        with self.rep_dir(ctx, rep) as root:
            prepared = _prepared(ctx, root)
            with _serving(start_gateway(root)) as gateway:
                # Sustained capacity: what every zone lands, not what the WAL absorbs for a while.
                cap = await measure_sustained(gateway, prepared, min(p.seconds, 5.0), p.concurrency)
                rps = cap["requests_per_sec"] * p.soak_load
                window = _replay_window_secs()
                if window and p.soak_secs < 3 * window:
                    out.note(f"The gateway remembers every request signature for its {window:.0f} s timestamp window (replay "
                             f"guard), so memory grows for the first {window:.0f} s by design; a soak shorter than "
                             f"{3 * window:.0f} s (--soak-seconds; the release soak is 30 minutes) cannot tell that from a leak.")
                out.note(f"{p.soak_secs:.0f} s at {p.soak_load:.0%} of the sustained capacity measured just before "
                         f"({cap['records_per_sec']:,.0f} rec/s landed in every zone; acks alone reached {cap['ack_records_per_sec']:,.0f} rec/s "
                         f"while the WAL absorbed the difference), Poisson arrivals; one repetition, figures are over time windows.")
                out.figure("sustained_capacity_records_per_sec", cap["records_per_sec"], "rec/s")
                out.figure("ack_capacity_records_per_sec", cap["ack_records_per_sec"], "rec/s")
                cpu0 = gateway.cpu_seconds()
                sampler = gateway.start_sampling(interval=p.soak_sample_secs, keep=True)
                run = await open_loop(gateway.url, prepared, requests_per_sec=rps, duration_secs=p.soak_secs, seed=ctx.seed,
                                      warmup_secs=0.0, keep_timeline=True)
                gateway.stop_sampling()
                cpu = gateway.cpu_seconds() - cpu0
        samples = sampler.samples
        res = open_result(run, sampler.peak_rss, cpu)
        out.load("soak", generator_cpu_share=res["generator_cpu_share"], send_lag_p99_secs=res["send_lag_p99_secs"])
        # Growth compares the first and last tenth, after a warm-up tenth (imports, pools, caches fill).
        settled = samples[len(samples) // 10:] or samples
        rss = [s.rss_bytes / 2**20 for s in settled]
        fds = [s.fds for s in settled]
        rss_start, rss_end = growth(rss)
        fd_start, fd_end = growth(fds)
        cpu_pct = [100 * (b.cpu_secs - a.cpu_secs) / (b.t_secs - a.t_secs) for a, b in zip(samples, samples[1:]) if b.t_secs > a.t_secs]
        out.series("timeline", _downsample([
            {"t_secs": s.t_secs, "rss_mb": s.rss_bytes / 2**20, "fds": s.fds, "cpu_pct": c}
            for s, c in zip(samples[1:], cpu_pct)
        ], 600))
        windows = _latency_windows(run.timeline or [], max(1.0, p.soak_secs / 20))
        out.series("latency_windows", windows)
        out.figure("duration_secs", run.duration_secs, "s")
        out.figure("offered_records_per_sec", res["offered_records_per_sec"], "rec/s")
        out.figure("goodput_records_per_sec", res["goodput_records_per_sec"], "rec/s")
        out.figure("p50_ms", res["p50_ms"], "ms")
        out.figure("p99_ms", res["p99_ms"], "ms")
        out.figure("worst_window_p99_ms", max((w["p99_ms"] for w in windows), default=math.nan), "ms")
        out.figure("shed_share", res["shed_share"])
        out.figure("error_share", res["error_share"])
        out.figure("rss_start_mb", rss_start, "MiB")
        out.figure("rss_end_mb", rss_end, "MiB")
        out.figure("rss_growth_mb", rss_end - rss_start, "MiB")
        out.figure("peak_rss_mb", sampler.peak_rss / 2**20, "MiB")
        out.figure("fds_start", fd_start, "fds")
        out.figure("fds_end", fd_end, "fds")
        out.figure("fd_growth", fd_end - fd_start, "fds")
        out.figure("server_cpu_share", res["server_cpu_share"], "cores")
        out.figure("cpu_pct_median", statistics.median(cpu_pct) if cpu_pct else math.nan, "%")
        out.ratio("rss_end_to_start", ratio(rss_end, rss_start), better="lower",
                  description="median RSS of the last tenth of the soak over the first (after a warm-up tenth)")
        out.ratio("fds_end_to_start", ratio(fd_end, fd_start), better="lower",
                  description="open file descriptors, last tenth of the soak over the first")
        ctx.log(f"  soak: RSS {rss_start:.0f} -> {rss_end:.0f} MiB, fds {fd_start:.0f} -> {fd_end:.0f}, p99 {res['p99_ms']:.1f} ms")


def _replay_window_secs() -> float:
    from gateway.settings import Settings

    return float(getattr(Settings().auth, "timestamp_window_secs", 0) or 0)


def _downsample(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _latency_windows(timeline: list[tuple[float, float, int | str]], width_secs: float) -> list[dict]:
    buckets: dict[int, list[float]] = {}
    for t, latency, _status in timeline:
        buckets.setdefault(int(t // width_secs), []).append(latency)
    return [
        {"t_secs": (k + 0.5) * width_secs, "p50_ms": percentile(v, 0.5) * 1000, "p99_ms": percentile(v, 0.99) * 1000, "requests": len(v)}
        for k, v in sorted(buckets.items())
    ]


class StartupScenario(Repeated):
    name = "startup"
    title = "Start-up: process start to the first 200 from /readyz (empty WAL), gateway vs the bare ceiling"

    def repetitions(self, ctx: Context) -> int:
        return ctx.profile.startup_reps

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        with self.rep_dir(ctx, rep) as root:
            make_devices(root, ctx.profile.devices)
            with _serving(start_ceiling(root)) as ceiling:
                pass
            with _serving(start_gateway(root)) as gateway:
                rss = gateway.rss()
        out.figure("gateway_startup_secs", gateway.startup_secs, "s")
        out.figure("ceiling_startup_secs", ceiling.startup_secs, "s")
        out.figure("gateway_rss_at_ready_mb", rss / 2**20, "MiB")
        out.ratio("gateway_to_ceiling_startup", ratio(gateway.startup_secs, ceiling.startup_secs), better="lower",
                  description="gateway start-up time over the bare ceiling's (same Python, same machine, back to back)")
        time.sleep(0.05)

    def finish(self, ctx: Context, out: Collector) -> None:
        ctx.log(f"  startup: gateway {statistics.median(out.figures['gateway_startup_secs']):.3f} s, "
                f"ceiling {statistics.median(out.figures['ceiling_startup_secs']):.3f} s")
