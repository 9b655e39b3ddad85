"""Endpoint readiness: how soon records are scored once a Triton model that was still loading is ready.

Each repetition launches a PyTriton server (the anomaly model, CPU) and, without waiting for it, starts
the gateway's scoring side against it: an ``InferencePool`` over one gRPC endpoint behind a
``batching.Batcher``, wired as the curated zone wires them. Records arrive every 10 ms with the
gateway's default 2 s deadline. A separate thread polls the model's KServe ready endpoint every 10 ms
to timestamp the moment the model became ready; the figure is the time from that moment to the first
scored record (goal < 3 s), summarised as a median over repetitions. Records that failed (rather than
being deferred) while the model was loading are counted too; there should be none.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.processes import TritonServer
from benchmarks.scenario import Collector, Context, Repeated
from benchmarks.scenarios_inference import TritonInferenceScenario

ARRIVAL_EVERY_S = 0.010
DEADLINE_S = 2.0  # inference.max_defer_secs, the gateway's default
POLL_S = 0.010
GOAL_S = 3.0
SERVER_TIMEOUT_S = 180.0


def _watch_ready(url: str, stop: threading.Event, found: list[float]) -> None:
    """Poll ``url`` until it answers 200; append when (perf_counter) it first did."""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    found.append(time.perf_counter())
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(POLL_S)


async def ready_to_first_score(workdir: Path, rep: int) -> dict[str, float]:
    """One repetition: seconds from model ready to the first scored record, and the outcome counts."""
    from batching import Batcher, Deferred, Failed, Ok
    from connectors.inference import pool_batching
    from connectors.inference.pool import InferencePool
    from connectors.inference.triton import TritonInferencer, TritonSettings

    workspace = Path(tempfile.mkdtemp(prefix="triton-ready-", dir=workdir))
    server = TritonServer(workdir / f"triton-ready-{rep}.log", workspace / "ws")
    pool = InferencePool([TritonInferencer(TritonSettings(url=f"127.0.0.1:{server.grpc_port}", name="triton"))], name="triton")

    async def dispatch(endpoint: str, items: list[np.ndarray]) -> list[float]:
        return list((await pool_batching.infer(pool, np.stack(items))).scores)

    batcher = Batcher(dispatch, endpoints=["triton"], is_backpressure=pool_batching.is_backpressure)
    counts = {"ok": 0, "deferred": 0, "failed": 0}
    first_ok: list[float] = []
    ready_at: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_ready, args=(server.url + server.ready_path, stop, ready_at), daemon=True)

    def done(future: asyncio.Future) -> None:
        outcome = future.result()
        if isinstance(outcome, Ok):
            counts["ok"] += 1
            if not first_ok:
                first_ok.append(time.perf_counter())
        elif isinstance(outcome, Deferred):
            counts["deferred"] += 1
        else:
            assert isinstance(outcome, Failed)
            counts["failed"] += 1

    row = np.zeros(8, dtype=np.float32)
    try:
        watcher.start()
        await pool.start()  # the server is still starting: nothing answers yet
        pool_batching.follow_availability(pool, batcher, "triton")
        batcher.start()
        give_up = time.perf_counter() + SERVER_TIMEOUT_S
        while not first_ok and time.perf_counter() < give_up:
            batcher.submit_nowait(row, batcher.clock.now() + DEADLINE_S).add_done_callback(done)
            await asyncio.sleep(ARRIVAL_EVERY_S)
        if not first_ok or not ready_at:
            raise RuntimeError(f"nothing scored within {SERVER_TIMEOUT_S:.0f} s; server log:\n{server.log_tail()}")
    finally:
        stop.set()
        await batcher.close(flush=False)
        await pool.close()
        await asyncio.to_thread(server.stop)
        watcher.join(timeout=5)
        shutil.rmtree(workspace, ignore_errors=True)
    return {"ready_to_first_score_secs": first_ok[0] - ready_at[0], "loading_secs": ready_at[0] - server.started_at, **counts}


class TritonReadinessScenario(Repeated):
    name = "readiness-triton"
    title = "Time from a loading Triton model becoming ready to the first scored record (scoring started first)"

    def unavailable(self, ctx: Context) -> str | None:
        return TritonInferenceScenario().unavailable(ctx)

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        res = await ready_to_first_score(ctx.workdir, rep)
        out.figure("ready_to_first_score_secs", res["ready_to_first_score_secs"], "s")
        out.figure("model_loading_secs", res["loading_secs"], "s")
        out.figure("failed_while_loading", res["failed"], "records")
        out.figure("deferred_while_loading", res["deferred"], "records")
        out.ratio("ready_to_first_score_to_goal", res["ready_to_first_score_secs"] / GOAL_S, better="lower", tolerance=0.5,
                  description=f"time from the model becoming ready to the first scored record over the {GOAL_S:.0f} s goal (< 1 meets it)")
        ctx.log(f"  readiness rep {rep + 1}: first score {res['ready_to_first_score_secs']:.2f} s after the model was ready "
                f"(loading took {res['loading_secs']:.1f} s; {res['failed']} failed, {res['deferred']} deferred meanwhile)")


def harness_scenarios() -> list:
    return [TritonReadinessScenario()]
