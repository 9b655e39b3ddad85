"""The retry ledger: shared by processes, bounded, and rebuilt from the WAL after a crash."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import subprocess
import sys
import textwrap
import time

import lmdb
import msgspec
import orjson
import pytest

from connectors.local_lake import LocalLakeSink
from gateway.ops.metrics import GatewayMetrics
from gateway.lake.pipeline import Pipeline, RequestRecord
from gateway.durable.retry_ledger import BOOT_FILE, LedgerError, RetryLedger, body_key, current_boot_id, idempotency_key, seq_key, span_key
from gateway.settings import load_settings
from gateway.durable.wal import KIND_RECORDS, KIND_REQUEST, WriteAheadLog, encode_frame
from gateway.durable.wal_layout import slot_for
from tests.gateway.conftest import write_config


SHA_1 = hashlib.sha256(b"one body").hexdigest()
SHA_2 = hashlib.sha256(b"another body").hexdigest()


def open_ledger(path, **kw) -> RetryLedger:
    ledger = RetryLedger(path, window_secs=kw.pop("window_secs", 600), max_keys=kw.pop("max_keys", 1000))
    ledger.open()
    return ledger


def other_process(path, code: str) -> subprocess.Popen:
    """A second process using the same ledger, as another worker would."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from gateway.durable.retry_ledger import RetryLedger, idempotency_key
        SHA_1 = {SHA_1!r}
        ledger = RetryLedger({str(path)!r}, window_secs=600, max_keys=1000)
        ledger.open()
        """
    ) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def claim_in_a_killed_process(path, code: str) -> None:
    """Another worker runs ``code`` (which prints a claim's outcome: "run") and is SIGKILLed holding it."""
    proc = other_process(path, textwrap.dedent(code) + "\ntime.sleep(60)\n")
    try:
        assert proc.stdout.readline().strip() == "run"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_request_runs_once_and_its_retries_get_its_answer(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    key = idempotency_key("dev-1", "abc")
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.record("wal-a", 10, [("dev-1", 7, 1000)], [(key, SHA_1, b'202{"accepted":1}')])
    again = ledger.claim_request(key, SHA_1)
    assert (again.outcome, again.answer) == ("answered", b'202{"accepted":1}')
    assert ledger.claim_request(key, SHA_2).outcome == "conflict", "a reused key with another body"
    assert ledger.mark("wal-a") == 10
    ledger.close()


def test_a_failed_request_can_run_again(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    key = body_key("dev-1", SHA_1)
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.release_request(key)
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.close()


def test_another_live_process_running_the_key_makes_a_retry_wait_until_it_dies(tmp_path):
    path = tmp_path / "ledger"
    ledger = open_ledger(path)
    proc = other_process(
        path,
        """
        print(ledger.claim_request(idempotency_key("dev-1", "k"), SHA_1).outcome, flush=True)
        time.sleep(60)
        """,
    )
    try:
        assert proc.stdout.readline().strip() == "run"
        assert ledger.claim_request(idempotency_key("dev-1", "k"), SHA_1).outcome == "running"
        assert ledger.claim_request(idempotency_key("dev-1", "k"), SHA_2).outcome == "conflict"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert ledger.claim_request(idempotency_key("dev-1", "k"), SHA_1).outcome == "run", "a dead owner's claim is void"
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
    for batch in range(10):  # every other seq: each record a run of its own, an entry each
        ledger.record("wal-a", batch, [("dev-1", batch * 10 + 2 * i, 1) for i in range(5)], [])
    # Two generations are visible; a commit (five runs and its device's stamp) lands whole in one.
    assert ledger.counts()["seq"] <= 2 * (10 + 5 + 1)
    seen = ledger.reader()
    assert seen.is_duplicate("dev-1", 98, 1) and not seen.is_duplicate("dev-1", 0, 1)
    seen.close()
    ledger.close()


def test_consecutive_seqs_are_remembered_as_one_entry_per_run(tmp_path):
    ledger = open_ledger(tmp_path / "ledger", max_keys=10)
    for batch in range(50):  # 50 requests of 300 records: 15,000 seqs in 50 entries, well past 10 per generation
        ledger.record("wal-a", batch, [("dev-1", batch * 300 + i, 7_000 + i) for i in range(300)], [])
    seen = ledger.reader()
    assert seen.is_duplicate("dev-1", 14_999, 7_299) and seen.is_duplicate("dev-1", 14_700, 7_000)
    assert not seen.is_duplicate("dev-1", 14_999, 7_298), "another event time: a counter reset"
    assert not seen.is_duplicate("dev-1", 15_000, 7_300), "never sent"
    assert not seen.is_duplicate("dev-1", 0, 7_000), "forgotten: generations are bounded in entries"
    seen.close()
    ledger.close()


@pytest.mark.parametrize("times, entries", [
    ([5_000] * 40, 1),  # stamped at once
    ([5_000 + 1_000 * i for i in range(40)], 1),  # sampled at a fixed interval
    ([9_000 - 10 * i for i in range(40)], 1),  # backwards, evenly
    ([5_000 + 1_000 * i + (i * 7919) % 13 for i in range(40)], 1),  # a clock that jitters
    ([2**63 + i * 3 for i in range(39)] + [0], 40),  # differences beyond int64's reach: an entry per record
])
def test_a_run_keeps_every_event_time_exactly(tmp_path, times, entries):
    ledger = open_ledger(tmp_path / "ledger")
    ledger.record("wal-a", 1, [("dev-1", 100 + i, ms) for i, ms in enumerate(times)], [])
    assert ledger.counts()["seq"] == entries + 1  # and the device's stamp
    seen = ledger.reader()
    assert all(seen.is_duplicate("dev-1", 100 + i, ms) for i, ms in enumerate(times))
    assert not any(seen.is_duplicate("dev-1", 100 + i, ms + 1) for i, ms in enumerate(times))
    assert not seen.is_duplicate("dev-1", 99, times[0]) and not seen.is_duplicate("dev-1", 140, times[-1])
    seen.close()
    ledger.close()


def test_runs_of_devices_that_share_a_prefix_and_gaps_between_runs_stay_apart(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    ledger.record("wal-a", 1, [("dev-1", s, 1) for s in (*range(10, 20), *range(30, 40))]
                  + [("dev-10", s, 2) for s in range(0, 100)] + [("dev-", s, 3) for s in range(15, 35)], [])
    seen = ledger.reader()
    assert [s for s in range(0, 50) if seen.is_duplicate("dev-1", s, 1)] == [*range(10, 20), *range(30, 40)]
    assert [s for s in range(0, 120) if seen.is_duplicate("dev-10", s, 2)] == list(range(100))
    assert [s for s in range(0, 50) if seen.is_duplicate("dev-", s, 3)] == list(range(15, 35))
    assert [s for s in range(60, -1, -1) if seen.is_duplicate("dev-1", s, 1)] == [*range(39, 29, -1), *range(19, 9, -1)]
    seen.close()
    ledger.close()


def test_a_span_of_seqs_is_known_new_only_when_no_generation_holds_any_of_it(tmp_path):
    ledger = open_ledger(tmp_path / "ledger", max_keys=2)
    ledger.record("wal-a", 1, [("dev-1", s, 1) for s in range(100, 200)], [])
    ledger.record("wal-a", 2, [("dev-1", s, 1) for s in range(300, 400)], [])  # in the next generation
    seen = ledger.reader()
    assert seen.none_recorded("dev-1", 0, 99) and seen.none_recorded("dev-1", 200, 299) and seen.none_recorded("dev-1", 400, 10**9)
    assert not seen.none_recorded("dev-1", 0, 100) and not seen.none_recorded("dev-1", 199, 250)
    assert not seen.none_recorded("dev-1", 250, 300) and not seen.none_recorded("dev-1", 0, 10**9)
    assert seen.none_recorded("dev-2", 0, 10**9)
    seen.close()
    ledger.close()


def test_a_restarted_counter_is_new_and_the_newer_run_wins_where_they_overlap(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    ledger.record("wal-a", 1, [("dev-1", s, 1_000 + s) for s in range(0, 300)], [])
    ledger.record("wal-a", 2, [("dev-1", s, 9_000 + s) for s in range(100, 150)], [])  # restarted at 100
    seen = ledger.reader()
    assert all(seen.is_duplicate("dev-1", s, 1_000 + s) for s in range(0, 100))
    assert all(seen.is_duplicate("dev-1", s, 9_000 + s) for s in range(100, 150))
    assert not any(seen.is_duplicate("dev-1", s, 1_000 + s) for s in range(100, 300)), "only ever found new, never lost"
    seen.close()
    ledger.close()


def test_entries_written_one_per_record_still_read(tmp_path):
    # What a ledger held before runs: key ``device \0 seq``, value the event time alone.
    ledger = open_ledger(tmp_path / "ledger")
    ledger.record("wal-a", 1, [("dev-1", 50, 4_000)], [])
    with ledger.write() as txn:
        for seq in range(51, 60):
            txn.put(seq_key("dev-1", seq), struct.pack(">Q", 4_000 + seq), db=ledger._db(b"seq", 0))
    seen = ledger.reader()
    assert all(seen.is_duplicate("dev-1", s, 4_000 + s) for s in range(51, 60)) and seen.is_duplicate("dev-1", 50, 4_000)
    assert not seen.is_duplicate("dev-1", 60, 4_060)
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
    key = idempotency_key("dev-1", "lost-answer")
    request = msgspec.msgpack.encode(RequestRecord(key, SHA_1, b'202{"accepted":3}'))
    await wal.append([encode_frame(KIND_RECORDS, 1, 0, 0, 0, 3, lines), encode_frame(KIND_REQUEST, 0, 0, 0, 0, 0, request)])
    await wal.close()
    ledger = open_ledger(tmp_path / "wal" / "ledger")
    pipeline = Pipeline(settings, slot=slot, sink=LocalLakeSink(tmp_path / "lake"), metrics=GatewayMetrics(), ledger=ledger)
    await pipeline.start()
    seen = ledger.reader()
    assert [seen.is_duplicate("dev-1", s, 1000 + s) for s in range(3)] == [True, True, True]
    seen.close()
    assert ledger.claim_request(key, SHA_1).answer == b'202{"accepted":3}'
    assert ledger.mark(pipeline.wal_id) == 3
    await pipeline.drain(5)
    await pipeline.close()
    ledger.close()


# -- a ledger the owner cannot trust is replaced, never served from ---------------------------


def _ledger_with_an_answer(path) -> tuple[RetryLedger, bytes]:
    ledger = RetryLedger(path, window_secs=600, max_keys=1000)
    ledger.open(owner=True)
    key = idempotency_key("dev-1", "abc")
    ledger.claim_request(key, SHA_1)
    ledger.record("wal-a", 10, [("dev-1", 7, 1000)], [(key, SHA_1, b'202{"accepted":1}')])
    return ledger, key


def _pretend_last_boot(path, *, closed: bool) -> None:
    (path / BOOT_FILE).write_bytes(orjson.dumps({"boot_id": "an-earlier-boot", "closed": closed}))


def _reopened_as_owner(path) -> RetryLedger:
    ledger = RetryLedger(path, window_secs=600, max_keys=1000)
    ledger.open(owner=True)
    return ledger


def test_a_ledger_left_open_before_the_machine_restarted_is_rebuilt_from_its_journal(tmp_path, caplog):
    """What it learned is kept, though the WAL may have deleted the segments that held it."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "ledger"
    ledger, key = _ledger_with_an_answer(path)
    ledger.make_journal_durable()  # as a WAL does before it deletes a segment
    ledger.close()  # as a SIGKILL leaves it: written, never flushed or sealed
    _pretend_last_boot(path, closed=False)
    (path / "data.mdb").write_bytes(b"\xa5" * 8192)  # torn as a power loss may leave it: not read at all
    again = _reopened_as_owner(path)
    assert again.mark("wal-a") == 0, "its marks are gone: the WAL scan records everything the WAL holds again"
    claim = again.claim_request(key, SHA_1)
    assert claim.outcome == "answered" and claim.answer == b'202{"accepted":1}'
    assert again.reader().is_duplicate("dev-1", 7, 1000)
    assert not again.reader().is_duplicate("dev-1", 8, 1000)
    assert "left open before the machine restarted" in caplog.text and "rebuilt from its journal" in caplog.text
    assert orjson.loads((path / BOOT_FILE).read_bytes()) == {"boot_id": current_boot_id(), "closed": False}
    again.close()


def test_a_ledger_rebuilt_without_its_journal_starts_empty(tmp_path):
    path = tmp_path / "ledger"
    ledger, key = _ledger_with_an_answer(path)
    ledger.close()
    for journal_file in (path / "journal").iterdir():
        journal_file.unlink()
    _pretend_last_boot(path, closed=False)
    again = _reopened_as_owner(path)
    assert again.claim_request(key, SHA_1).outcome == "run"
    assert not again.reader().is_duplicate("dev-1", 7, 1000)
    again.close()


def test_a_rebuild_cut_short_starts_over_at_the_next_start(tmp_path, caplog, monkeypatch):
    from gateway.durable import ledger_journal

    path = tmp_path / "ledger"
    ledger, key = _ledger_with_an_answer(path)
    ledger.close()
    _pretend_last_boot(path, closed=False)

    def power_gone_mid_replay(self):
        yield from []
        raise KeyboardInterrupt  # stands for the process's end, mid-rebuild

    cut_short = RetryLedger(path, window_secs=600, max_keys=1000)
    with monkeypatch.context() as m:
        m.setattr(ledger_journal.LedgerJournal, "replay", power_gone_mid_replay)
        with pytest.raises(KeyboardInterrupt):
            cut_short.open(owner=True)
    cut_short.close()
    assert orjson.loads((path / BOOT_FILE).read_bytes())["boot_id"] == "rebuilding"
    again = _reopened_as_owner(path)
    assert "rebuild of the retry ledger was cut short" in caplog.text
    assert again.claim_request(key, SHA_1).outcome == "answered"
    again.close()


def test_the_boot_file_is_rewritten_in_place_so_a_full_disk_cannot_stop_a_start(tmp_path):
    """It was replaced by a new file at every open and seal: on a full disk the owner could not start."""
    path = tmp_path / "ledger"
    ledger, _ = _ledger_with_an_answer(path)
    inode = (path / BOOT_FILE).stat().st_ino
    ledger.seal()
    assert (path / BOOT_FILE).stat().st_ino == inode
    again = _reopened_as_owner(path)
    assert (path / BOOT_FILE).stat().st_ino == inode
    assert orjson.loads((path / BOOT_FILE).read_bytes()) == {"boot_id": current_boot_id(), "closed": False}
    again.close()


def test_a_sealed_ledger_survives_a_machine_restart(tmp_path):
    path = tmp_path / "ledger"
    ledger, key = _ledger_with_an_answer(path)
    ledger.seal()
    assert orjson.loads((path / BOOT_FILE).read_bytes()) == {"boot_id": current_boot_id(), "closed": True}
    _pretend_last_boot(path, closed=True)
    again = _reopened_as_owner(path)
    assert again.mark("wal-a") == 10
    assert again.claim_request(key, SHA_1).outcome == "answered"
    again.close()


def test_a_ledger_left_open_in_this_boot_is_kept(tmp_path):
    path = tmp_path / "ledger"
    ledger, key = _ledger_with_an_answer(path)
    ledger.close()  # a killed process: its writes are in the page cache, whole
    again = _reopened_as_owner(path)
    assert again.claim_request(key, SHA_1).outcome == "answered"
    again.close()


def _damage_every_page_but_the_metas(path) -> None:
    data = path / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.seek(2 * 4096)
        f.write(b"\xa5" * (size - 2 * 4096))


def test_damaged_pages_are_replaced_by_the_owner_and_refused_to_others(tmp_path, caplog):
    path = tmp_path / "ledger"
    ledger, key = _ledger_with_an_answer(path)
    ledger.close()
    _damage_every_page_but_the_metas(path)
    worker = RetryLedger(path, window_secs=600, max_keys=1000)
    with pytest.raises(LedgerError) as refused:
        worker.open()
    assert refused.value.damaged, "a worker never replaces the ledger other processes may have open"
    again = _reopened_as_owner(path)
    assert "retry ledger damaged" in caplog.text
    assert again.claim_request(key, SHA_1).outcome == "answered", "rebuilt from its journal, the answer is kept"
    again.close()


def test_a_truncated_ledger_is_replaced_not_read_past_its_end(tmp_path):
    path = tmp_path / "ledger"
    ledger = RetryLedger(path, window_secs=600, max_keys=100_000)
    ledger.open(owner=True)
    ledger.record("wal-a", 10, [("dev-1", seq, 1000) for seq in range(20_000)], [])
    ledger.close()
    data = path / "data.mdb"
    os.truncate(data, data.stat().st_size // 3)
    # In a child: reading a page past the end of the mapped file would kill the process with SIGBUS.
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            from gateway.durable.retry_ledger import RetryLedger
            ledger = RetryLedger({str(path)!r}, window_secs=600, max_keys=1000)
            ledger.open(owner=True)
            print(ledger.mark("wal-a"), ledger.counts()["seq"])
        """)],
        capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["0", "1"], "no mark, and the journal's one run of 20,000 seqs"


def test_an_entry_that_does_not_decode_counts_as_absent(tmp_path):
    ledger, key = _ledger_with_an_answer(tmp_path / "ledger")
    with ledger.write() as txn:
        txn.put(key, b"\xc1 not msgpack", db=ledger._db(b"request", 0))
    assert ledger.answer_for(key, SHA_1) is None
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.close()


def test_answers_are_stored_deflated_and_come_back_exactly(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    answers = {
        "accepted": b'202{"accepted":300,"rejected":0,"duplicates":0,"ingest_id":"5368e7cb77e1e371151b833e","errors":[]}',
        "invalid": b"422" + orjson.dumps({"error": "invalid_records", "message": "all 500 records are invalid",
                                          "errors": [{"index": i, "field": "ts", "reason": "missing"} for i in range(500)]}),
    }
    for name, answer in answers.items():
        key = idempotency_key("dev-1", name)
        ledger.record("wal-a", 1, [], [(key, SHA_1, answer)])
        with ledger._env.begin() as txn:
            stored = len(txn.get(key, db=ledger._db(b"request", 0)))
        assert stored - 32 < len(answer) / 2, f"{name}: {stored} bytes stored (32 of them the digest) for a {len(answer)}-byte answer"
        assert ledger.claim_request(key, SHA_1).answer == answer
    ledger.close()


def test_an_entry_keyed_by_its_body_keeps_no_second_copy_of_the_digest(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    answer = b'202{"accepted":300,"rejected":0,"duplicates":0,"ingest_id":"5368e7cb77e1e371151b833e","errors":[]}'
    by_body, by_name = body_key("dev-1", SHA_1), idempotency_key("dev-1", "name")
    ledger.record("wal-a", 1, [], [(by_body, SHA_1, answer), (by_name, SHA_1, answer)])
    with ledger._env.begin() as txn:
        sizes = {key: len(txn.get(key, db=ledger._db(b"request", 0))) for key in (by_body, by_name)}
    assert sizes[by_name] - sizes[by_body] >= 32, sizes
    assert ledger.claim_request(by_body, SHA_1).answer == answer == ledger.answer_for(by_body, SHA_1)
    assert ledger.claim_request(by_name, SHA_2).outcome == "conflict"
    ledger.close()


def test_a_key_that_ends_like_a_body_key_still_tells_its_bodies_apart(tmp_path):
    # An Idempotency-Key whose bytes end as a body key of this body does: its entry keeps no digest.
    ledger = open_ledger(tmp_path / "ledger")
    crafted = idempotency_key("dev-1", "x") + b"\0b" + bytes.fromhex(SHA_1)
    assert ledger.claim_request(crafted, SHA_1).outcome == "run"
    ledger.record("wal-a", 1, [], [(crafted, SHA_1, b"202{}")])
    assert ledger.claim_request(crafted, SHA_2).outcome == "conflict" and ledger.answer_for(crafted, SHA_2) is None
    assert ledger.claim_request(crafted, SHA_1).answer == b"202{}"
    ledger.close()


def test_request_entries_written_with_their_digest_still_read(tmp_path):
    from gateway.durable.retry_ledger import RequestEntry, pack_answer
    ledger = open_ledger(tmp_path / "ledger")
    key = body_key("dev-1", SHA_1)
    with ledger.write() as txn:
        entry = RequestEntry(True, bytes.fromhex(SHA_1), answer=pack_answer(b"202{}"))
        txn.put(key, msgspec.msgpack.encode(entry), db=ledger._db(b"request", 0))
    assert ledger.claim_request(key, SHA_1).answer == b"202{}" == ledger.answer_for(key, SHA_1)
    ledger.close()


def test_a_signature_is_remembered_by_its_first_16_bytes(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    signature, other = hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()
    assert ledger.claim_signature(signature, time.time() + 300) and ledger.claim_signature(other, time.time() + 300)
    assert not ledger.claim_signature(signature, time.time() + 300), "a replay"
    with ledger._env.begin() as txn:
        keys = [key for key, _ in txn.cursor(db=ledger._db(b"signature", 0))]
    assert sorted(keys) == sorted([bytes.fromhex(signature)[:16], bytes.fromhex(other)[:16]])
    ledger.close()


def test_a_signature_knows_whether_every_request_claimed_since_it_is_still_held(tmp_path):
    """A replay without an Idempotency-Key may run (once, under its body's key) only while the ledger
    could not have forgotten its request: requests have started at most one generation since."""
    ledger = open_ledger(tmp_path / "ledger", max_keys=2)
    signature = hashlib.sha256(b"signed").hexdigest()
    assert not ledger.holds_every_request_since(signature), "a signature never claimed"
    assert ledger.claim_signature(signature, time.time() + 300)
    held = []
    for i in range(6):  # two requests per generation
        assert ledger.claim_request(body_key("dev-1", hashlib.sha256(b"%d" % i).hexdigest()), hashlib.sha256(b"%d" % i).hexdigest()).outcome == "run"
        held.append(ledger.holds_every_request_since(signature))
    assert held == [True, True, True, True, False, False]
    first = body_key("dev-1", hashlib.sha256(b"0").hexdigest())
    assert not ledger.holds_request(first, hashlib.sha256(b"0").hexdigest()), "the first request is forgotten by then"
    ledger.close()


def test_a_signature_entry_of_an_earlier_version_still_refuses_its_replay(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    signature = hashlib.sha256(b"signed before").hexdigest()
    with ledger.write() as txn:  # as an earlier version wrote it: its expiry alone
        txn.put(bytes.fromhex(signature)[:16], struct.pack(">d", time.time() + 300), db=ledger._db(b"signature", 0))
    assert not ledger.claim_signature(signature, time.time() + 300), "a replay"
    assert not ledger.holds_every_request_since(signature), "nothing says which requests came after it"
    ledger.close()


# -- the same records in two requests at once ----------------------------------------------------


def _span(ledger: RetryLedger, device_id: str, seqs: range):
    """What a request validated now would claim: its seqs' range and the device's stamp it saw."""
    lookup = ledger.reader()
    new = [(device_id, seq, 1000 + seq) for seq in seqs if not lookup.is_duplicate(device_id, seq, 1000 + seq)]
    lookup.close()
    return lookup.spans(new)


def test_a_request_overlapping_a_running_one_waits_and_a_disjoint_one_does_not(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    first, overlapping, disjoint = (idempotency_key("dev-1", k) for k in ("a", "b", "c"))
    first_spans = _span(ledger, "dev-1", range(1, 101))
    assert ledger.claim_request(first, SHA_1, first_spans).outcome == "run"
    assert ledger.claim_request(overlapping, SHA_2, _span(ledger, "dev-1", range(50, 101))).outcome == "overlap"
    assert ledger.claim_request(disjoint, SHA_2, _span(ledger, "dev-1", range(101, 201))).outcome == "run"
    assert ledger.claim_request(idempotency_key("dev-2", "a"), SHA_1, _span(ledger, "dev-2", range(1, 101))).outcome == "run"
    ledger.release_request(first, ["dev-1"])  # it failed: nothing of it landed
    assert ledger.claim_request(overlapping, SHA_2, _span(ledger, "dev-1", range(50, 101))).outcome == "run"
    ledger.close()


def test_a_request_validated_before_its_records_became_durable_elsewhere_is_stale(tmp_path):
    ledger = open_ledger(tmp_path / "ledger")
    first, second = idempotency_key("dev-1", "a"), idempotency_key("dev-1", "b")
    first_spans = _span(ledger, "dev-1", range(1, 101))
    second_spans = _span(ledger, "dev-1", range(50, 151))  # validated while the first was not yet claimed
    assert ledger.claim_request(first, SHA_1, first_spans).outcome == "run"
    ledger.record("wal-a", 5, [("dev-1", seq, 1000 + seq) for seq in range(1, 101)], [(first, SHA_1, b"202{}")],
                  [span_key("dev-1", first)])
    assert ledger.claim_request(second, SHA_2, second_spans).outcome == "stale", "its records 50-100 are duplicates now"
    again = _span(ledger, "dev-1", range(50, 151))
    assert (again[0].lowest, again[0].highest) == (101, 150)
    assert ledger.claim_request(second, SHA_2, again).outcome == "run"
    ledger.close()


def test_the_span_of_a_process_that_died_holds_nothing_back(tmp_path):
    path = tmp_path / "ledger"
    ledger = open_ledger(path)
    proc = other_process(path, """
        lookup = ledger.reader()
        lookup.is_duplicate("dev-1", 1, 1001)
        print(ledger.claim_request(idempotency_key("dev-1", "k"), SHA_1, lookup.spans([("dev-1", 1, 1001), ("dev-1", 100, 1100)])).outcome, flush=True)
        time.sleep(60)
    """)
    try:
        assert proc.stdout.readline().strip() == "run"
        assert ledger.claim_request(idempotency_key("dev-1", "x"), SHA_2, _span(ledger, "dev-1", range(10, 20))).outcome == "overlap"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert ledger.claim_request(idempotency_key("dev-1", "x"), SHA_2, _span(ledger, "dev-1", range(10, 20))).outcome == "run"
    ledger.close()


def test_the_map_holds_every_generation_the_configured_limits_allow(tmp_path, monkeypatch):
    # With a 1 GiB map whatever the limits, raising dedup_max_keys for a longer seq window (as
    # docs/device-api.md advises) filled the map: every request got 503 (MDB_MAP_FULL). The floor is
    # lowered here so that limits a test can fill quickly show it.
    from gateway.durable import retry_ledger
    from gateway.durable.ledger_catch_up import ledger_for

    monkeypatch.setattr(retry_ledger, "MIN_MAP_BYTES", 1 << 20)
    settings = load_settings(write_config(tmp_path, wal={"dir": str(tmp_path / "wal")},
                                          limits={"dedup_max_keys": 20_000}, auth={"replay_cache_max_entries": 2_000}), environ={})
    ledger = ledger_for(settings)
    ledger.open(owner=True)
    answer = b'202{"accepted":1,"rejected":0,"duplicates":0,"ingest_id":"5368e7cb77e1e371151b833e","errors":[]}'
    for generation in range(5):  # past three: the oldest is emptied and its pages reused
        digests = [hashlib.sha256(b"%d-%d" % (generation, i)).hexdigest() for i in range(20_000)]
        ledger.record(
            "wal-a", generation,
            [("dev-%d" % (i % 50), generation * 20_000 + i, 1000) for i in range(20_000)],
            [(body_key("dev-%d" % (i % 50), digest), digest, answer) for i, digest in enumerate(digests)],
        )
        for i in range(2_000):
            assert ledger.claim_signature(hashlib.sha256(b"%d" % (generation * 2_000 + i)).hexdigest(), time.time() + 600)
    assert ledger.counts()["seq"] >= 20_000
    ledger.close()


def test_a_dead_writers_claim_holds_until_its_wal_is_caught_up(tmp_path):
    # Killed between its fsync and the ledger's record, a worker leaves its request durable in its
    # WAL and only claimed here: a retry on another worker ran it again and landed it twice.
    path = tmp_path / "ledger"
    ledger = open_ledger(path)
    ledger.writes("wal-b")
    claim_in_a_killed_process(path, """
        ledger.writes("wal-a")
        print(ledger.claim_request(idempotency_key("dev-1", "k"), SHA_1).outcome, flush=True)
    """)
    key = idempotency_key("dev-1", "k")
    assert ledger.claim_request(key, SHA_1).outcome == "running", "its WAL may hold the request, unrecorded"
    ledger.mark_writer("wal-a")  # what a restarted worker (or the supervisor) does once it caught up
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.close()


def test_a_dead_writers_span_holds_until_its_wal_is_caught_up(tmp_path):
    # The same race for records re-batched into a new body: the dead worker's records of seq 1-100
    # may be durable in its WAL, so a request holding any of them must wait for the catch-up.
    path = tmp_path / "ledger"
    ledger = open_ledger(path)
    ledger.writes("wal-b")
    claim_in_a_killed_process(path, """
        ledger.writes("wal-a")
        lookup = ledger.reader()
        lookup.is_duplicate("dev-1", 1, 1001)
        print(ledger.claim_request(idempotency_key("dev-1", "k"), SHA_1, lookup.spans([("dev-1", 1, 1001), ("dev-1", 100, 1100)])).outcome, flush=True)
    """)
    rebatched = idempotency_key("dev-1", "x")
    assert ledger.claim_request(rebatched, SHA_2, _span(ledger, "dev-1", range(50, 150))).outcome == "overlap"
    assert ledger.claim_request(idempotency_key("dev-1", "y"), SHA_2, _span(ledger, "dev-1", range(101, 150))).outcome == "run"
    ledger.mark_writer("wal-a")  # caught up: whatever of seq 1-100 was durable is in the ledger now
    assert ledger.claim_request(rebatched, SHA_2, _span(ledger, "dev-1", range(50, 101))).outcome == "run"
    ledger.close()


class _FullDiskClock:
    """A clock that moves only when slept on, and a count of the tries the full disk refused."""

    def __init__(self, refusals: int, error: Exception) -> None:
        self.now, self.tries, self.refusals, self.error = 0.0, 0, refusals, error

    def sleep(self, secs: float) -> None:
        self.now += secs

    def open_and_catch_up(self, settings, base_id, ledger, stop_requested) -> None:
        self.tries += 1
        if self.tries <= self.refusals:
            raise self.error


def _no_room() -> Exception:
    try:
        raise lmdb.DiskError("ledger: No space left on device")
    except lmdb.Error as exc:
        try:
            raise LedgerError.from_lmdb("opened", exc) from None  # as RetryLedger.open raises it
        except LedgerError as wrapped:
            return wrapped


def test_a_start_on_a_full_disk_tries_again_until_there_is_room(tmp_path, monkeypatch, caplog):
    from gateway.durable import ledger_catch_up

    disk = _FullDiskClock(refusals=5, error=_no_room())
    monkeypatch.setattr(ledger_catch_up, "open_and_catch_up", disk.open_and_catch_up)
    ledger = RetryLedger(tmp_path / "ledger", window_secs=600, max_keys=1000)
    told = []
    ledger_catch_up.open_and_catch_up_when_room(
        None, "gw", ledger, lambda: False, waiting_for_room=told.append, sleep=disk.sleep, clock=lambda: disk.now
    )
    assert told == [True, False], "the listener says waiting_for_room from the first refusal until it goes on"
    assert disk.tries == 6
    assert disk.now == pytest.approx(1 + 2 + 4 + 8 + 8, abs=0.5), "1, 2, 4, then every 8 s"
    assert caplog.text.count("the WAL's disk is full") == 1, "said once, not at every try"
    assert "room on the WAL's disk again" in caplog.text


def test_a_stop_while_a_start_waits_for_room_ends_it_and_another_error_is_not_waited_on(tmp_path, monkeypatch):
    from gateway.durable import ledger_catch_up
    from gateway.early_signals import StoppedWhileStarting

    ledger = RetryLedger(tmp_path / "ledger", window_secs=600, max_keys=1000)
    disk = _FullDiskClock(refusals=100, error=OSError(28, "No space left on device"))
    monkeypatch.setattr(ledger_catch_up, "open_and_catch_up", disk.open_and_catch_up)
    with pytest.raises(StoppedWhileStarting):
        ledger_catch_up.open_and_catch_up_when_room(None, "gw", ledger, lambda: disk.now > 5, sleep=disk.sleep, clock=lambda: disk.now)
    assert 5 < disk.now < 6, "a stop is seen within a tenth of a second"
    broken = _FullDiskClock(refusals=1, error=LedgerError("the retry ledger cannot be written: Permission denied"))
    monkeypatch.setattr(ledger_catch_up, "open_and_catch_up", broken.open_and_catch_up)
    with pytest.raises(LedgerError, match="Permission denied"):
        ledger_catch_up.open_and_catch_up_when_room(None, "gw", ledger, lambda: False, sleep=broken.sleep, clock=lambda: broken.now)
    assert broken.tries == 1


def test_a_full_disk_at_open_is_not_taken_for_damage(tmp_path, monkeypatch, caplog):
    """It was: the owner discarded the ledger as damaged, logged so, and failed again creating a new one."""
    ledger = RetryLedger(tmp_path / "ledger", window_secs=600, max_keys=1000)

    def no_room():
        raise lmdb.DiskError("No space left on device")

    monkeypatch.setattr(ledger, "_open_env", no_room)
    with pytest.raises(LedgerError, match="No space left on device") as raised:
        ledger.open(owner=True)
    assert not raised.value.damaged
    assert "retry ledger damaged" not in caplog.text


async def test_a_stop_while_the_ledger_catches_up_ends_the_start_and_leaves_the_mark_for_the_next(tmp_path):
    from gateway.durable.ledger_catch_up import catch_up
    from gateway.early_signals import StoppedWhileStarting

    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=1 << 20, max_total_bytes=1 << 30)
    await wal.start()
    lines = b"".join(orjson.dumps({"device_id": "dev-1", "event_time_ms": 1_700_000_000_000, "seq": s}) + b"\n" for s in range(100))
    await wal.append([encode_frame(KIND_RECORDS, 490_000, 0, 0, 0, 100, lines)])
    ledger = RetryLedger(tmp_path / "ledger", window_secs=600, max_keys=1000)
    ledger.open(owner=True)
    try:
        with pytest.raises(StoppedWhileStarting, match="caught up with"):
            catch_up(wal, ledger, "wal-a", tmp_path / "wal", stop_requested=lambda: True)
        assert ledger.mark("wal-a") == 0, "nothing recorded: the next start reads the WAL from where it was"
        catch_up(wal, ledger, "wal-a", tmp_path / "wal", stop_requested=lambda: False)
        assert ledger.mark("wal-a") == wal.durable_lsn
    finally:
        ledger.close()
        await wal.close()
