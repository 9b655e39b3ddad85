"""The retry ledger's journal (gateway/durable/ledger_journal.py): what the ledger learned, kept
through a power loss for as long as the ledger itself would remember it."""

from __future__ import annotations

import logging
import os
import time

import orjson

from gateway.durable import ledger_journal
from gateway.durable.ledger_journal import LedgerJournal
from gateway.durable.retry_ledger import BOOT_FILE, RetryLedger, idempotency_key
from tests.fixtures.power_loss_disk import PowerLossDisk


def _entries(n: int, tag: str = "k") -> list[tuple[bytes, bytes]]:
    return [(f"{tag}-{i}".encode(), os.urandom(24)) for i in range(n)]


def test_frames_replay_in_the_order_appended_up_to_a_torn_tail(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    journal = LedgerJournal(tmp_path / "journal", window_secs=600, max_bytes=64 << 20)
    appended = [(_entries(3, f"s{i}"), _entries(i % 2, f"r{i}")) for i in range(5)]
    for seqs, requests in appended:
        journal.append(seqs, requests)
    journal.close()
    assert list(LedgerJournal(tmp_path / "journal", window_secs=600, max_bytes=64 << 20).replay()) == appended
    (path,) = (tmp_path / "journal").iterdir()
    whole = path.read_bytes()
    path.write_bytes(whole[:-5] + bytes(4096))  # the last frame's end and a page that never reached the disk
    assert list(journal.replay()) == appended[:-1]
    assert "torn or damaged frame ends a file" in caplog.text


def test_a_frame_written_in_part_is_cut_off_and_later_frames_replay(tmp_path, monkeypatch, caplog):
    journal = LedgerJournal(tmp_path / "journal", window_secs=600, max_bytes=64 << 20)
    first, lost, last = (_entries(4, "a"), []), (_entries(4, "b"), []), (_entries(4, "c"), [])
    journal.append(*first)
    real_write = os.write
    monkeypatch.setattr(ledger_journal.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))  # a disk that filled mid-write
    journal.append(*lost)  # does not raise: the records are durable in the WAL and acknowledged anyway
    monkeypatch.setattr(ledger_journal.os, "write", real_write)
    journal.append(*last)
    journal.close()
    assert list(journal.replay()) == [first, last]
    assert "retry ledger journal not written" in caplog.text and "written again" in caplog.text


def test_files_rotate_and_the_oldest_go_past_the_window_or_over_the_budget(tmp_path):
    directory = tmp_path / "journal"
    journal = LedgerJournal(directory, window_secs=600, max_bytes=8 << 20)  # files of 1 MiB
    for _ in range(12):
        journal.append(_entries(1, "x") * 1, [])
        journal.append([(b"k" * 16, os.urandom(1 << 20))], [])  # one frame fills a file
    files = sorted(directory.iterdir())
    assert 2 <= len(files) and sum(f.stat().st_size for f in files) <= 8 << 20 + (2 << 20)
    survivors = set(files)
    old = time.time() - 3 * 600
    os.utime(files[0], (old, old))  # last written three windows ago
    journal.append([(b"k" * 16, os.urandom(1 << 20))], [])
    assert files[0] not in set(directory.iterdir())
    assert survivors - {files[0]} <= set(directory.iterdir()) | survivors
    journal.close()


def _ledger(path) -> RetryLedger:
    ledger = RetryLedger(path, window_secs=600, max_keys=1000)
    ledger.open(owner=True)
    return ledger


def test_what_the_ledger_learned_before_a_segment_was_deleted_survives_any_power_loss(tmp_path):
    """On a disk that loses, at random, what was not fsynced: the entries recorded before
    ``make_journal_durable`` (a WAL's deletion of a segment) are always found after the rebuild;
    those after it only sometimes (they are still in the WAL then: its scan finds them)."""
    kept_later = set()
    with PowerLossDisk(tmp_path / "disk") as disk:
        for seed in range(8):
            path = disk.mountpoint / f"ledger-{seed}"
            ledger = _ledger(path)
            key = idempotency_key("dev-1", f"req-{seed}")
            ledger.claim_request(key, "ab" * 32)
            ledger.record("wal-a", 10, [("dev-1", s, 1000 + s) for s in range(1, 51)], [(key, "ab" * 32, b'202{"accepted":50}')])
            ledger.make_journal_durable()
            ledger.record("wal-a", 20, [("dev-1", s, 1000 + s) for s in range(51, 101)], [])
            ledger.close()  # every process gone at once, as the power takes them
            disk.lose_power(seed)
            (path / BOOT_FILE).write_bytes(orjson.dumps({"boot_id": "an-earlier-boot", "closed": False}))
            again = _ledger(path)
            lookup = again.reader()
            missing = [s for s in range(1, 51) if not lookup.is_duplicate("dev-1", s, 1000 + s)]
            assert not missing, f"seed {seed}: records learned before the deletion were forgotten: {missing}"
            assert again.claim_request(key, "ab" * 32).outcome == "answered"
            kept_later.add(lookup.is_duplicate("dev-1", 100, 1100))
            lookup.close()
            again.close()
    assert kept_later == {True, False}, "the unsynced appends survived every power loss or none: the test reached nothing"


def test_a_file_deleted_by_another_process_is_not_written_again(tmp_path):
    """Another process's clean-up may drop a file this one still holds open: appends go to a new one."""
    journal = LedgerJournal(tmp_path / "journal", window_secs=600, max_bytes=64 << 20)
    first = (_entries(2, "a"), [])
    journal.append(*first)
    (dropped,) = (tmp_path / "journal").iterdir()
    dropped.unlink()
    later = (_entries(2, "b"), [])
    journal.append(*later)
    journal.close()
    assert list(journal.replay()) == [later]
