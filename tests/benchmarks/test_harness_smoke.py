"""``python -m benchmarks --quick`` end to end: the report is complete and well formed.

Never asserts a speed: the machine is shared and the figures are whatever they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {"median", "min", "max"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench-report")
    # Two workers whatever the machine: as deployed on two vCPUs, and the same cost on a larger CI host.
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--workers", "2", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    return done, out


@pytest.mark.slow
def test_quick_run_succeeds_and_writes_the_report(quick_report) -> None:
    done, out = quick_report
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    for name in ("report.md", "results.json", "run.log"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    for heading in ("# Benchmark report", "## Headline ratios", "## Targets", "## Scenarios"):
        assert heading in report


@pytest.mark.slow
def test_results_json_has_every_section_and_summaries(quick_report) -> None:
    _, out = quick_report
    doc = json.loads((out / "results.json").read_text())
    assert doc["mode"] == "quick" and doc["schema"] == 1
    assert doc["command"].startswith("python -m benchmarks") and "--quick" in doc["command"]
    assert doc["workers"] == 2
    assert {"cpu_model", "logical_cpus", "memory_gib", "load_average_at_start"} <= doc["machine"].keys()
    assert doc["versions"]["aiohttp"] and "commit" in doc["git"]
    scenarios = doc["scenarios"]
    for name in ("ceiling", "ingest", "ingest-seq", "overload", "startup", "soak", "inference-local"):
        assert scenarios[name]["status"] == "ok", (name, scenarios[name].get("error"))
    for name, result in scenarios.items():
        assert result["status"] in ("ok", "not run"), (name, result.get("error"))
        if result["status"] == "not run":
            assert result["reason"], name
            continue
        assert result["figures"], name
        for fig, spec in result["figures"].items():
            assert SUMMARY_KEYS <= spec.keys(), (name, fig)
    assert doc["ratios"]
    for name, spec in doc["ratios"].items():
        assert SUMMARY_KEYS <= spec.keys() and spec["better"] in ("higher", "lower"), name
    assert "ingest.gateway_to_ceiling_throughput" in doc["ratios"]
    assert "ingest-seq.gateway_to_ceiling_throughput" in doc["ratios"]


@pytest.mark.slow
def test_plots_are_png_files(quick_report) -> None:
    _, out = quick_report
    pngs = {p.name: p for p in out.glob("*.png")}
    for name in ("throughput_vs_load.png", "latency_vs_load.png", "soak.png", "batching_inference-local.png"):
        assert name in pngs, sorted(pngs)
    for path in pngs.values():
        assert path.read_bytes()[:8] == PNG_MAGIC, path.name
        assert f"]({path.name})" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_run_compared_with_itself_passes_the_gate(quick_report) -> None:
    _, out = quick_report
    results = out / "results.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--compare", str(results), "--current", str(results)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REGRESSED" not in done.stdout


def test_progress_bar_shows_an_eta_from_the_baseline(tmp_path):
    import io
    import json

    from benchmarks.harness import Progress, expected_seconds
    from benchmarks.scenario import PROFILES

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"profile": {"reps": 3, "seconds": 5.0, "soak_secs": 180.0},
                                    "scenarios": {"ingest": {"duration_secs": 120.0}, "soak": {"duration_secs": 190.0}}}))
    quick = PROFILES["quick"]
    assert expected_seconds("ingest", quick, baseline) == 120.0 * (quick.reps * quick.seconds) / 15.0
    assert expected_seconds("soak", quick, baseline) == 190.0 * quick.soak_secs / 180.0
    assert expected_seconds("nope", quick, baseline) is None
    progress = Progress("ingest", 100.0, "2/5", 300.0, stream=io.StringIO())
    line = progress.line(progress.started + 25.0)
    assert line == "[ingest] 2/5 [######..................]  25% 0:25 elapsed, about 1:15 left; the run about 6:15 left"
    assert "0:20 over the estimate" in progress.line(progress.started + 120.0)
    assert "no estimate" in Progress("new", None, "1/1", None).line()


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_stops_every_process_it_started_and_removes_its_files(tmp_path) -> None:
    """A CI job's timeout sends SIGTERM: the gateways and load generators of the scenario running
    then are stopped, and the working directory is removed, before the harness exits."""
    import os
    import signal
    import time

    import psutil

    workdir = tmp_path / "tmp"
    workdir.mkdir()
    harness = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--scenarios", "startup", "--reps", "50", "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, env=os.environ | {"TMPDIR": str(workdir)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    def command(process: psutil.Process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:
            return ""  # gone meanwhile

    started: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("gateway serve" in command(p) for p in started.values()):
            for child in psutil.Process(harness.pid).children(recursive=True):
                started.setdefault(child.pid, child)
            time.sleep(0.05)
        assert started, "the harness started no process in 60 s"
        harness.send_signal(signal.SIGTERM)
        assert harness.wait(60) == 128 + signal.SIGTERM
        alive = [command(p)[:120] for p in started.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        alive += [command(p)[:120] for p in psutil.process_iter() if str(workdir) in command(p) and p.pid not in started]
        assert not alive, f"still running after the harness exited: {alive}"
        assert not list(workdir.glob("edge-gateway-bench-*")), "the working directory was left behind"
    finally:
        harness.kill()
        # By PID: what it started, and anything else running from its working directory.
        for p in [*started.values(), *(p for p in psutil.process_iter() if str(workdir) in command(p))]:
            try:
                p.kill()
            except psutil.Error:
                pass
