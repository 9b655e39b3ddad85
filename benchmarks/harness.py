"""``python -m benchmarks``: run the release benchmark scenarios and write a report.

    python -m benchmarks                      default: 3 repetitions, a few minutes per scenario
    python -m benchmarks --quick              about a minute (the test suite's smoke test)
    python -m benchmarks --release            5 repetitions and a 30-minute soak
    python -m benchmarks --scenarios ingest,soak --soak-seconds 600 --reps 5 --out DIR
    python -m benchmarks --compare benchmarks/baseline.json            run, then gate on the baseline
    python -m benchmarks --compare OLD.json --current NEW.json         gate two existing results, no run
    python -m benchmarks --list                                        scenarios and whether they can run here

Writes ``report.md``, ``results.json`` and PNG plots to ``--out`` (default ``bench-report/``).
Exit status: 0 fine; 1 a ratio regressed beyond the tolerance; 2 bad usage; 3 a scenario that could
run failed (the report says which and why). Scenarios that cannot run here are reported as
"not run: <reason>" and do not fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from benchmarks import compare as gate
from benchmarks import machine, servers
from benchmarks.registry import all_scenarios
from benchmarks.scenario import PROFILES, Collector, Context
from benchmarks.stats import clean

SCHEMA_VERSION = 1
EXIT_OK, EXIT_REGRESSED, EXIT_USAGE, EXIT_SCENARIO_FAILED = 0, 1, 2, 3
# A 1-minute load average above this share of the logical CPUs makes every figure suspect.
BUSY_LOAD_SHARE = 0.75


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about a minute: one repetition, short runs")
    mode.add_argument("--release", action="store_true", help="long: 5 repetitions, 30-minute soak")
    p.add_argument("--reps", type=int, help="repetitions per scenario (overrides the mode)")
    p.add_argument("--seconds", type=float, help="seconds per measurement (overrides the mode)")
    p.add_argument("--soak-seconds", type=float, help="soak duration (overrides the mode)")
    p.add_argument("--soak-load", type=float, help="soak load as a share of the measured capacity (default 0.7)")
    p.add_argument("--scenarios", help="comma-separated scenario names (default: all); see --list")
    p.add_argument("--out", type=Path, default=Path("bench-report"), help="report directory (default: bench-report/)")
    p.add_argument("--compare", type=Path, metavar="BASELINE.json", help="gate this run's ratios on a baseline's")
    p.add_argument("--current", type=Path, metavar="RESULTS.json", help="with --compare: compare this file instead of running")
    p.add_argument("--tolerance", type=float, default=gate.DEFAULT_TOLERANCE, help="allowed relative regression of a ratio (default 0.15)")
    p.add_argument("--fail-on-missing", action="store_true", help="a baseline ratio this run lacks fails the gate")
    p.add_argument("--save-baseline", type=Path, metavar="PATH", help="also write this run's results, without time series, as a baseline")
    p.add_argument("--seed", type=int, default=1, help="seed of the arrival schedules")
    p.add_argument("--workers", type=int, default=servers.workers_per_gateway,
                   help="listen.workers of every gateway started (default: one per CPU, as deployed)")
    p.add_argument("--list", action="store_true", help="list the scenarios and whether each can run here")
    return p


def profile_for(args: argparse.Namespace):
    profile = PROFILES["quick" if args.quick else "release" if args.release else "default"]
    overrides = {}
    if args.reps is not None:
        overrides["reps"] = args.reps
    if args.seconds is not None:
        overrides["seconds"] = args.seconds
    if args.soak_seconds is not None:
        overrides["soak_secs"] = args.soak_seconds
    if args.soak_load is not None:
        overrides["soak_load"] = args.soak_load
    return dataclasses.replace(profile, **overrides)


class Log:
    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def __call__(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(line, file=sys.stderr, flush=True)
        self._file.write(f"{stamp} {line}\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


BASELINE = Path(__file__).with_name("baseline.json")


def expected_seconds(name: str, profile, baseline_path: Path = BASELINE) -> float | None:
    """How long a scenario took in the baseline run, scaled to this profile; None when unknown."""
    try:
        base = json.loads(baseline_path.read_text(encoding="utf-8"))
        took = float(base["scenarios"][name]["duration_secs"])
        before = base["profile"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if name == "soak":
        return took * profile.soak_secs / max(before["soak_secs"], 1e-9)
    return took * (profile.reps * profile.seconds) / max(before["reps"] * before["seconds"], 1e-9)


class Progress:
    """A progress bar with an ETA for the running scenario, and the run's, on stderr.

    Estimates come from the baseline's durations (scaled to the profile); a scenario that runs
    longer than its estimate shows how far over it is instead of a bar stuck at 100%.
    """

    WIDTH = 24

    def __init__(self, name: str, expected: float | None, position: str, after: float | None, stream=sys.stderr) -> None:
        self.name, self.expected, self.position, self.after = name, expected, position, after
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{name}", daemon=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        head = f"[{self.name}] {self.position}"
        if not self.expected:
            return f"{head} {_clock(elapsed)} elapsed (no estimate: not in the baseline)"
        share = elapsed / self.expected
        filled = min(self.WIDTH, int(share * self.WIDTH))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        left = self.expected - elapsed
        eta = f"about {_clock(left)} left" if left >= 0 else f"{_clock(-left)} over the estimate"
        run_left = f"; the run about {_clock(max(0.0, left) + self.after)} left" if self.after is not None else ""
        return f"{head} [{bar}] {min(share, 1.0):4.0%} {_clock(elapsed)} elapsed, {eta}{run_left}"

    def _run(self) -> None:
        every = 1.0 if self.tty else 15.0  # a log file gets a line now and then, a terminal a live bar
        while not self._stop.wait(every):
            if self.tty:
                self.stream.write("\r\x1b[2K" + self.line())
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_scenarios(selected: list, ctx: Context) -> tuple[dict, list[str], bool]:
    results: dict = {}
    warnings: list[str] = []
    any_failed = False
    busy: list[str] = []
    cores = os.cpu_count() or 1
    estimates = [expected_seconds(s.name, ctx.profile) for s in selected]
    for index, scenario in enumerate(selected):
        reason = scenario.unavailable(ctx)
        if reason:
            ctx.log(f"[{scenario.name}] not run: {reason}")
            results[scenario.name] = {"title": scenario.title, "status": "not run", "reason": reason}
            continue
        load_before = machine.load_average()
        ctx.log(f"[{scenario.name}] {scenario.title} (load average {load_before[:1]})")
        if load_before and load_before[0] > BUSY_LOAD_SHARE * cores:
            busy.append(f"{scenario.name} ({load_before[0]:.2f})")
        out = Collector(scenario.name, scenario.title)
        started = time.perf_counter()
        later = estimates[index + 1 :]
        after = sum(e for e in later if e) if all(later) else None
        try:
            with Progress(scenario.name, estimates[index], f"{index + 1}/{len(selected)}", after), asyncio.Runner(
                loop_factory=_loop_factory()
            ) as runner:
                runner.run(scenario.run(ctx, out))
            status, error = "ok", None
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' results
            status, error = "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
            any_failed = True
            ctx.log(f"[{scenario.name}] FAILED: {type(exc).__name__}: {exc}")
        result = out.result()
        result.update(status=status, duration_secs=time.perf_counter() - started, load_average_before=load_before,
                      load_average_after=machine.load_average())
        if error:
            result["error"] = error
        warnings.extend(out.warnings())
        results[scenario.name] = result
    if busy:
        warnings.insert(0, f"the 1-minute load average was above {BUSY_LOAD_SHARE * cores:.1f} on {cores} CPUs when these scenarios "
                           f"started: {', '.join(busy)}; other work shared the machine, expect noise in absolute figures")
    return results, warnings, any_failed


def baseline_of(doc: dict) -> dict:
    """A run's results without its time series and per-run curves: what a baseline file needs to gate."""
    out = {k: v for k, v in doc.items() if k != "comparison"}
    out["scenarios"] = {name: {k: v for k, v in result.items() if k not in ("series", "generator")}
                        for name, result in doc["scenarios"].items()}
    return out


