"""The benchmark simulation runs and returns its results as a dict the release harness can read."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SIM_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "batching_sim.py"


def load_sim():
    spec = importlib.util.spec_from_file_location("batching_sim", SIM_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_simulation_accounts_for_every_record_and_adaptive_is_never_late() -> None:
    sim = load_sim()
    report = sim.run_benchmark(loads=(0.5, 1.2), scenario=sim.Scenario(duration_secs=0.3))
    for load, row in report["results"].items():
        assert "adaptive" in row and len(row) > 1
        for metrics in row.values():
            assert metrics["lost"] == 0
        assert row["adaptive"]["late_pct"] == 0.0
        assert row["adaptive"]["calls_per_record"] < 0.5  # it batches
    assert report["results"][1.2]["adaptive"]["deferred_pct"] > 0  # overload is shed, not served late
