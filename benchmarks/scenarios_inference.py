"""Inference through the adaptive batcher on real endpoints: the embedded CPU model, and Triton
(PyTriton serving the same model on CPU) when ``.venv-triton`` exists.

These scenarios drive the pieces the curated zone scores with (gateway/lake/curated.py), in this
process: ``batching.Batcher`` over a ``connectors`` inferencer, one record per item (the curated zone
submits a request's records as one item). Records arrive
open loop (Poisson, generated on a 1 ms tick, never waiting for results), each with a 50 ms
deadline; latency runs from the record's intended arrival to its outcome. Each repetition finds
the capacity as docs/batching.md §5 defines it (the highest Poisson rate with 99% of records on time,
by bisection below the full-queue throughput), then runs steady 0.5x and 0.9x, a burst run (0.2x
with 1.5x bursts) and an overload at 1.5x, each with a fresh batcher, sampling batch size and
concurrency every 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from benchmarks.loadgen import poisson_arrivals
from benchmarks.processes import TritonServer, triton_unavailable
from benchmarks.scenario import Collector, Context, Repeated
from benchmarks.stats import percentile

SLO_S = 0.050
TICK_S = 0.001
SAMPLE_S = 0.1
MAX_SLICE = 64  # arrivals submitted per turn of the event loop
N_FEATURES = 8


async def _drive(batcher, rows: np.ndarray, offsets: list[float], calls: list[int], sample: bool) -> dict:
    from batching import Deferred, Ok
    from batching.errors import QueueFullError

    latencies: list[float] = []
    counts = {"ok": 0, "late": 0, "deferred": 0, "failed": 0, "shed": 0}
    timeline: list[dict] = []
    pending: set[asyncio.Future] = set()
    clock = batcher.clock
    begin_wall = time.perf_counter()
    begin = clock.now()
    calls0 = calls[0]
    cpu0 = time.process_time()

    def done(fut: asyncio.Future, intended: float) -> None:
        pending.discard(fut)
        record(fut.result(), intended)

    def record(outcome, intended: float) -> None:
        if isinstance(outcome, Ok):
            latency = time.perf_counter() - intended
            latencies.append(latency)
            counts["late" if latency > SLO_S else "ok"] += 1
        elif isinstance(outcome, Deferred):
            counts["deferred"] += 1
        else:
            counts["failed"] += 1

    async def sampler() -> None:
        before = dict(counts)
        while True:
            s = batcher.stats()
            ep = s.endpoints[0]
            # Outcomes that arrived since the previous sample: the on-time share over time.
            window = {k: counts[k] - before[k] for k in counts}
            before = dict(counts)
            resolved = sum(window.values())
            timeline.append({"t_secs": time.perf_counter() - begin_wall, "mean_batch": s.mean_batch_size, "last_batch": s.last_batch_size,
                             "concurrency_limit": ep.concurrency_limit, "in_flight": ep.in_flight, "queue": s.queue_depth,
                             "on_time_share": window["ok"] / resolved if resolved else math.nan,
                             "deferred_share": (window["deferred"] + window["shed"]) / resolved if resolved else math.nan,
                             "late_share": window["late"] / resolved if resolved else math.nan, "resolved": resolved})
            await asyncio.sleep(SAMPLE_S)

    sampling = asyncio.create_task(sampler()) if sample else None
    i, n = 0, len(offsets)
    while i < n:
        now = time.perf_counter() - begin_wall
        # Arrivals that fell due while the loop was busy go in slices, with the batcher running in
        # between, as requests from many connections would: not as one burst that holds the loop.
        slice_end = i + MAX_SLICE
        while i < n and i < slice_end and offsets[i] <= now:
            intended_wall = begin_wall + offsets[i]
            try:
                fut = batcher.submit_nowait(rows[i % len(rows)], begin + offsets[i] + SLO_S)
            except QueueFullError:
                counts["shed"] += 1
            else:
                if fut.done():  # refused on arrival: no callback round trip for an answer already there
                    record(fut.result(), intended_wall)
                else:
                    pending.add(fut)
                    fut.add_done_callback(lambda f, t=intended_wall: done(f, t))
            i += 1
        await asyncio.sleep(0 if i < n and offsets[i] <= now else TICK_S)
    if pending:
        await asyncio.wait(set(pending), timeout=10)
    if sampling is not None:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    elapsed = time.perf_counter() - begin_wall
    offered = len(offsets)
    return {
        "offered": offered,
        "elapsed_secs": elapsed,
        "on_time_share": counts["ok"] / offered if offered else math.nan,
        "late_share": counts["late"] / offered if offered else math.nan,
        "deferred_share": counts["deferred"] / offered if offered else math.nan,
        "failed_share": counts["failed"] / offered if offered else math.nan,
        "shed_share": counts["shed"] / offered if offered else math.nan,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "rpcs_per_record": (calls[0] - calls0) / offered if offered else math.nan,
        "process_cpu_share": (time.process_time() - cpu0) / elapsed,
        "timeline": timeline,
    }


async def _capacity(batcher, rows: np.ndarray, seconds: float) -> float:
    """Records/s with the queue kept full and deadlines far away: what the endpoint and this process sustain."""
    from batching import Ok

    ok = 0
    futures = []
    clock = batcher.clock
    begin = time.perf_counter()
    i = 0
    while time.perf_counter() - begin < seconds:
        futures.append(await batcher.submit(rows[i % len(rows)], clock.now() + 30.0))
        i += 1
        if len(futures) >= 4096:
            ok += sum(isinstance(o, Ok) for o in await asyncio.gather(*futures))
            futures = []
    ok += sum(isinstance(o, Ok) for o in await asyncio.gather(*futures))
    return ok / (time.perf_counter() - begin)


# Capacity: the highest Poisson rate at which this share of records is scored within the deadline (docs/batching.md §5).
ON_TIME_TARGET = 0.99


async def _search_capacity(dispatch, backend: str, rows: np.ndarray, calls: list[int], rough: float, quick: bool, seed: int) -> float:
    """Bisect the offered rate between 0 and the full-queue throughput, with short open-loop runs."""
    from batching import Batcher

    async def holds(rate: float, attempt: int) -> bool:
        offsets = poisson_arrivals(rate, seconds, seed=seed + 1000 + attempt, rate=lambda t: rate)
        async with Batcher(dispatch, endpoints=[backend]) as batcher:
            res = await _drive(batcher, rows, offsets, calls, sample=False)
        return res["on_time_share"] >= ON_TIME_TARGET

    lo, hi = 0.0, rough
    steps, seconds = (4, 0.5) if quick else (6, 1.0)
    for i in range(steps):
        rate = (lo + hi) / 2
        # A short run can miss the target on one stall of a shared machine: a rate is given up only after two misses.
        if await holds(rate, 2 * i) or await holds(rate, 2 * i + 1):
            lo = rate
        else:
            hi = rate
    return lo


class _InferenceScenario(Repeated):
    backend = ""

    def _check(self) -> str | None:
        for module in ("batching", "connectors.inference.base", "numpy"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not importable"
        return None

    async def _open(self, ctx: Context, out: Collector):  # returns (inferencer, cleanup)
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def around(self, ctx: Context, out: Collector) -> AsyncIterator[None]:
        """The endpoint, started and warm for every repetition; ``_dispatch`` counts its calls in ``_calls``."""
        inferencer, cleanup = await self._open(ctx, out)
        self._calls = calls = [0]

        async def dispatch(endpoint: str, items: list[np.ndarray]):
            calls[0] += 1
            result = await inferencer.infer(np.stack(items))
            return list(result.scores)

        self._dispatch = dispatch
        rng = np.random.default_rng(ctx.seed)
        self._rows = rng.normal(size=(4096, N_FEATURES)).astype(np.float32)
        try:
            await inferencer.start()
            await inferencer.warm_up()
            yield
        finally:
            await inferencer.close()
            await cleanup()

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        from batching import Batcher

        p = ctx.profile
        dispatch, rows, calls = self._dispatch, self._rows, self._calls
        # A fresh batcher for every run: each starts from the same prior, so runs do not inherit
        # a service-time model fitted under a different load.
        async with Batcher(dispatch, endpoints=[self.backend]) as batcher:
            rough = await _capacity(batcher, rows, min(p.inference_seconds, 2.0))
        cap = await _search_capacity(dispatch, self.backend, rows, calls, rough, p.name == "quick", ctx.seed + 10 * rep)
        out.figure("queue_full_records_per_sec", rough, "rec/s")
        out.figure("capacity_records_per_sec", cap, "rec/s")
        if not cap:
            # A result, not a crash: this endpoint on this machine held no rate; the runs below would be at 0 rec/s.
            out.caution(f"no rate up to {rough:,.0f} rec/s kept {ON_TIME_TARGET:.0%} of records "
                        f"on time (rep {rep + 1}); no steady, burst or overload run")
            ctx.log(f"  {self.name} rep {rep + 1}: no rate up to {rough:,.0f} rec/s kept {ON_TIME_TARGET:.0%} of records on time")
            return
        runs = {
            "steady_0.5": (lambda t, c=cap: 0.5 * c, 0.5 * cap),
            "steady_0.9": (lambda t, c=cap: 0.9 * c, 0.9 * cap),
            # Bursts: 0.2x, with 1.5x for the first quarter of every second.
            "burst": (lambda t, c=cap: (1.5 if (t % 1.0) < 0.25 else 0.2) * c, 1.5 * cap),
            "overload_1.5": (lambda t, c=cap: 1.5 * c, 1.5 * cap),
        }
        for i, (label, (rate_fn, peak)) in enumerate(runs.items()):
            offsets = poisson_arrivals(peak, p.inference_seconds, seed=ctx.seed + 10 * rep + i + 1, rate=rate_fn)
            async with Batcher(dispatch, endpoints=[self.backend]) as batcher:
                res = await _drive(batcher, rows, offsets, calls, sample=(rep == 0))
            timeline = res.pop("timeline")
            if rep == 0:
                out.series(f"timeline_{label}", timeline)
            out.load(f"{label}, rep {rep + 1}", generator_cpu_share=res["process_cpu_share"])
            for key in ("on_time_share", "late_share", "deferred_share", "shed_share", "p50_ms", "p99_ms", "rpcs_per_record"):
                out.figure(f"{label}_{key}", res[key], "ms" if key.endswith("_ms") else "")
            if label == "steady_0.9":
                out.ratio("on_time_share_at_0.9", res["on_time_share"], better="higher",
                          description=f"share of records scored within the {SLO_S * 1000:.0f} ms deadline at 0.9x the measured capacity")
            if label == "overload_1.5":
                out.ratio("overload_goodput_to_capacity", res["on_time_share"] * 1.5, better="higher", tolerance=0.3,
                          description="records scored on time per second at 1.5x offered load over the capacity (docs/batching.md §5: >= 0.9)")
            if label == "burst":
                out.ratio("on_time_share_burst", res["on_time_share"], better="higher",
                          description="share of records scored within the deadline under bursts (0.2x base, 1.5x for 250 ms every second)",
                          tolerance=0.3)
        ctx.log(f"  {self.name} rep {rep + 1}: capacity {cap:,.0f} rec/s on time (queue full: {rough:,.0f}); at 0.9x "
                f"{out.figures['steady_0.9_on_time_share'][-1]:.1%} on time, p99 {out.figures['steady_0.9_p99_ms'][-1]:.1f} ms, "
                f"{out.figures['steady_0.9_rpcs_per_record'][-1]:.4f} calls/record")

    def finish(self, ctx: Context, out: Collector) -> None:
        out.note("The load generator shares this process with the batcher and the client, so 'generator CPU' here is the "
                 "whole process: a share near one core means the capacity is this process's, not the endpoint's.")


class LocalInferenceScenario(_InferenceScenario):
    name = "inference-local"
    title = "Adaptive batching over the embedded CPU model (LocalModelInferencer)"
    backend = "local"

    def unavailable(self, ctx: Context) -> str | None:
        return self._check() or (None if importlib.util.find_spec("connectors.inference.local_model") else "connectors.inference.local_model is missing")

    async def _open(self, ctx: Context, out: Collector):
        from connectors.inference.local_model import LocalModelInferencer

        async def cleanup() -> None:
            return None

        return LocalModelInferencer(), cleanup


class TritonInferenceScenario(_InferenceScenario):
    name = "inference-triton"
    title = "Adaptive batching over a real Triton server (PyTriton on CPU, gRPC) serving the same model"
    backend = "triton"

    def unavailable(self, ctx: Context) -> str | None:
        reason = triton_unavailable(ctx.profile)
        if reason:
            return reason
        if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("connectors.inference.triton") is None:
            return "tritonclient or connectors.inference.triton is not importable"
        return self._check()

    async def _open(self, ctx: Context, out: Collector):
        from connectors.inference.triton import TritonInferencer, TritonSettings

        workspace = Path(tempfile.mkdtemp(prefix="triton-", dir=ctx.workdir))
        server = TritonServer(ctx.workdir / "triton.log", workspace / "ws")
        try:
            startup = await asyncio.to_thread(server.wait_ready, 180.0)
        except BaseException:
            server.stop()
            raise
        out.figure("server_startup_secs", startup, "s")
        ctx.log(f"  triton ready in {startup:.1f} s")

        async def cleanup() -> None:
            await asyncio.to_thread(server.stop)
            shutil.rmtree(workspace, ignore_errors=True)

        return TritonInferencer(TritonSettings(url=f"127.0.0.1:{server.grpc_port}", protocol="grpc", name="triton")), cleanup
