"""The device API over real loopback HTTP: every body type, encoding and error status."""

from __future__ import annotations

import asyncio
import gzip
import time

import msgspec
import orjson
import pytest
import zstandard

from tests.gateway.conftest import URL, ndjson, record, signed, wait_for_records

async def post(http, gateway, body: bytes, headers: dict[str, str]):
    async with http.post(gateway.url + URL, data=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


@pytest.mark.parametrize("encoding", [None, "gzip", "zstd"])
@pytest.mark.parametrize("fmt", ["ndjson", "json-array", "json-object", "msgpack"])
async def test_every_body_type_and_encoding_lands_in_the_raw_zone(gateway, http, env, fmt, encoding):
    dev = env.device()
    records = [record(seq=i, temperature_c=20.0 + i) for i in range(3)]
    if fmt == "json-object":
        records = records[:1]
    body, ctype = {
        "ndjson": (ndjson(*records), "application/x-ndjson"),
        "json-array": (orjson.dumps(records), "application/json"),
        "json-object": (orjson.dumps(records[0]), "application/json"),
        "msgpack": (msgspec.msgpack.encode(records), "application/msgpack"),
    }[fmt]
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "zstd":
        body = zstandard.ZstdCompressor().compress(body)
    status, answer, _ = await post(http, gateway, body, signed(dev, body, ctype, encoding))
    assert status == 202, answer
    assert answer["accepted"] == len(records) and answer["rejected"] == 0 and answer["errors"] == []
    lines = await wait_for_records(env.lake, "raw", len(records))
    assert [line["record"] for line in lines] == records
    first = lines[0]
    assert first["gateway_id"] == "gw-test" and first["availability_zone"] == "test-1a"
    assert first["device"] == {"site": "plant-7", "model": "th-200"}
    assert first["ingest_id"] == answer["ingest_id"] and first["partitioned_by"] == "event_time"


@pytest.mark.parametrize("fmt", ["ndjson", "json-array"])
async def test_a_body_starting_with_a_byte_order_mark_lands_whole(gateway, http, env, fmt):
    """Some tools write a UTF-8 byte order mark first (RFC 8259: a parser may ignore it): the first
    record must not be quarantined for it, and the raw zone keeps the record without it."""
    records = [record(seq=i) for i in range(3)]
    body, ctype = {
        "ndjson": (ndjson(*records), "application/x-ndjson"),
        "json-array": (orjson.dumps(records), "application/json"),
    }[fmt]
    body = b"\xef\xbb\xbf" + body
    status, answer, _ = await post(http, gateway, body, signed(env.device(), body, ctype))
    assert status == 202 and answer["accepted"] == 3 and answer["rejected"] == 0, answer
    lines = await wait_for_records(env.lake, "raw", 3)
    assert sorted(line["record"]["seq"] for line in lines) == [0, 1, 2]


def test_a_byte_order_mark_split_across_pieces_is_still_dropped():
    from gateway.ingest.body import LineFramer

    framer = LineFramer(1 << 16)
    assert framer.feed(b"\xef") == [] and framer.feed(b"\xbb") == []
    assert framer.feed(b'\xbf{"a":1}\n{"b"') == [b'{"a":1}']
    assert framer.finish() == [b'{"b"']
    assert LineFramer(1 << 16).feed(b"\xef\xbb{}\n") == [b"\xef\xbb{}"]  # not a whole mark: the line as sent


async def test_unknown_fields_are_kept_in_the_raw_zone(gateway, http, env):
    rec = record(seq=1) | {"firmware": {"build": 7}, "extra": [1, 2]}
    body = ndjson(rec)
    status, _, _ = await post(http, gateway, body, signed(env.device(), body))
    assert status == 202
    (line,) = await wait_for_records(env.lake, "raw", 1)
    assert line["record"]["firmware"] == {"build": 7} and line["record"]["extra"] == [1, 2]


async def test_partial_batch_quarantines_invalid_records_with_their_reason(gateway, http, env):
    good, bad_metrics, not_json = record(seq=1), record(seq=2) | {"metrics": {}}, b"{not json"
    body = ndjson(good, bad_metrics) + not_json + b"\n"
    status, answer, _ = await post(http, gateway, body, signed(env.device(), body))
    assert status == 202
    assert (answer["accepted"], answer["rejected"]) == (1, 2)
    assert [e["index"] for e in answer["errors"]] == [1, 2]
    assert "metrics" in answer["errors"][0]["reason"]
    quarantined = await wait_for_records(env.lake, "quarantine", 2)
    assert sorted(q["index"] for q in quarantined) == [1, 2]
    assert {q["raw"] for q in quarantined} >= {"{not json"}
    assert all(q["device_id"] == "dev-1" and q["reason"] for q in quarantined)
    assert len(await wait_for_records(env.lake, "raw", 1)) == 1


async def test_every_record_invalid_is_422_and_still_quarantined(gateway, http, env):
    body = ndjson(record(seq=1) | {"ts": "yesterday"}, record(seq=2) | {"metrics": {"t": "hot"}})
    status, answer, _ = await post(http, gateway, body, signed(env.device(), body))
    assert status == 422 and answer["error"] == "invalid_records"
    assert len(answer["errors"]) == 2
    assert len(await wait_for_records(env.lake, "quarantine", 2)) == 2


async def test_errors_are_capped_in_the_response(gateway, http, env):
    body = ndjson(*[record(seq=i) | {"metrics": {}} for i in range(150)], record(seq=999))
    status, answer, _ = await post(http, gateway, body, signed(env.device(), body))
    assert status == 202 and answer["rejected"] == 150 and len(answer["errors"]) == 100


@pytest.mark.parametrize(
    "mutate, status, code",
    [
        (lambda h, b: h.pop("X-Signature"), 401, "unauthorized"),
        (lambda h, b: h.update({"X-Signature": "v1=" + "0" * 64}), 401, "unauthorized"),
        (lambda h, b: h.update({"X-Signature": "v2=abc"}), 401, "unauthorized"),
        (lambda h, b: h.update({"X-Timestamp": str(int(time.time()) - 3600)}), 401, "unauthorized"),
        (lambda h, b: h.update({"X-Timestamp": str(int(time.time()) + 3600)}), 401, "unauthorized"),
        (lambda h, b: h.update({"X-Device-Id": "dev-unknown"}), 401, "unauthorized"),
        (lambda h, b: h.update({"Content-Type": "text/csv"}), 415, "unsupported_media_type"),
        (lambda h, b: h.update({"Content-Encoding": "br"}), 415, "unsupported_media_type"),
    ],
    ids=["no-signature", "forged", "wrong-scheme", "expired", "future", "unknown-device", "csv", "brotli"],
)
async def test_request_level_errors(gateway, http, env, mutate, status, code):
    body = ndjson(record(seq=1))
    headers = signed(env.device(), body)
    mutate(headers, body)
    got, answer, _ = await post(http, gateway, body, headers)
    assert (got, answer["error"]) == (status, code)
    assert answer["message"]
    assert read_lake_is_empty(env)


async def test_body_changed_after_signing_is_401(gateway, http, env):
    body = ndjson(record(seq=1))
    headers = signed(env.device(), body)
    got, answer, _ = await post(http, gateway, body.replace(b"21.5", b"99.9"), headers)
    assert got == 401 and "signature" in answer["message"]


async def test_key_of_another_device_is_401(gateway, http, env):
    body = ndjson(record("dev-1", seq=1))
    other = env.device("dev-2")
    headers = signed(other, body)
    headers["X-Device-Id"] = "dev-1"
    got, _, _ = await post(http, gateway, body, headers)
    assert got == 401


async def test_record_for_another_device_is_403_and_nothing_lands(gateway, http, env):
    body = ndjson(record("dev-1", seq=1), record("dev-2", seq=1))
    got, answer, _ = await post(http, gateway, body, signed(env.device("dev-1"), body))
    assert got == 403 and "dev-2" in answer["message"]
    assert read_lake_is_empty(env)


async def test_disabled_device_is_403(gateway, http, env):
    env.disable("dev-3")
    gateway.gateway.reload(gateway.gateway.settings)
    body = ndjson(record("dev-3", seq=1))
    got, answer, _ = await post(http, gateway, body, signed(env.device("dev-3"), body))
    assert got == 403 and "disabled" in answer["message"]


@pytest.mark.parametrize(
    "body, encoding, content_type, message",
    [
        (b"", None, "application/x-ndjson", "no records"),
        (b"\n\n", None, "application/x-ndjson", "no records"),
        (gzip.compress(b"x" * 1000)[:20], "gzip", "application/x-ndjson", "truncated"),
        (b"not gzip at all", "gzip", "application/x-ndjson", "corrupt"),
        (zstandard.ZstdCompressor().compress(b"x" * 1000)[:-4], "zstd", "application/x-ndjson", "truncated"),
        (b"[1, 2", None, "application/json", "malformed"),
        (b"42", None, "application/json", "array"),
        (msgspec.msgpack.encode({"a": 1}), None, "application/msgpack", "array"),
    ],
    ids=["empty", "blank-lines", "truncated-gzip", "not-gzip", "truncated-zstd", "broken-json", "json-scalar", "msgpack-map"],
)
async def test_malformed_framing_is_400(gateway, http, env, body, encoding, content_type, message):
    got, answer, _ = await post(http, gateway, body, signed(env.device(), body, content_type, encoding))
    assert got == 400 and answer["error"] == "malformed"
    assert message in answer["message"]


async def test_idempotency_key_replays_the_answer_and_lands_once(gateway, http, env):
    body = ndjson(record(), record())  # no seq: only the key protects this batch
    first = await post(http, gateway, body, signed(env.device(), body, **{"Idempotency-Key": "batch-42"}))
    again = await post(http, gateway, body, signed(env.device(), body, **{"Idempotency-Key": "batch-42"}))
    assert first[0] == again[0] == 202
    assert first[1] == again[1]
    assert again[2].get("Idempotent-Replayed") == "true"
    await gateway.stop()
    assert len(read_zone_lines(env)) == 2


async def test_retried_sequence_numbers_land_once(gateway, http, env):
    ts = int(time.time() * 1000)
    batch1 = ndjson(record(seq=1, ts=ts), record(seq=2, ts=ts))
    batch2 = ndjson(record(seq=2, ts=ts), record(seq=3, ts=ts))
    _, a1, _ = await post(http, gateway, batch1, signed(env.device(), batch1))
    _, a2, _ = await post(http, gateway, batch2, signed(env.device(), batch2))
    assert (a1["accepted"], a1["duplicates"]) == (2, 0)
    assert (a2["accepted"], a2["duplicates"]) == (2, 1)
    # A device whose counter restarted sends seq 1 again with a new time: that is new data.
    restarted = ndjson(record(seq=1, ts=ts + 5000))
    _, a3, _ = await post(http, gateway, restarted, signed(env.device(), restarted))
    assert a3["duplicates"] == 0
    await gateway.stop()
    assert sorted(line["seq"] for line in read_zone_lines(env)) == [1, 1, 2, 3]


async def test_clock_far_off_partitions_by_arrival_time(gateway, http, env):
    future = int(time.time() * 1000) + 48 * 3600 * 1000
    body = ndjson(record(seq=1, ts=future))
    status, _, _ = await post(http, gateway, body, signed(env.device(), body))
    assert status == 202
    (line,) = await wait_for_records(env.lake, "raw", 1)
    assert line["partitioned_by"] == "arrival_time" and line["event_time_ms"] == future
    hour = time.strftime("dt=%Y-%m-%d/hour=%H", time.gmtime(time.time()))
    assert list((env.lake / "raw" / "telemetry").glob(hour.replace("/", "/") + "/*.ndjson.zst"))


async def test_rfc3339_timestamps_partition_by_event_time(gateway, http, env):
    body = ndjson(record(seq=1, ts=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 7200))))
    assert (await post(http, gateway, body, signed(env.device(), body)))[0] == 202
    (line,) = await wait_for_records(env.lake, "raw", 1)
    expected = time.strftime("%Y-%m-%d/%H", time.gmtime(line["event_time_ms"] / 1000))
    landed = next((env.lake / "raw").rglob("*.ndjson.zst"))
    assert f"dt={expected.split('/')[0]}/hour={expected.split('/')[1]}" in str(landed)
    assert line["partitioned_by"] == "event_time"