def flat_ratios(scenarios: dict) -> dict:
    out = {}
    for name, result in scenarios.items():
        for ratio_name, spec in result.get("ratios", {}).items():
            out[f"{name}.{ratio_name}"] = spec
    return out


def _baseline_line(path: Path, doc: dict) -> str:
    m = doc.get("machine") or {}
    return (f"baseline {path}: {doc.get('mode')} mode, {doc.get('started_at')}, {m.get('cpu_model')} x{m.get('logical_cpus')}, "
            f"source {(doc.get('git') or {}).get('commit')}")


def _stop_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.tolerance < 0:
        print("--tolerance must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    if args.current and not args.compare:
        print("--current needs --compare", file=sys.stderr)
        return EXIT_USAGE
    if args.compare and args.current:
        base = gate.load(args.compare)
        rows = gate.compare(base, gate.load(args.current), args.tolerance)
        print(_baseline_line(args.compare, base))
        print(gate.table(rows))
        return EXIT_REGRESSED if gate.failed(rows, fail_on_missing=args.fail_on_missing) else EXIT_OK

    if args.workers < 1:
        print("--workers must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    servers.workers_per_gateway = args.workers
    profile = profile_for(args)
    scenarios = all_scenarios()
    by_name = {s.name: s for s in scenarios}
    if args.scenarios:
        wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            print(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(by_name)}", file=sys.stderr)
            return EXIT_USAGE
        selected = [by_name[n] for n in wanted]
    else:
        selected = scenarios

    if args.list:
        ctx = Context(profile=profile, workdir=Path(tempfile.gettempdir()), seed=args.seed)
        for s in scenarios:
            reason = s.unavailable(ctx)
            print(f"{s.name:<18} {'runs here' if not reason else 'not run: ' + reason}\n{'':<18} {s.title}")
        return EXIT_OK

    args.out.mkdir(parents=True, exist_ok=True)
    # A CI job's timeout or an operator stops a run with SIGTERM: as an exception, every scenario's
    # clean-up still stops the gateways and load generators it started, and the working directory goes.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="edge-gateway-bench-"))
    log = Log(args.out / "run.log")
    ctx = Context(profile=profile, workdir=workdir, log=log, seed=args.seed)

    baseline = gate.load(args.compare) if args.compare else None
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    description = machine.describe()
    warnings: list[str] = []
    cores = description["logical_cpus"] or 1
    if description["load_average_at_start"] and description["load_average_at_start"][0] > BUSY_LOAD_SHARE * cores:
        warnings.append(f"the machine was busy at start: load average {description['load_average_at_start']} on {cores} CPUs")
    log(f"benchmarks: {profile.name} mode, {profile.reps} repetition(s), scenarios: {', '.join(s.name for s in selected)}")
    try:
        results, scenario_warnings, any_failed = run_scenarios(selected, ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    warnings.extend(scenario_warnings)

    document = {
        "schema": SCHEMA_VERSION,
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "mode": profile.name,
        "workers": servers.workers_per_gateway,
        "profile": dataclasses.asdict(profile),
        "started_at": started_at,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_secs": time.perf_counter() - t0,
        "machine": description | {"load_average_at_end": machine.load_average()},
        "versions": machine.versions(),
        "git": machine.git_revision(),
        "warnings": warnings,
        "scenarios": results,
        "ratios": flat_ratios(results),
    }
    if baseline and baseline.get("mode") != profile.name:
        document["warnings"].append(f"compared with a {baseline.get('mode')}-mode baseline from a {profile.name}-mode run: "
                                    "shorter runs shift some ratios; compare like with like before trusting a verdict")
    rows = gate.compare(baseline, document, args.tolerance) if baseline else None
    if rows is not None:
        document["comparison"] = {
            "baseline": str(args.compare),
            "baseline_git": baseline.get("git"),
            "baseline_mode": baseline.get("mode"),
            "baseline_started_at": baseline.get("started_at"),
            "baseline_machine": baseline.get("machine"),
            "tolerance": args.tolerance,
            "rows": [dataclasses.asdict(r) | {"change": r.change} for r in rows],
            "failed": gate.failed(rows, fail_on_missing=args.fail_on_missing),
        }
    document = clean(document)
    (args.out / "results.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    if args.save_baseline:
        args.save_baseline.write_text(json.dumps(baseline_of(document), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    from benchmarks import report

    plots = report.plots(document, args.out)
    (args.out / "report.md").write_text(report.markdown(document, plots, rows), encoding="utf-8")
    log(f"report: {args.out / 'report.md'}")
    log.close()
    print(report.headline_text(document))
    if rows is not None:
        print(f"\n{_baseline_line(args.compare, baseline)} (tolerance {args.tolerance:.0%}):")
        print(gate.table(rows))
    if rows is not None and gate.failed(rows, fail_on_missing=args.fail_on_missing):
        return EXIT_REGRESSED
    return EXIT_SCENARIO_FAILED if any_failed else EXIT_OK
