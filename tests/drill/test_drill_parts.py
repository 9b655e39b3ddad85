"""The drill's parts without processes: settings, metrics parsing, the lake index, the post-check's
accounting, the blocking alarms, the step order with its rollback, and the report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gateway.drill.devices import Attempt, Clock, Devices, Request
from gateway.drill.lake import LakeIndex
from gateway.drill.monitor import InstanceSample, Sample, parse_metrics
from gateway.drill.report import write_report
from gateway.drill.run import MARKER, prepare_workdir, run_steps
from gateway.drill.runbook import STEP_IDS, load_runbook
from gateway.drill.settings import DrillConfigError, DrillSettings, dump_drill_settings, load_drill_settings
from gateway.drill.steps import Drill, StepResult, postcheck


def test_settings_default_load_and_refuse_unknown_keys(tmp_path: Path):
    assert load_drill_settings(None) == DrillSettings()
    path = tmp_path / "drill.toml"
    path.write_text(dump_drill_settings(DrillSettings()))
    assert load_drill_settings(path) == DrillSettings()
    path.write_text('[load]\ndevices = 4\n[thresholds.planned_shift]\nmax_shift_secs = 3\n')
    settings = load_drill_settings(path)
    assert settings.load.devices == 4 and settings.thresholds == {"planned_shift": {"max_shift_secs": 3.0}}
    path.write_text("[load]\ndevice = 4\n")
    with pytest.raises(DrillConfigError, match="device"):
        load_drill_settings(path)
    path.write_text('[fleet]\nzones = ["a", "b", "a"]\n')
    with pytest.raises(DrillConfigError, match="twice"):
        load_drill_settings(path)


def test_the_workdir_is_emptied_only_when_the_drill_made_it(tmp_path: Path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DrillConfigError, match="not made by the drill"):
        prepare_workdir(foreign)
    assert (foreign / "notes.txt").exists()
    work = prepare_workdir(tmp_path / "drill")
    (work / "old.log").write_text("x")
    prepare_workdir(work)
    assert sorted(p.name for p in work.iterdir()) == [MARKER]


def test_parse_metrics_sums_backlog_and_keeps_the_oldest_age():
    text = """# HELP edge_gateway_wal_backlog_bytes WAL bytes
