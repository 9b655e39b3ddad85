"""What a scenario is, what it gets (a profile and a working directory), and what it hands back.

A scenario is an object with a ``name``, a ``title``, ``unavailable(ctx)`` (None, or the reason it
cannot run here: the report says "not run: <reason>"), and ``async run(ctx, out)``, which runs its
repetitions and records into ``out``:

- ``out.figure(rep, name, value, unit)``: a number per repetition, summarised as median/min/max;
- ``out.ratio(rep, name, value, better, description)``: the same, and gated by ``--compare``;
- ``out.series(name, data)``: curves and time series for the plots;
- ``out.load(...)``: one open-loop run's offered load and generator CPU (saturation warnings);
- ``out.note(text)``: a sentence for the report.

The built-in scenarios derive from ``Repeated``, which owns the repetition loop: a scenario writes
what one repetition does (``repetition``), what lives across them (``around``) and takes a fresh
working directory per repetition from ``rep_dir``.

Built-in scenarios live in ``benchmarks.scenarios_*``; any module in ``benchmarks/`` that defines
``harness_scenarios()`` (returning scenario objects) is picked up too.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.stats import summarize

# A generator using this share of one core or more was (close to) saturated: its figures understate the server.
GENERATOR_SATURATED_SHARE = 0.85
# A generator sending this late behind its schedule (p99) is not offering the load it claims.
GENERATOR_LAG_WARN_S = 0.005


@dataclass(frozen=True)
class Profile:
    """How long and how often: one per mode (quick, default, release)."""

    name: str
    reps: int
    seconds: float  # one measurement (closed-loop max, or one open-loop load level)
    warmup_secs: float  # discarded from the start of each open-loop run
    sweep: tuple[float, ...]  # offered loads as fractions of the measured capacity
    soak_secs: float
    soak_sample_secs: float
    startup_reps: int
    inference_seconds: float
    records_per_request: int = 300  # about 64 KiB of NDJSON
    concurrency: int = 32
    devices: int = 50
    overload_factor: float = 1.5
    soak_load: float = 0.7
    triton: bool = True


PROFILES = {
    "quick": Profile("quick", reps=1, seconds=1.0, warmup_secs=0.2, sweep=(0.5, 0.9), soak_secs=6.0, soak_sample_secs=0.25,
                     startup_reps=2, inference_seconds=1.0),
    "default": Profile("default", reps=3, seconds=5.0, warmup_secs=0.5, sweep=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0), soak_secs=180.0,
                       soak_sample_secs=1.0, startup_reps=5, inference_seconds=4.0),
    "release": Profile("release", reps=5, seconds=10.0, warmup_secs=1.0, sweep=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0), soak_secs=1800.0,
                       soak_sample_secs=2.0, startup_reps=7, inference_seconds=8.0),
}


@dataclass
class Context:
    profile: Profile
    workdir: Path
    log: Callable[[str], None] = print
    seed: int = 1


@dataclass
class Collector:
    """Everything one scenario measured."""

    name: str
    title: str
    figures: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    ratio_meta: dict[str, dict[str, str]] = field(default_factory=dict)
    series_data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loads: list[dict[str, float]] = field(default_factory=list)
    cautions: list[str] = field(default_factory=list)

    def figure(self, name: str, value: float, unit: str = "") -> None:
        self.figures.setdefault(name, []).append(float(value))
        if unit:
            self.units[name] = unit

    def ratio(self, name: str, value: float, *, better: str, description: str, tolerance: float | None = None) -> None:
        """A gated figure; ``tolerance`` overrides the gate's default for ratios known to be noisier."""
        if better not in ("higher", "lower"):
            raise ValueError("better must be 'higher' or 'lower'")
        self.ratios.setdefault(name, []).append(float(value))
        self.ratio_meta[name] = {"better": better, "description": description}
        if tolerance is not None:
            self.ratio_meta[name]["tolerance"] = tolerance

    def series(self, name: str, data: Any) -> None:
        self.series_data[name] = data

    def append_series(self, name: str, item: Any) -> None:
        self.series_data.setdefault(name, []).append(item)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def caution(self, text: str) -> None:
        """A measurement that did not come out as planned: listed with the report's warnings."""
        self.cautions.append(f"{self.name}: {text}")

    def load(self, label: str, *, generator_cpu_share: float, send_lag_p99_secs: float = float("nan")) -> None:
        self.loads.append({"label": label, "generator_cpu_share": generator_cpu_share, "send_lag_p99_secs": send_lag_p99_secs})

    def warnings(self) -> list[str]:
        out = list(self.cautions)
        saturated = [l for l in self.loads if l["generator_cpu_share"] >= GENERATOR_SATURATED_SHARE]
        if saturated:
            worst = max(saturated, key=lambda l: l["generator_cpu_share"])
            out.append(
                f"{self.name}: the load generator used {worst['generator_cpu_share']:.0%} of a core in "
                f"{len(saturated)} of {len(self.loads)} runs (worst: {worst['label']}); those figures are "
                "bounded by the generator, not the server"
            )
        lagging = [l for l in self.loads if math.isfinite(l["send_lag_p99_secs"]) and l["send_lag_p99_secs"] > GENERATOR_LAG_WARN_S]
        if lagging:
            worst = max(lagging, key=lambda l: l["send_lag_p99_secs"])
            out.append(
                f"{self.name}: the generator fell behind its schedule in {len(lagging)} runs (worst p99 "
                f"{worst['send_lag_p99_secs'] * 1000:.1f} ms, {worst['label']}); latency still counts from the intended send time"
            )
        return out

    def result(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "figures": {k: {**summarize(v), "unit": self.units.get(k, "")} for k, v in self.figures.items()},
            "ratios": {k: {**summarize(v), **self.ratio_meta[k]} for k, v in self.ratios.items()},
            "series": self.series_data,
            "notes": self.notes,
            "generator": self.loads,
        }


