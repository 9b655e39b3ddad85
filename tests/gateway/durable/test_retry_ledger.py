"""The retry ledger: shared by processes, bounded, and rebuilt from the WAL after a crash."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgspec
import orjson

from connectors.local_lake import LocalLakeSink
from gateway.ops.metrics import GatewayMetrics
from gateway.lake.pipeline import Pipeline, RequestRecord
from gateway.durable.retry_ledger import RetryLedger, request_key
from gateway.settings import load_settings
from gateway.durable.wal import KIND_RECORDS, KIND_REQUEST, WriteAheadLog, encode_frame
from gateway.durable.wal_layout import slot_for
from tests.gateway.conftest import write_config


def open_ledger(path, **kw) -> RetryLedger:
    ledger = RetryLedger(path, window_secs=kw.pop("window_secs", 600), max_keys=kw.pop("max_keys", 1000))
    ledger.open()
    return ledger


def other_process(path, code: str) -> subprocess.Popen:
    """A second process using the same ledger, as another worker would."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from gateway.durable.retry_ledger import RetryLedger, request_key
        ledger = RetryLedger({str(path)!r}, window_secs=600, max_keys=1000)
        ledger.open()
        """
    ) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_a_request_runs_once_and_its_retries_get_its_answer(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    key = request_key("dev-1", "key:abc")
    assert ledger.claim_request(key, "sha-1").outcome == "run"
    ledger.record("wal-a", 10, [("dev-1", 7, 1000)], [(key, "sha-1", b'202{"accepted":1}')])
    again = ledger.claim_request(key, "sha-1")
    assert (again.outcome, again.answer) == ("answered", b'202{"accepted":1}')
    assert ledger.claim_request(key, "sha-2").outcome == "conflict", "a reused key with another body"
    assert ledger.mark("wal-a") == 10
    ledger.close()


def test_a_failed_request_can_run_again(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    key = request_key("dev-1", "body:123")
    assert ledger.claim_request(key, "123").outcome == "run"
    ledger.release_request(key)
    assert ledger.claim_request(key, "123").outcome == "run"
    ledger.close()


def test_another_live_process_running_the_key_makes_a_retry_wait_until_it_dies(tmp_path):
    path = tmp_path / "ledger"
    ledger = open_ledger(path)
    proc = other_process(
        path,
        """
        print(ledger.claim_request(request_key("dev-1", "key:k"), "sha").outcome, flush=True)
        time.sleep(60)
        """,
    )
    try:
        assert proc.stdout.readline().strip() == "run"
        assert ledger.claim_request(request_key("dev-1", "key:k"), "sha").outcome == "running"
        assert ledger.claim_request(request_key("dev-1", "key:k"), "other").outcome == "conflict"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert ledger.claim_request(request_key("dev-1", "key:k"), "sha").outcome == "run", "a dead owner's claim is void"
    ledger.close()


def test_records_one_process_accepted_are_duplicates_in_another(tmp_path):
    path = tmp_path / "ledger"
    ledger = open_ledger(path)
    ledger.record("wal-a", 3, [("dev-1", 1, 5000), ("dev-1", 2, 6000)], [])
    proc = other_process(
        path,
        """
        seen = ledger.reader()
        print(seen.is_duplicate("dev-1", 1, 5000), seen.is_duplicate("dev-1", 2, 9999), seen.is_duplicate("dev-1", 3, 7000))
        """,
    )
    out = proc.communicate(timeout=30)[0]
    assert out.split() == ["True", "False", "False"]  # a new event time is a counter reset
    ledger.close()


def test_generations_bound_what_is_remembered(tmp_path):
    ledger = open_ledger(tmp_path / "ledger", max_keys=10)
    for batch in range(10):
        ledger.record("wal-a", batch, [("dev-1", batch * 5 + i, 1) for i in range(5)], [])
    assert ledger.counts()["seq"] <= 20
    seen = ledger.reader()
    assert seen.is_duplicate("dev-1", 49, 1) and not seen.is_duplicate("dev-1", 0, 1)
    seen.close()
    ledger.close()


async def test_a_crash_between_fsync_and_ledger_is_repaired_from_the_wal(tmp_path):
    config = write_config(tmp_path)
    settings = load_settings(config, environ={})
    slot = slot_for(settings.wal.dir, "gw-test", 0, 1)
    # What a gateway that died right after its fsync leaves: durable frames the ledger never saw.
    wal = WriteAheadLog(slot.directory / "segments", segment_bytes=1 << 20, max_total_bytes=1 << 30)
    await wal.start()
    lines = b"".join(orjson.dumps({"device_id": "dev-1", "seq": s, "event_time_ms": 1000 + s}) + b"\n" for s in range(3))
    key = request_key("dev-1", "key:lost-answer")
    request = msgspec.msgpack.encode(RequestRecord(key, "sha", b'202{"accepted":3}'))
    await wal.append([encode_frame(KIND_RECORDS, 1, 0, 0, 0, 3, lines), encode_frame(KIND_REQUEST, 0, 0, 0, 0, 0, request)])
    await wal.close()
    ledger = open_ledger(tmp_path / "wal" / "ledger")
    pipeline = Pipeline(settings, slot=slot, sink=LocalLakeSink(tmp_path / "lake"), metrics=GatewayMetrics(), ledger=ledger)
    await pipeline.start()
    seen = ledger.reader()
    assert [seen.is_duplicate("dev-1", s, 1000 + s) for s in range(3)] == [True, True, True]
    seen.close()
    assert ledger.claim_request(key, "sha").answer == b'202{"accepted":3}'
    assert ledger.mark(pipeline.wal_id) == 3
    await pipeline.drain(5)
    await pipeline.close()
    ledger.close()
