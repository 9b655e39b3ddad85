"""The gateway landing in S3 through moto's server: zones, catalog, events, outages, crashes."""

from __future__ import annotations

import asyncio
import collections
import io
import signal
import time
import uuid

import aiohttp
import msgspec
import orjson
import pytest
import zstandard
from aiobotocore.session import get_session

from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.fixtures.fault_proxy import FaultProxy, s3_error
from tests.gateway.conftest import make_env, record, signed

REGION = "us-east-1"


@pytest.fixture
async def aws(moto_endpoint):
    session = get_session()
    async with session.create_client("s3", endpoint_url=moto_endpoint, region_name=REGION) as s3, session.create_client(
        "glue", endpoint_url=moto_endpoint, region_name=REGION
    ) as glue:
        yield s3, glue


@pytest.fixture
async def bucket(aws):
    s3, _ = aws
    name = f"lake-{uuid.uuid4().hex[:10]}"
    await s3.create_bucket(Bucket=name)
    return name


def s3_sections(endpoint: str, bucket: str, **s3_extra) -> dict:
    return {
        "lake": {"kind": "s3", "target_object_bytes": 64 * 1024, "max_object_age_secs": 0.3},
        "s3": {"bucket": bucket, "endpoint_url": endpoint, "region": REGION, "addressing_style": "path", **s3_extra},
    }


async def bucket_lines(s3, bucket: str, zone: str) -> list[dict]:
    out = []
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=f"{zone}/"):
        for item in page.get("Contents", []):
            obj = await s3.get_object(Bucket=bucket, Key=item["Key"])
            data = await obj["Body"].read()
            text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
            out.extend(msgspec.json.decode(line) for line in text.split(b"\n") if line)
    return out


async def post(url: str, device, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/telemetry", data=body, headers=signed(device, body)) as resp:
            return resp.status, await resp.json()


def ndjson(records) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


async def test_records_land_in_s3_zones_with_glue_partitions(tmp_path, moto_endpoint, aws, bucket):
    s3, glue = aws
    sections = s3_sections(moto_endpoint, bucket, prefix="lake/")
    sections["glue"] = {"database": f"edge_{uuid.uuid4().hex[:8]}", "endpoint_url": moto_endpoint, "region": REGION}
    env = make_env(tmp_path, **sections)
    running = await start_gateway(load_settings(env.config, environ={}))
    body = ndjson([record(seq=i) for i in range(50)] + [record(seq=99) | {"metrics": {}}])
    status, answer = await post(running.url, env.device(), body)
    assert status == 202 and answer["accepted"] == 50 and answer["rejected"] == 1
    await running.stop()
    s3_raw = []
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix="lake/raw/telemetry/"):
        s3_raw.extend(item["Key"] for item in page.get("Contents", []))
    assert s3_raw and all(k.startswith("lake/raw/telemetry/dt=") and k.endswith(".ndjson.zst") for k in s3_raw)
    raw = await bucket_lines(s3, bucket, "lake/raw")
    assert sorted(line["seq"] for line in raw) == list(range(50))
    quarantine = await bucket_lines(s3, bucket, "lake/quarantine")
    assert [q["index"] for q in quarantine] == [50]
    database = sections["glue"]["database"]
    tables = {t["Name"] for t in (await glue.get_tables(DatabaseName=database))["TableList"]}
    assert {"raw_telemetry", "quarantine_telemetry", "curated_telemetry"} <= tables
    partitions = (await glue.get_partitions(DatabaseName=database, TableName="raw_telemetry"))["Partitions"]
    dt, hour = time.strftime("%Y-%m-%d %H", time.gmtime()).split()
    assert [dt, hour] in [p["Values"] for p in partitions]


async def test_s3_outage_is_absorbed_by_the_wal_then_drains(tmp_path, moto_endpoint, aws, bucket):
    s3, _ = aws
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    sections = s3_sections(proxy.url, bucket, retry={"initial_interval_secs": 0.05, "max_interval_secs": 0.2, "max_elapsed_secs": 0.5})
    sections["wal"] = {"segment_bytes": 32 * 1024, "max_total_bytes": 256 * 1024, "retry_after_secs": 2}
    env = make_env(tmp_path, **sections)
    running = await start_gateway(load_settings(env.config, environ={}))
    await proxy.pause()  # S3 unreachable: connection refused
    accepted, statuses = 0, collections.Counter()
    async with aiohttp.ClientSession() as http:
        for i in range(200):
            body = ndjson([record(seq=i * 20 + j, pad_metric=float(j)) for j in range(20)])
            async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                statuses[resp.status] += 1
                if resp.status == 202:
                    accepted += 20
                else:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "2"
                    # This worker cannot take records: the retry should connect again (it may reach one that can).
                    assert resp.headers.get("Connection", "").lower() == "close"
                    async with http.get(running.url + "/readyz") as ready:
                        assert ready.status == 503  # out of rotation only once the WAL is full
                    break
            if i == 0:
                async with http.get(running.url + "/readyz") as ready:
                    assert ready.status == 200  # the WAL has room: still ready while S3 is away
        assert statuses[503] == 1 and accepted > 0
        text = ""
        for _ in range(100):  # failed landings are counted once the sink's own retries give up
            async with http.get(running.ops_url + "/metrics") as resp:
                text = await resp.text()
            if 'stage="land_raw"' in text:
                break
            await asyncio.sleep(0.1)
        assert 'edge_gateway_stage_errors_total{error="TransientError",stage="land_raw"}' in text
        backlog = next(line for line in text.splitlines() if line.startswith('edge_gateway_wal_backlog_bytes{consumer="raw"}'))
        assert float(backlog.split()[-1]) > 0
    await proxy.resume()
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        lines = await bucket_lines(s3, bucket, "raw")
        if len(lines) >= accepted:
            break
        await asyncio.sleep(0.2)
    await running.stop()
    await proxy.stop()
    seqs = collections.Counter(line["seq"] for line in await bucket_lines(s3, bucket, "raw"))
    assert len(seqs) == accepted and max(seqs.values()) == 1


