"""Where a gateway's CPU goes, per stage of a record's path: py-spy samples folded into stages.

``Profiler`` samples every process of a running gateway (the supervisor's workers included) with
py-spy while a load runs, writes a flame graph (SVG) and the folded stacks, and attributes each
sample to the first stage its stack meets, walking from the innermost frame outwards. py-spy counts
a thread as busy unless it waits in a known idle call, so a thread waiting for the GIL counts too:
samples give each stage's share, and the CPU time the processes really used (from the kernel),
divided by the records accepted meanwhile and split by those shares, gives microseconds of CPU per
record and stage.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SAMPLE_RATE_HZ = 200

# (stage, what a frame's "function (file:line)" contains); the first match from the leaf wins.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wal: write + fsync", ("gateway/durable/wal.py",)),
    ("retry ledger", ("gateway/durable/retry_ledger.py", "gateway/durable/ledger_catch_up.py")),
    ("authenticate", ("gateway/auth/hmac.py", "gateway/auth/certificate.py", "gateway/edge/replay.py", "gateway/auth/signing.py")),
    ("decode + validate", ("gateway/ingest/validate.py", "gateway/ingest/body.py", "gateway/ingest/records.py")),
    ("enrich", ("gateway/ingest/enrich.py",)),
    ("land: curated (score + Parquet)", ("gateway/lake/curated.py", "connectors/inference/", "batching/")),
    ("land: raw + quarantine (zstd NDJSON)", ("gateway/lake/landing.py", "gateway/lake/formats.py", "connectors/")),
    ("admission + limits", ("gateway/edge/admission.py", "gateway/edge/ratelimit.py", "gateway/edge/connections.py", "gateway/edge/security.py")),
    ("http: read + answer", ("gateway/ingest/handler.py", "gateway/ingest/spool.py", "aiohttp/", "gateway/app.py")),
    ("metrics + logs", ("prometheus_client/", "gateway/ops/metrics.py", "gateway/ops/logs.py", "logging/")),
)
OTHER = "other (event loop, threads, idle waits py-spy counts as busy)"


def available() -> bool:
    return shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()


def py_spy_command() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for stage, markers in STAGES:
            if any(m in frame for m in markers):
                return stage
    return OTHER


@dataclass
class Profile:
    samples: collections.Counter = field(default_factory=collections.Counter)  # stage -> samples
    seconds: float = 0.0
    records: int = 0
    cpu_secs: float = 0.0  # CPU the profiled processes used meanwhile, all threads
    files: list[str] = field(default_factory=list)

    def table(self) -> list[dict]:
        """Per stage: share of busy samples and microseconds of CPU per accepted record."""
        total = sum(self.samples.values()) or 1
        per_record_us = self.cpu_secs / self.records * 1e6 if self.records else float("nan")
        return [
            {"stage": stage, "share": n / total, "us_per_record": n / total * per_record_us}
            for stage, n in self.samples.most_common()
        ]


class Profiler:
    """py-spy on a gateway process and its children for ``seconds``; ``finish`` folds the samples."""

    def __init__(self, pid: int, out_dir: Path, seconds: float, label: str) -> None:
        self.out_dir = out_dir
        self.label = label
        out_dir.mkdir(parents=True, exist_ok=True)
        root = psutil.Process(pid)
        pids = [pid, *(c.pid for c in root.children(recursive=True))]
        self._runs: list[tuple[subprocess.Popen, Path]] = []
        for p in pids:
            for fmt, suffix in (("raw", "folded.txt"), ("flamegraph", "svg")):
                path = out_dir / f"{label}-{p}.{suffix}"
                argv = [py_spy_command(), "record", "--pid", str(p), "--rate", str(SAMPLE_RATE_HZ), "--duration", str(int(seconds)),
                        "--format", fmt, "--output", str(path), "--nonblocking", "--threads"]
                proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self._runs.append((proc, path))
        self.seconds = seconds

    def finish(self, records: int, cpu_secs: float) -> Profile:
        profile = Profile(seconds=self.seconds, records=records, cpu_secs=cpu_secs)
        for proc, path in self._runs:
            try:
                proc.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if not path.exists():
                continue
            profile.files.append(str(path))
            if path.suffix == ".txt":
                for line in path.read_text().splitlines():
                    stack, _, count = line.rpartition(" ")
                    if stack and count.isdigit():
                        # The first entry names the thread: it is not a frame.
                        profile.samples[stage_of(stack.split(";")[1:])] += int(count)
        return profile


def print_table(profile: Profile) -> None:
    total_us = profile.cpu_secs / profile.records * 1e6 if profile.records else float("nan")
    print(f"\nCPU by stage: {total_us:.1f} us per record ({profile.records:,} records, {profile.cpu_secs:.1f} CPU-s in {profile.seconds:.0f} s)")
    print(f"  flame graphs: {', '.join(f for f in profile.files if f.endswith('.svg'))}")
    for row in profile.table():
        print(f"  {row['stage']:<40} {row['share']:6.1%}  {row['us_per_record']:7.2f} us/record")
