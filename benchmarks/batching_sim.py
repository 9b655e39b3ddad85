"""Simulate the adaptive batcher against an endpoint with S(b) = a + c*b and noise, on a fake clock.

Compares the adaptive policy with static (batch size B, timeout T) configurations at several loads,
expressed as fractions of the endpoint's capacity at full batches. Open-loop Poisson arrivals; each
record is due ``slo_secs`` after it arrives. Run it directly for a table, or call :func:`run_benchmark`
for the results as a dict.

    python benchmarks/batching_sim.py [--duration-secs 1.0] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
from dataclasses import dataclass

import numpy as np

from batching import Batcher, BatchPolicy, Deferred, Endpoint, FakeClock, Ok
from batching.clock import Cancellable

DEFAULT_LOADS = (0.2, 0.5, 0.8, 0.95, 1.2)


@dataclass(frozen=True)
class Scenario:
    """The simulated endpoint and traffic."""

    a_secs: float = 0.002  # fixed cost per call
    c_secs: float = 0.0001  # cost per record
    noise_sigma: float = 0.08  # lognormal multiplicative noise on each call
    max_batch: int = 128
    slo_secs: float = 0.050
    duration_secs: float = 1.0
    seed: int = 1
    # A burst: arrivals run at ``burst_factor`` times the rate inside [burst_start_secs, +burst_secs).
    burst_factor: float = 1.0
    burst_start_secs: float = 0.0
    burst_secs: float = 0.0
    # A slowdown: every call takes ``slowdown_factor`` times longer from ``slowdown_start_secs`` on.
    slowdown_factor: float = 1.0
    slowdown_start_secs: float = 0.0

    @property
    def capacity_per_sec(self) -> float:
        """Records per second one lane serves at full batches."""
        return self.max_batch / (self.a_secs + self.c_secs * self.max_batch)


@dataclass(frozen=True)
class StaticArm:
    """Size-or-timeout batching with fixed concurrency, optionally shedding records queued too long."""

    batch: int
    timeout_secs: float
    concurrency: int = 2
    queue_timeout_secs: float | None = None

    @property
    def name(self) -> str:
        shed = f"+shed{self.queue_timeout_secs * 1e3:g}ms" if self.queue_timeout_secs is not None else ""
        return f"static_B{self.batch}_T{self.timeout_secs * 1e3:g}ms_K{self.concurrency}{shed}"


class SimulatedEndpoint:
    """One lane, first in first out: a call starts when the previous one ends."""

    def __init__(self, clock: FakeClock, scenario: Scenario, rng: np.random.Generator) -> None:
        self.clock, self.scenario, self.rng = clock, scenario, rng
        self.free_at = 0.0
        self.calls = 0

    async def dispatch(self, endpoint: str, items: list[int]) -> list[int]:
        s = self.scenario
        service = (s.a_secs + s.c_secs * len(items)) * float(self.rng.lognormal(0.0, s.noise_sigma))
        if self.clock.now() >= s.slowdown_start_secs:
            service *= s.slowdown_factor
        self.free_at = max(self.clock.now(), self.free_at) + service
        self.calls += 1
        await self.clock.sleep_until(self.free_at)
        return items


class Tally:
    """Per-record outcomes: latency if scored, or shed."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.shed = 0
        self.batch_sizes: list[int] = []