class Scenario(Protocol):
    name: str
    title: str

    def unavailable(self, ctx: Context) -> str | None: ...

    async def run(self, ctx: Context, out: Collector) -> None: ...


class Repeated:
    """The base of the built-in scenarios: one measurement, repeated.

    ``run`` enters ``around`` (what lives across the repetitions: a server, environment variables),
    calls ``repetition(ctx, out, rep)`` for each of ``repetitions(ctx)`` (the profile's ``reps``
    unless overridden), leaves ``around`` and, when every repetition went through, calls
    ``finish``. A repetition that needs a working directory takes a fresh one from ``rep_dir``.
    """

    name = ""
    title = ""

    def unavailable(self, ctx: Context) -> str | None:
        return None

    def repetitions(self, ctx: Context) -> int:
        return ctx.profile.reps

    @contextlib.asynccontextmanager
    async def around(self, ctx: Context, out: Collector) -> AsyncIterator[None]:
        yield

    async def repetition(self, ctx: Context, out: Collector, rep: int) -> None:
        raise NotImplementedError

    def finish(self, ctx: Context, out: Collector) -> None:
        """After the last repetition: a summary line, a note."""

    async def run(self, ctx: Context, out: Collector) -> None:
        async with self.around(ctx, out):
            for rep in range(self.repetitions(ctx)):
                await self.repetition(ctx, out, rep)
        self.finish(ctx, out)

    @contextlib.contextmanager
    def rep_dir(self, ctx: Context, rep: int) -> Iterator[Path]:
        """A fresh directory under the run's working directory, removed when the repetition leaves it."""
        root = Path(tempfile.mkdtemp(prefix=f"{self.name}-{rep}-", dir=ctx.workdir))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)


def missing_module(module: str, entry: str) -> str | None:
    """Why a scenario that adapts ``benchmarks/<module>.py`` cannot run (None when it can): the file
    is absent, does not import, or lacks the callable ``entry``."""
    qualified = f"benchmarks.{module}"
    if importlib.util.find_spec(qualified) is None:
        return f"benchmarks/{module}.py is not in this tree yet"
    try:
        loaded = importlib.import_module(qualified)
    except Exception as exc:  # noqa: BLE001 - being written by someone else
        return f"benchmarks/{module}.py does not import: {type(exc).__name__}: {exc}"
    if not callable(getattr(loaded, entry, None)):
        return f"benchmarks/{module}.py has no {entry}()"
    return None
