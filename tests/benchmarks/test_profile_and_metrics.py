"""The harness's own arithmetic: stages of a stack, a histogram's quantile between two scrapes, the disk probe."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.disk import fsync_latency
from benchmarks.gateway_metrics import histogram_quantile
from benchmarks.profile import OTHER, Profile, stage_of


def test_a_sample_belongs_to_the_innermost_stage_on_its_stack() -> None:
    stack = [
        "_handle (aiohttp/web_app.py:1)",
        "_ingest (gateway/ingest/handler.py:2)",
        "add (gateway/ingest/validate.py:3)",
        "line (gateway/ingest/enrich.py:4)",
    ]
    assert stage_of(stack) == "enrich"
    assert stage_of(stack[:3]) == "decode + validate"
    assert stage_of(stack[:2]) == "http: read + answer"
    assert stage_of(["run (asyncio/runners.py:1)"]) == OTHER


def test_cpu_per_record_is_split_by_the_stage_shares() -> None:
    profile = Profile(records=1000, cpu_secs=0.01)  # 10 us per record in all
    profile.samples.update({"decode + validate": 30, "wal: write + fsync": 10})
    table = {row["stage"]: row for row in profile.table()}
    assert math.isclose(table["decode + validate"]["us_per_record"], 7.5)
    assert math.isclose(table["wal: write + fsync"]["share"], 0.25)


def _histogram(counts: dict[str, float], name: str = "h") -> str:
    lines = [f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}"}} {n}' for le, n in counts.items()]
    lines += [f"{name}_count {counts['+Inf']}", f"{name}_sum 1.0"]
    return "\n".join(lines) + "\n"


def test_a_quantile_counts_only_what_was_observed_between_the_scrapes() -> None:
    before = _histogram({"0.001": 100, "0.01": 100, "0.1": 100, "+Inf": 100})
    after = _histogram({"0.001": 100, "0.01": 190, "0.1": 200, "+Inf": 200})
    assert histogram_quantile(before, after, "h", 0.5) == 0.01
    assert histogram_quantile(before, after, "h", 0.99) == 0.1
    assert math.isnan(histogram_quantile(before, before, "h", 0.99))


def test_the_disk_probe_measures_real_fsyncs_and_leaves_nothing(tmp_path: Path) -> None:
    result = fsync_latency(tmp_path, appends=5, append_bytes=4096)
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert list(tmp_path.iterdir()) == []