@pytest.mark.slow
async def test_sigkill_during_a_multipart_upload_lands_everything_exactly_once(tmp_path, moto_endpoint, aws, bucket, gateway_process):
    s3, _ = aws
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    five_mib = 5 * 1024 * 1024
    sections = s3_sections(proxy.url, bucket, multipart_threshold_bytes=five_mib, part_size_bytes=five_mib)
    sections["lake"] |= {"target_object_bytes": 48 * 1024 * 1024, "max_object_age_secs": 3600.0, "zstd_level": 1}
    sections["limits"] = {"max_records_per_request": 10_000, "max_body_bytes": 32 * 1024 * 1024, "max_decompressed_bytes": 64 * 1024 * 1024}
    env = make_env(tmp_path, **sections)
    gp = gateway_process(env)
    await asyncio.to_thread(gp.start)  # the proxy lives on this event loop: never block it
    # Hold the second part of any multipart upload: the gateway is then mid-upload for sure.
    proxy.delay_when = lambda r: r.method == "PUT" and "partNumber=2" in r.query
    proxy.delay_secs = 60.0
    acked: set = set()
    rng = __import__("random").Random(7)
    async with aiohttp.ClientSession() as http:
        seq = 0
        while not any(r.method == "PUT" and "partNumber=2" in r.query for r in proxy.seen):
            records = []
            for _ in range(5000):
                seq += 1
                # Random-looking values, so an object stays large after compression.
                records.append(record(seq=seq, **{f"m{k}": rng.random() * 1e6 for k in range(12)}))
            body = ndjson(records)
            async with http.post(gp.url + "/v1/telemetry", data=io.BytesIO(body), headers=signed(env.device(), body)) as resp:
                assert resp.status == 202, await resp.text()
                acked.update(range(seq - 4999, seq + 1))
            await asyncio.sleep(0)
            assert seq < 200_000, "no multipart upload started"
    uploads = await s3.list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads"), "the upload should be in progress at the kill"
    gp.signal(signal.SIGKILL)
    await asyncio.to_thread(gp.wait, 10)
    proxy.delay_when = None
    await asyncio.to_thread(gp.start)  # the proxy lives on this event loop: never block it
    gp.signal(signal.SIGTERM)
    assert await asyncio.to_thread(gp.wait, 120) == 0
    await proxy.stop()
    counts = collections.Counter(line["seq"] for line in await bucket_lines(s3, bucket, "raw"))
    assert set(counts) == acked
    assert max(counts.values()) == 1
    assert not (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads"), "orphaned multipart upload left behind"


async def test_access_denied_to_every_object_for_a_while_dead_letters_nothing(tmp_path, moto_endpoint, aws, bucket):
    """A bucket policy that denies writes for a few seconds (then is mended) refuses every object,
    dead-letter objects included: each record lands in the raw zone once it is mended, none under
    ``deadletter/``."""
    s3, _ = aws
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    env = make_env(tmp_path, **s3_sections(proxy.url, bucket))
    running = await start_gateway(load_settings(env.config, environ={}))
    writes = {"PUT", "POST"}
    proxy.fail_when = lambda seen: s3_error(403, "AccessDenied", "Access Denied") if seen.method in writes else None
    accepted = 0
    async with aiohttp.ClientSession() as http:
        for i in range(20):
            body = ndjson([record(seq=i * 10 + j) for j in range(10)])
            async with http.post(running.url + "/v1/telemetry", data=body, headers=signed(env.device(), body)) as resp:
                assert resp.status == 202
                accepted += 10
            await asyncio.sleep(0.2)
    denied = sum(1 for seen in proxy.seen if seen.method in writes)
    proxy.fail_when = None  # the policy is mended
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(await bucket_lines(s3, bucket, "raw")) < accepted:
        await asyncio.sleep(0.3)
    await running.stop()
    await proxy.stop()
    seqs = collections.Counter(line["seq"] for line in await bucket_lines(s3, bucket, "raw"))
    assert denied >= 5, "the sink was not refused long enough to reach the dead-letter attempt"
    assert len(seqs) == accepted and max(seqs.values()) == 1
    listed = await s3.list_objects_v2(Bucket=bucket, Prefix="deadletter/")
    assert listed.get("KeyCount", 0) == 0, [item["Key"] for item in listed.get("Contents", [])]