edge_gateway_wal_backlog_bytes{consumer="curated"} 2048.0
edge_gateway_wal_backlog_bytes{consumer="raw"} 1024.0
edge_gateway_wal_oldest_unlanded_age_seconds{consumer="curated"} 3.5
edge_gateway_wal_oldest_unlanded_age_seconds{consumer="raw"} 1.25
edge_gateway_wal_bytes 4096.0
edge_gateway_wal_capacity_bytes 8192.0
edge_gateway_wal_fsync_duration_seconds_count 10.0
"""
    figures = parse_metrics(text)
    assert figures["backlog_bytes"] == 3072.0 and figures["backlog_by_zone"] == {"curated": 2048.0, "raw": 1024.0}
    assert figures["oldest_age_secs"] == 3.5
    sample = InstanceSample(True, "UP", scraped=True, wal_bytes=figures["wal_bytes"], capacity_bytes=figures["capacity_bytes"])
    assert sample.wal_fill_percent == 50.0


# ---- a synthetic lake and device log --------------------------------------------------------------


def raw_object(path: Path, gateway_id: str, keys: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = b"".join(json.dumps({"gateway_id": gateway_id, "device_id": d, "seq": s, "record": {}}).encode() + b"\n" for d, s in keys)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))


def curated_object(path: Path, keys: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"device_id": [d for d, _ in keys], "seq": [s for _, s in keys]}), path)


def request(device_id: str, first: int, count: int, statuses: list, acked_by: str = "", at: float = 1.0) -> Request:
    r = Request(device_id, first, count, scheduled=at)
    for i, status in enumerate(statuses):
        r.attempts.append(Attempt(at + i, at + i + 0.01, status, acked_by if status == 202 else ""))
    if statuses and statuses[-1] == 202:
        r.acked_at, r.acked_by = at + len(statuses), acked_by
    return r


def test_the_lake_index_attributes_objects_and_keeps_first_sightings(tmp_path: Path):
    lake = LakeIndex(tmp_path, ["drill-a", "drill-ab"])
    part = tmp_path / "raw" / "telemetry" / "dt=2026-01-01" / "hour=00"
    raw_object(part / "drill-ab-0-9.ndjson.zst", "drill-ab", [("d", 1), ("d", 2)])
    raw_object(part / ".drill-a-0-9.ndjson.zst.tmp", "drill-a", [("d", 9)])  # still being written
    curated_object(tmp_path / "curated" / "telemetry" / "dt=2026-01-01" / "hour=00" / "drill-a-0-9.parquet", [("d", 3)])
    assert lake.refresh() == 2
    raw = lake.count("raw")
    assert raw.copies.keys() == {("d", 1), ("d", 2)} and raw.copies[("d", 1)][0][0] == "drill-ab"
    assert lake.count("curated", gateway_id="drill-a").keys() == {("d", 3)}
    key = "raw/telemetry/dt=2026-01-01/hour=00/drill-ab-0-9.ndjson.zst"
    first = lake.objects[key].landed_at
    import os
    os.utime(part / "drill-ab-0-9.ndjson.zst", (first + 100, first + 100))  # a replay rewrites the object
    lake.refresh()
    assert lake.objects[key].landed_at == first
    assert lake.count("raw").keys() == {("d", 1), ("d", 2)}


def make_drill(tmp_path: Path, requests: list[Request]) -> Drill:
    settings = DrillSettings(workdir=str(tmp_path))
    devices = Devices(settings.load, Clock())
    devices.devices = [SimpleNamespace(requests=requests)]
    fleet = {z: SimpleNamespace(gateway_id=f"drill-{z}", running=lambda: True) for z in "abc"}
    monitor = SimpleNamespace(samples=[], latest=lambda: None)
    return Drill(settings, load_runbook(), devices.clock, fleet, devices, monitor,
                 LakeIndex(tmp_path / "lake", [f"drill-{z}" for z in "abc"]), http=None)


def test_postcheck_tells_lost_duplicated_and_retry_copies_apart(tmp_path: Path):
    requests = [
        request("d1", 0, 2, [202], "a"),                     # landed once: fine
        request("d1", 2, 2, ["connection", 202], "c"),       # lost answer, then another zone: copies allowed
        request("d2", 0, 2, [202], "b"),                     # landed twice by one zone: a duplicate
        request("d2", 2, 1, [202], "b"),                     # never landed: lost
        request("d3", 0, 1, [503, 503]),                     # refused, and landed anyway: a violation
    ]
    d = make_drill(tmp_path, requests)
    part = tmp_path / "lake" / "raw" / "telemetry" / "dt=2026-01-01" / "hour=00"
    raw_object(part / "drill-a-1-2.ndjson.zst", "drill-a", [("d1", 0), ("d1", 1), ("d1", 2), ("d1", 3)])
    raw_object(part / "drill-c-1-2.ndjson.zst", "drill-c", [("d1", 2), ("d1", 3)])
    raw_object(part / "drill-b-1-2.ndjson.zst", "drill-b", [("d2", 0), ("d2", 1), ("d3", 0)])
    raw_object(part / "drill-b-3-4.ndjson.zst", "drill-b", [("d2", 0), ("d2", 1)])
    cur = tmp_path / "lake" / "curated" / "telemetry" / "dt=2026-01-01" / "hour=00"
    curated_object(cur / "drill-a-1-2.parquet", [("d1", 0), ("d1", 1), ("d1", 2), ("d1", 3), ("d2", 0), ("d2", 1), ("d2", 2)])
    result = StepResult("postcheck", "Post-check")
    postcheck(d, result)
    raw = result.figures["zones"]["raw"]
    assert (raw["missing"], raw["duplicated"], raw["retry_copies_across_instances"], raw["refused_but_landed"]) == (1, 2, 2, 1)
    assert result.figures["zones"]["curated"]["missing"] == 0
    failed = {c.name for c in result.checks if not c.passed}
    assert failed == {"acknowledged records missing from raw or curated",
                      "acknowledged records landed more than once (beyond retries after a lost answer)",
                      "records of refused requests that landed"}


def test_the_blocking_alarms_read_the_device_log_and_the_wal(tmp_path: Path):
    d = make_drill(tmp_path, [])
    now = d.clock.now()
    ok = [request(f"d{i}", 0, 1, [202], "a", at=now - 1) for i in range(40)]
    d.devices.devices = [SimpleNamespace(requests=ok)]
    assert d.blocking_breach() == ""
    d.devices.devices = [SimpleNamespace(requests=ok + [request(f"e{i}", 0, 1, [502, 202], "c", at=now - 2) for i in range(4)])]
    assert "device error rate" in d.blocking_breach()
    d.devices.devices = [SimpleNamespace(requests=ok)]
    d.monitor = SimpleNamespace(latest=lambda: Sample(now, {"a": InstanceSample(True, "UP", scraped=True, wal_bytes=90, capacity_bytes=100)}))
    assert d.blocking_breach() == "zone a WAL 90% full (> 80%)"
    d.monitor = SimpleNamespace(latest=lambda: Sample(now, {"a": InstanceSample(True, "UP", scraped=True, oldest_age_secs=901)}))
    assert "oldest unlanded record" in d.blocking_breach()


def sequence(tmp_path: Path, outcomes: dict[str, str]) -> tuple[dict[str, StepResult], list[str]]:
    d = make_drill(tmp_path, [])
    ran: list[str] = []

    def body(step_id: str):
        async def run(drill: Drill, result: StepResult) -> None:
            ran.append(step_id)
            outcome = outcomes.get(step_id, "pass")
            if outcome == "fail":
                result.check("something", 1, 0)
            elif outcome == "alarm":
                result.rolled_back_early = "device error rate 9% (> 5%)"
            elif outcome == "raise":
                raise RuntimeError("boom")
        return run

    steps = {s: StepResult(s, s) for s in STEP_IDS}
    asyncio.run(run_steps(d, steps, lambda text: None, {s: body(s) for s in STEP_IDS[:4]}))
    return steps, ran


def test_a_failed_precheck_changes_nothing(tmp_path: Path):
    steps, ran = sequence(tmp_path, {"precheck": "fail"})
    assert ran == ["precheck"]
    assert all(steps[s].skipped for s in ("planned_shift", "unplanned_loss", "restore"))


def test_a_blocking_alarm_rolls_back_early_and_the_restore_still_runs(tmp_path: Path):
    steps, ran = sequence(tmp_path, {"planned_shift": "alarm"})
    assert ran == ["precheck", "planned_shift", "restore"]
    assert steps["unplanned_loss"].skipped.startswith("rolled back early")
    assert not steps["planned_shift"].passed


def test_a_step_that_breaks_fails_and_the_rollback_runs(tmp_path: Path):
    steps, ran = sequence(tmp_path, {"unplanned_loss": "raise"})
    assert ran == ["precheck", "planned_shift", "unplanned_loss", "restore"]
    assert not steps["unplanned_loss"].passed and "boom" in steps["unplanned_loss"].notes[0]


def test_the_report_has_markdown_json_and_a_timeline(tmp_path: Path):
    requests = [request("d1", 0, 2, [202], "a", at=0.5), request("d1", 2, 2, [503, 202], "b", at=1.5)]
    d = make_drill(tmp_path, requests)
    steps = [StepResult(s, s, started=i, ended=i + 1) for i, s in enumerate(STEP_IDS)]
    steps[1].check("seconds until no device request reaches zone a", 0.4, 10, unit="s")
    samples = [Sample(t, {z: InstanceSample(True, "UP", scraped=True, backlog_bytes=t * 1000) for z in "abc"}) for t in (0.5, 1.0, 1.5)]
    context = {"runbook": load_runbook().summary(), "overrides": {}, "zones": ["a", "b", "c"],
               "load": {"devices": 1, "requests_per_sec": 2.0, "records_per_request": 2}, "started_at": "now",
               "duration_secs": 5.0, "limits": "what it proves"}
    document = write_report(tmp_path / "report", passed=False, steps=steps, devices=d.devices, samples=samples,
                            events=[(1.0, "SIGTERM zone a (drain)")], context=context)
    assert document["passed"] is False
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown.startswith("# AZ failover drill: FAILED") and "what it proves" in markdown
    assert json.loads((tmp_path / "report" / "report.json").read_text())["timeline"]["offered_requests_per_sec"]
    assert (tmp_path / "report" / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "report" / "devices.jsonl").read_text().splitlines()
    assert [json.loads(line)["acked_by"] for line in lines] == ["a", "b"]


def test_the_lake_index_reads_a_bucket_through_the_s3_api(moto_endpoint: str):
    import boto3

    from gateway.drill.lake import S3Store

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="drill-parts")
    lines = b'{"gateway_id": "drill-b", "device_id": "d", "seq": 1}\n{"gateway_id": "drill-b", "device_id": "d", "seq": 2}\n'
    s3.put_object(Bucket="drill-parts", Key="lake/raw/telemetry/dt=2026-01-01/hour=00/drill-b-0-1.ndjson.zst",
                  Body=zstandard.ZstdCompressor().compress(lines))
    table = pa.BufferOutputStream()
    pq.write_table(pa.table({"device_id": ["d"], "seq": [1]}), table)
    s3.put_object(Bucket="drill-parts", Key="lake/curated/telemetry/dt=2026-01-01/hour=00/drill-b-0-1.parquet",
                  Body=table.getvalue().to_pybytes())
    s3.put_object(Bucket="drill-parts", Key="lake/elsewhere/file.txt", Body=b"not the lake")
    lake = LakeIndex(S3Store(moto_endpoint, "drill-parts", prefix="lake"), ["drill-a", "drill-b"])
    assert lake.refresh() == 2
    assert lake.count("raw", gateway_id="drill-b").keys() == {("d", 1), ("d", 2)}
    assert lake.count("curated").copies == {("d", 1): [("drill-b", lake.objects[
        "curated/telemetry/dt=2026-01-01/hour=00/drill-b-0-1.parquet"].landed_at)]}
    assert lake.summary()["raw"]["records"] == 2