async def test_operator_endpoints(gateway, http, env):
    async with http.get(gateway.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(gateway.url + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ready"
    body = ndjson(record(seq=1))
    await post(http, gateway, body, signed(env.device(), body))
    await wait_for_records(env.lake, "raw", 1)
    text = await metrics_once_landed(http, gateway, 'edge_gateway_records_landed_total{zone="raw"} 1.0')
    for name in (
        'edge_gateway_http_requests_total{route="/v1/telemetry",status="202"} 1.0',
        'edge_gateway_records_total{outcome="accepted"} 1.0',
        "edge_gateway_wal_fsync_duration_seconds_count",
        "edge_gateway_http_request_duration_seconds_bucket",
        'edge_gateway_records_landed_total{zone="raw"} 1.0',
        "edge_gateway_wal_bytes",
    ):
        assert name in text, name
    async with http.get(gateway.url + "/nope") as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"


async def metrics_once_landed(http, gateway, line: str, timeout: float = 10.0) -> str:
    """The metrics page once it shows `line`: the landed counter moves just after the object is visible."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.get(gateway.ops_url + "/metrics") as resp:
            text = await resp.text()
        if line in text or asyncio.get_running_loop().time() > deadline:
            return text
        await asyncio.sleep(0.05)


async def test_draining_answers_503_with_retry_after(gateway, http, env):
    gateway.gateway.begin_drain()
    async with http.get(gateway.url + "/readyz") as resp:
        assert resp.status == 503
    body = ndjson(record(seq=1))
    status, answer, headers = await post(http, gateway, body, signed(env.device(), body))
    assert status == 503 and answer["error"] == "unavailable" and int(headers["Retry-After"]) >= 1


def read_zone_lines(env) -> list[dict]:
    from tests.gateway.conftest import read_zone

    return read_zone(env.lake, "raw")


def read_lake_is_empty(env) -> bool:
    return not any(env.lake.rglob("*.ndjson.zst"))


async def test_open_partition_cap_rolls_early_and_loses_nothing(tmp_path, http):
    """More partitions than the cap: the least recently written one is landed early, never dropped."""
    from gateway.server import start_gateway
    from gateway.settings import load_settings
    from tests.gateway.conftest import make_env, read_zone

    env = make_env(tmp_path, lake={"max_open_partitions": 2, "max_object_age_secs": 3600.0, "target_object_bytes": 64 * 1024 * 1024})
    running = await start_gateway(load_settings(env.config, environ={}))
    now_ms = int(time.time() * 1000)
    hours = [now_ms - h * 3_600_000 for h in range(6)]  # six different hour partitions
    body = ndjson(*[record(seq=i, ts=ts) for i, ts in enumerate(hours * 3)])
    status, answer, _ = await post(http, running, body, signed(env.device(), body))
    assert status == 202 and answer["accepted"] == 18
    # With an hour's age limit, only the cap can have landed anything before the drain.
    raw_lander = running.gateway.pipeline.landers[0]
    for _ in range(100):
        if len(read_zone(env.lake, "raw")) >= 12:
            break
        await asyncio.sleep(0.05)
    assert len(raw_lander._open) <= 2
    assert len(read_zone(env.lake, "raw")) >= 12  # at least four of six partitions rolled early
    await running.stop()
    lines = read_zone(env.lake, "raw")
    assert sorted(line["seq"] for line in lines) == list(range(18))
    partitions = {p.parent.name + p.parent.parent.name for p in (env.lake / "raw").rglob("*.ndjson.zst")}
    assert len(partitions) == 6


async def test_a_device_id_ending_in_a_line_break_is_quarantined_not_written_into_a_raw_line(tmp_path, http):
    """``$`` matches before a final newline: such an id once passed the schema and broke its NDJSON line."""
    from gateway.server import start_gateway
    from gateway.settings import load_settings
    from tests.gateway.conftest import make_env, read_zone

    env = make_env(tmp_path, auth={"mode": "none"})
    running = await start_gateway(load_settings(env.config, environ={}))
    body = ndjson(record(device_id="dev-1\n", seq=1), record(device_id="dev-2", seq=2))
    status, answer, _ = await post(http, running, body, {"Content-Type": "application/x-ndjson"})
    await running.stop()
    assert status == 202 and (answer["accepted"], answer["rejected"]) == (1, 1), answer
    assert "device_id" in answer["errors"][0]["reason"]
    assert [line["device_id"] for line in read_zone(env.lake, "raw")] == ["dev-2"]
