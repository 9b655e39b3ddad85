"""The README's first command: the demo lands every accepted record and says where."""

from __future__ import annotations

import io

import pytest

from gateway.demo import MotoServer, run_demo


async def test_demo_lands_every_accepted_record_in_the_local_lake(tmp_path):
    out = io.StringIO()
    result = await run_demo(tmp_path / "demo", seconds=1.0, devices=5, requests_per_sec=50, records_per_request=20, out=out)
    load, lake = result["load"], result["lake"]
    assert load.status_counts == {202: load.sent_requests}
    assert lake["raw"]["records"] + lake.get("quarantine", {}).get("records", 0) == load.sent_records
    assert lake["raw"]["records"] == load.accepted_records
    text = out.getvalue()
    assert "raw/telemetry/dt=" in text and "one raw record, as landed" in text


@pytest.mark.slow
async def test_demo_through_the_s3_api(tmp_path):
    moto = MotoServer(tmp_path / "moto.log")
    try:
        await moto.wait_ready()
        await moto.create_bucket("demo-lake")
        out = io.StringIO()
        result = await run_demo(
            tmp_path / "demo", seconds=1.0, devices=5, requests_per_sec=50, records_per_request=20, s3_endpoint=moto.url, out=out
        )
    finally:
        moto.stop()
    load, lake = result["load"], result["lake"]
    assert lake["raw"]["records"] + lake.get("quarantine", {}).get("records", 0) == load.sent_records
    assert lake["raw"]["records"] == load.accepted_records
    assert "s3://demo-lake/raw/telemetry/dt=" in out.getvalue()
    assert "Glue partitions: edge_demo.raw_telemetry/dt=" in out.getvalue()
