"""Which scenarios exist, in the order the harness runs them.

Built-ins come first; the batching and abuse scenarios adapt ``batching_sim.py`` and ``abuse.py``
and report "not run" while those modules are missing. Any other module in ``benchmarks/`` that
defines ``harness_scenarios()`` returning scenario objects (see ``benchmarks.scenario``) is added
after them, so a new benchmark plugs in without touching the harness.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from benchmarks.scenario import Collector, Context
from benchmarks.scenarios_abuse import AbuseScenario
from benchmarks.scenarios_batching import BatchingScenario
from benchmarks.scenarios_http import (
    CeilingScenario,
    IngestScenario,
    IngestWithSeqScenario,
    OverloadScenario,
    S3Scenario,
    SoakScenario,
    StartupScenario,
    TritonIngestScenario,
)
from benchmarks.scenarios_inference import LocalInferenceScenario, TritonInferenceScenario

HERE = Path(__file__).resolve().parent
HOOK = "harness_scenarios"
# Harness modules never scanned for the hook.
_OWN = {
    "__init__", "__main__", "harness", "registry", "scenario", "report", "compare", "stats", "machine", "loadgen", "processes",
    "servers", "ceiling_server", "ingest", "scenarios_http", "scenarios_inference", "scenarios_batching", "scenarios_abuse",
    "abuse", "batching_sim",
}


class Broken:
    """A plugin module that failed to import: reported as not run, never fatal."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.title, self.reason = name, f"{name} (plugin)", reason

    def unavailable(self, ctx: Context) -> str | None:
        return self.reason

    async def run(self, ctx: Context, out: Collector) -> None:
        raise RuntimeError(self.reason)


def builtin() -> list:
    return [
        CeilingScenario(),
        IngestScenario(),
        IngestWithSeqScenario(),
        S3Scenario(),
        TritonIngestScenario(),
        LocalInferenceScenario(),
        TritonInferenceScenario(),
        OverloadScenario(),
        BatchingScenario(),
        AbuseScenario(),
        StartupScenario(),
        SoakScenario(),
    ]


def plugins() -> list:
    found = []
    for path in sorted(HERE.glob("*.py")):
        if path.stem in _OWN:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        if f"def {HOOK}(" not in text:
            continue
        try:
            module = importlib.import_module(f"benchmarks.{path.stem}")
            found.extend(getattr(module, HOOK)())
        except Exception as exc:  # noqa: BLE001 - a module being written must not stop the others
            found.append(Broken(path.stem, f"benchmarks/{path.stem}.py could not be loaded: {type(exc).__name__}: {exc}"))
    return found


def all_scenarios() -> list:
    scenarios = builtin()
    names = {s.name for s in scenarios}
    from_plugins = plugins()
    for s in from_plugins:
        if s.name not in names:
            scenarios.append(s)
            names.add(s.name)
    return scenarios
