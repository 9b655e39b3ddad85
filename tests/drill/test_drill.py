"""A short AZ failover drill, for real: three ``serve`` processes behind HAProxy, devices, the runbook.

The same command as ``make drill`` with shorter steps and less load (``edge-gateway drill --config``).
It must pass: no acknowledged record lost or duplicated, the planned shift without device-visible
errors other than retried 503s, the lost zone's records delayed rather than lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SHORT = """
workdir = "{root}/work"
report_dir = "{root}/report"

[load]
devices = 12
requests_per_sec = 24
records_per_request = 20

[timing]
precheck_secs = 3
planned_shift_secs = 4
unplanned_loss_secs = 4
rebalanced_secs = 2
"""


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_short_drill_passes_and_reports_its_figures(tmp_path: Path):
    config = tmp_path / "drill.toml"
    config.write_text(SHORT.format(root=tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_GATEWAY__")}
    result = subprocess.run([sys.executable, "-m", "gateway", "drill", "--config", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=140)
    if result.returncode == 3:
        pytest.fail(f"the drill's fleet could not run (is haproxy installed? `make system-deps`):\n{result.stderr}")
    report = tmp_path / "report"
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{(report / 'report.md').read_text() if (report / 'report.md').exists() else ''}"
    assert "AZ failover drill PASSED" in result.stdout
    for figure in ("planned shift:", "unplanned loss:", "delayed by the lost zone (raw)"):
        assert figure in result.stdout

    document = json.loads((report / "report.json").read_text())
    steps = {s["id"]: s for s in document["steps"]}
    assert list(steps) == ["precheck", "planned_shift", "unplanned_loss", "restore", "postcheck"]
    assert all(s["passed"] for s in steps.values())
    headline = document["headline"]
    assert headline["lost_records"] == 0 and headline["duplicated_records"] == 0
    assert headline["acked_records"] > 1000
    shift = steps["planned_shift"]["figures"]
    assert set(shift["device_errors"]) <= {"503"}, shift["device_errors"]
    assert shift["exit_code"] == 0 and shift["acked_records_missing_from_lake_after_drain"] == {"raw": 0, "curated": 0}
    # Every record the lost zone acknowledged before it went is in the lake, once, from that zone.
    lost = steps["unplanned_loss"]["figures"]["records_acked_by_zone_before_the_loss"]
    assert lost > 0
    delayed = headline["delayed_by_lost_zone"]
    assert 0 <= delayed["raw"]["records"] <= lost and 0 <= delayed["curated"]["records"] <= lost
    restore = steps["restore"]["figures"]
    assert restore["backlog_landed_secs"] is not None and restore["rebalance_secs"] is not None
    assert (report / "timeline.png").stat().st_size > 10_000
    assert "What this drill proves" in (report / "report.md").read_text()
    instances = document["instances"]
    assert [instances[z]["starts"] for z in "abc"] == [2, 2, 1]
    assert {instances[z]["gateway_id"] for z in "abc"} == {"drill-a", "drill-b", "drill-c"}