class StaticBatcher:
    """The baseline: send when B records are queued or the oldest has waited T."""

    def __init__(self, clock: FakeClock, endpoint: SimulatedEndpoint, arm: StaticArm, tally: Tally) -> None:
        self.clock, self.endpoint, self.arm, self.tally = clock, endpoint, arm, tally
        self.queue: collections.deque[float] = collections.deque()  # arrival times
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.timer: Cancellable | None = None

    def add(self) -> None:
        self.queue.append(self.clock.now())
        self.pump()

    def pump(self) -> None:
        now = self.clock.now()
        if self.arm.queue_timeout_secs is not None:
            while self.queue and now - self.queue[0] > self.arm.queue_timeout_secs:
                self.queue.popleft()
                self.tally.shed += 1
        while self.queue and self.in_flight < self.arm.concurrency:
            if len(self.queue) < self.arm.batch and now - self.queue[0] < self.arm.timeout_secs - 1e-12:
                break
            batch = [self.queue.popleft() for _ in range(min(self.arm.batch, len(self.queue)))]
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self.call(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        # A free slot waits for the oldest record's timeout; a full house waits for a response.
        if self.queue and self.in_flight < self.arm.concurrency and self.timer is None:
            self.timer = self.clock.call_at(self.queue[0] + self.arm.timeout_secs, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.pump()

    async def call(self, arrivals: list[float]) -> None:
        await self.endpoint.dispatch("sim", [0] * len(arrivals))
        now = self.clock.now()
        self.tally.batch_sizes.append(len(arrivals))
        self.tally.latencies.extend(now - t for t in arrivals)
        self.in_flight -= 1
        self.pump()


def _arrivals(scenario: Scenario, rate_per_sec: float) -> np.ndarray:
    """Poisson arrivals; with a burst, thinned from the peak rate (a non-homogeneous process)."""
    rng = np.random.default_rng(scenario.seed)
    peak = rate_per_sec * max(1.0, scenario.burst_factor)
    gaps = rng.exponential(1.0 / peak, size=int(peak * scenario.duration_secs * 1.5) + 10)
    times = np.cumsum(gaps)
    times = times[times < scenario.duration_secs]
    if peak == rate_per_sec:
        return times
    in_burst = (times >= scenario.burst_start_secs) & (times < scenario.burst_start_secs + scenario.burst_secs)
    keep = in_burst | (rng.random(len(times)) < rate_per_sec / peak)
    return times[keep]


async def _run_adaptive(scenario: Scenario, rate_per_sec: float) -> dict[str, float]:
    clock = FakeClock()
    endpoint = SimulatedEndpoint(clock, scenario, np.random.default_rng(scenario.seed + 1))
    tally = Tally()
    policy = BatchPolicy(max_batch=scenario.max_batch, max_wait_secs=0.1 * scenario.slo_secs)
    # The prior is the true cost, off by 20%, as an offline profile would give.
    gpu = Endpoint("sim", clock=clock, prior_a_secs=scenario.a_secs * 1.2, prior_c_secs=scenario.c_secs * 1.2)
    batcher: Batcher[int, int] = Batcher(endpoint.dispatch, endpoints=[gpu], policy=policy, clock=clock, max_queue=10**6)

    def record(future: asyncio.Future) -> None:
        outcome = future.result()
        if isinstance(outcome, Ok):
            tally.latencies.append(outcome.latency_secs)
        elif isinstance(outcome, Deferred):
            tally.shed += 1

    def arrive() -> None:
        batcher.submit_nowait(0, deadline=clock.now() + scenario.slo_secs).add_done_callback(record)

    times = _arrivals(scenario, rate_per_sec)
    for t in times:
        clock.call_at(float(t), arrive)
    batcher.start()
    await clock.advance_to(scenario.duration_secs + 10 * scenario.slo_secs)
    closing = asyncio.get_running_loop().create_task(batcher.close())
    await clock.advance(1.0)
    await closing
    mean_batch = len(tally.latencies) / endpoint.calls if endpoint.calls else 0.0
    return _summary(scenario, len(times), tally, endpoint.calls, mean_batch)


async def _run_static(scenario: Scenario, rate_per_sec: float, arm: StaticArm) -> dict[str, float]:
    clock = FakeClock()
    endpoint = SimulatedEndpoint(clock, scenario, np.random.default_rng(scenario.seed + 1))
    tally = Tally()
    batcher = StaticBatcher(clock, endpoint, arm, tally)
    times = _arrivals(scenario, rate_per_sec)
    for t in times:
        clock.call_at(float(t), batcher.add)
    # Without shedding an overloaded static arm drains a long backlog: let it finish.
    horizon = scenario.duration_secs + 10 * scenario.slo_secs
    while len(tally.latencies) + tally.shed < len(times):
        await clock.advance_to(horizon)
        horizon += 1.0
    mean_batch = float(np.mean(tally.batch_sizes)) if tally.batch_sizes else 0.0
    return _summary(scenario, len(times), tally, endpoint.calls, mean_batch)


def _summary(scenario: Scenario, offered: int, tally: Tally, calls: int, mean_batch: float) -> dict[str, float]:
    latencies = np.asarray(tally.latencies) if tally.latencies else np.zeros(1)
    late = int(np.sum(np.asarray(tally.latencies) > scenario.slo_secs + 1e-12)) if tally.latencies else 0
    on_time = len(tally.latencies) - late
    return {
        "offered": offered,
        "late_pct": 100.0 * late / offered if offered else 0.0,
        "deferred_pct": 100.0 * tally.shed / offered if offered else 0.0,
        "lost": offered - len(tally.latencies) - tally.shed,
        "mean_batch_size": mean_batch,
        "calls_per_record": calls / offered if offered else 0.0,
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
        "goodput_per_sec": on_time / scenario.duration_secs,
    }


def default_static_arms(scenario: Scenario) -> tuple[StaticArm, ...]:
    """Fixed batch sizes with a 5 ms timeout, and the best of them with a queue timeout (SLO/2)."""
    return (
        StaticArm(batch=1, timeout_secs=0.0),  # one call per record (what Triton-only batching costs the gateway)
        StaticArm(batch=8, timeout_secs=0.005),
        StaticArm(batch=32, timeout_secs=0.005),
        StaticArm(batch=scenario.max_batch, timeout_secs=0.005),
        StaticArm(batch=scenario.max_batch, timeout_secs=0.005, queue_timeout_secs=scenario.slo_secs / 2),
    )


def run_benchmark(
    loads: tuple[float, ...] = DEFAULT_LOADS,
    scenario: Scenario | None = None,
    static_arms: tuple[StaticArm, ...] | None = None,
) -> dict[str, object]:
    """Run every arm at every load; returns {"scenario": ..., "results": {load: {arm: metrics}}}."""
    scenario = scenario or Scenario()
    arms = static_arms if static_arms is not None else default_static_arms(scenario)

    async def run_all() -> dict[float, dict[str, dict[str, float]]]:
        results: dict[float, dict[str, dict[str, float]]] = {}
        for load in loads:
            rate = load * scenario.capacity_per_sec
            row = {"adaptive": await _run_adaptive(scenario, rate)}
            for arm in arms:
                row[arm.name] = await _run_static(scenario, rate, arm)
            results[load] = row
        return results

    return {
        "scenario": {**scenario.__dict__, "capacity_per_sec": scenario.capacity_per_sec},
        "results": asyncio.run(run_all()),
    }


def protocol_scenarios(base: Scenario | None = None) -> dict[str, tuple[tuple[float, ...], Scenario]]:
    """The protocol of docs/batching.md §5: steady loads, a burst, a 2.5x slowdown."""
    import dataclasses

    base = base or Scenario()
    third = base.duration_secs / 3
    return {
        "steady": (DEFAULT_LOADS, base),
        "burst": ((0.5,), dataclasses.replace(base, burst_factor=3.0, burst_start_secs=third, burst_secs=third / 2)),
        "slowdown": ((0.3, 0.5), dataclasses.replace(base, slowdown_factor=2.5, slowdown_start_secs=third)),
    }


def run_protocol(base: Scenario | None = None) -> dict[str, dict[str, object]]:
    """Every protocol scenario with every arm; one configuration of the adaptive batcher throughout."""
    return {name: run_benchmark(loads, scenario) for name, (loads, scenario) in protocol_scenarios(base).items()}


def _print_table(report: dict[str, object]) -> None:
    columns = ("late_pct", "deferred_pct", "mean_batch_size", "calls_per_record", "p50_ms", "p99_ms", "goodput_per_sec")
    print(f"scenario: {report['scenario']}")
    results = report["results"]
    assert isinstance(results, dict)
    for load, row in results.items():
        print(f"\nload {load:.2f} x capacity")
        print(f"  {'arm':<42}" + "".join(f"{c:>17}" for c in columns))
        for arm, metrics in row.items():
            cells = "".join(f"{metrics[c]:>17.3f}" if math.isfinite(metrics[c]) else f"{'-':>17}" for c in columns)
            print(f"  {arm:<42}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-secs", type=float, default=Scenario.duration_secs)
    parser.add_argument("--seed", type=int, default=Scenario.seed)
    parser.add_argument("--loads", type=float, nargs="+", default=list(DEFAULT_LOADS))
    parser.add_argument("--protocol", action="store_true", help="steady loads, a burst and a slowdown")
    args = parser.parse_args()
    base = Scenario(duration_secs=args.duration_secs, seed=args.seed)
    if args.protocol:
        for name, report in run_protocol(base).items():
            print(f"\n=== {name}")
            _print_table(report)
        return
    _print_table(run_benchmark(tuple(args.loads), base))


if __name__ == "__main__":
    main()
