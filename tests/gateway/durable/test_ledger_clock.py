"""The retry ledger's clock: what the ledger remembers, what it takes for abandoned and the rate-limit
buckets kept beside it age and refill by the time that really passed, whichever way the wall clock
is stepped (an NTP correction, ``date -s``)."""

from __future__ import annotations

import os
import struct
import time

import pytest

from gateway.durable import ledger_clock
from gateway.durable.ledger_clock import Instant, claim_is_fresh, seconds_since_boot
from gateway.durable.retry_ledger import CLAIM_STALE_SECS, RetryLedger, idempotency_key
from gateway.edge.ratelimit_store import Limits
from tests.fixtures.stepped_clock import MovableClocks

SHA_1 = "11" * 32
BOOT_A, BOOT_B = b"a" * 16, b"b" * 16


@pytest.fixture
def clocks(monkeypatch) -> MovableClocks:
    fake = MovableClocks()
    monkeypatch.setattr(ledger_clock, "time", fake)
    return fake


def test_the_time_between_two_instants_of_one_boot_is_what_both_clocks_agree_on():
    start = Instant(wall_ms=1_000_000, boot_ms=50_000, boot=BOOT_A)
    assert Instant(1_005_000, 55_000, BOOT_A).least_ms_since(start) == 5_000
    assert Instant(1_005_000 + 3_600_000, 55_000, BOOT_A).least_ms_since(start) == 5_000, "the wall clock stepped an hour forward"
    assert Instant(1_005_000 - 3_600_000, 55_000, BOOT_A).least_ms_since(start) < 0, "stepped back: not aged at all"
    assert Instant(1_005_000, 1_000, BOOT_B).least_ms_since(start) == 5_000, "another boot: only the wall clock can tell"
    assert Instant(1_005_000, 55_000, b"").least_ms_since(Instant(1_000_000, 50_000, b"")) == 5_000, "boot unknown"


def test_the_time_that_really_passed_follows_the_boots_clock_whatever_the_wall_clock_did():
    start = Instant(wall_ms=1_000_000, boot_ms=50_000, boot=BOOT_A)
    assert Instant(1_005_000 - 3_600_000, 55_000, BOOT_A).real_ms_since(start) == 5_000, "stepped back an hour"
    assert Instant(1_005_000 + 3_600_000, 55_000, BOOT_A).real_ms_since(start) == 5_000, "stepped forward an hour"
    assert Instant(1_005_000, 1_000, BOOT_B).real_ms_since(start) == 5_000, "another boot: the wall clock"
    assert Instant(900_000, 1_000, BOOT_B).real_ms_since(start) == 0, "another boot, the wall clock behind: nothing"


def test_a_rate_limit_bucket_refills_by_real_time_through_steps_of_the_wall_clock():
    limits = Limits(records_per_sec=10.0, burst_records=100.0, bytes_per_sec=1_000.0, burst_bytes=10_000.0, max_entries=10)
    start = Instant(wall_ms=1_000_000, boot_ms=50_000, boot=BOOT_A)
    raw = struct.pack(">dd", 0.0, 0.0) + start.pack()  # a bucket left empty at ``start``
    assert limits.refill(raw, Instant(1_002_000 - 3_600_000, 52_000, BOOT_A)) == (20.0, 2_000.0), "two seconds, clock stepped back"
    assert limits.refill(raw, Instant(1_002_000 + 3_600_000, 52_000, BOOT_A)) == (20.0, 2_000.0), "two seconds, clock stepped forward"
    assert limits.refill(b"\0" * 24, start) == (100.0, 10_000.0), "an earlier version's entry: a full bucket"


def test_instants_round_trip_and_those_of_earlier_ledgers_read_as_wall_clock_only():
    now = Instant.now()
    assert Instant.unpack(now.pack()) == now
    assert Instant.unpack((1_234_567).to_bytes(8, "big")) == Instant(1_234_567, 0, b"")


def test_a_claim_is_fresh_until_it_is_stale_and_a_claim_from_ahead_of_now_is_an_earlier_boots():
    now = seconds_since_boot()
    assert claim_is_fresh(now - 5, CLAIM_STALE_SECS)
    assert not claim_is_fresh(now - int(CLAIM_STALE_SECS) - 1, CLAIM_STALE_SECS)
    assert not claim_is_fresh(now + 3_600, CLAIM_STALE_SECS)
    assert not claim_is_fresh(int(time.time()), CLAIM_STALE_SECS), "stamped in wall seconds by an earlier version"


def _ledger(path, window_secs: int = 10) -> RetryLedger:
    ledger = RetryLedger(path, window_secs=window_secs, max_keys=1000)
    ledger.open()
    return ledger


def _answered(ledger: RetryLedger, key: bytes) -> bool:
    claim = ledger.claim_request(key, SHA_1)
    if claim.outcome == "run":
        ledger.release_request(key)
    return claim.outcome == "answered"


def _turn(ledger: RetryLedger, n: int) -> None:
    """Other requests: each one a chance for a generation to end."""
    key = idempotency_key("dev-other", f"k{n}")
    ledger.claim_request(key, SHA_1)
    ledger.record("wal-a", n, [("dev-other", n, 1)], [(key, SHA_1, b"202{}")])


def test_steps_of_the_wall_clock_forget_no_request_and_no_seq(tmp_path, clocks):
    ledger = _ledger(tmp_path / "ledger")
    key = idempotency_key("dev-1", "first")
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.record("wal-a", 1, [("dev-1", 7, 1000)], [(key, SHA_1, b"202{}")])
    for n, step in enumerate((3_600, 7_200, -5 * 3_600, 86_400), start=2):
        clocks.step_wall(step)
        _turn(ledger, n)
        _turn(ledger, n + 10)
        seen = ledger.reader()
        assert seen.is_duplicate("dev-1", 7, 1000), f"a seq forgotten after a step of {step:+d} s"
        seen.close()
        assert _answered(ledger, key), f"a request forgotten after a step of {step:+d} s"
    ledger.close()


def test_time_that_really_passed_still_ends_generations(tmp_path, clocks):
    ledger = _ledger(tmp_path / "ledger")
    key = idempotency_key("dev-1", "first")
    ledger.claim_request(key, SHA_1)
    ledger.record("wal-a", 1, [("dev-1", 7, 1000)], [(key, SHA_1, b"202{}")])
    for n in (2, 3):  # two windows later the generation it was in has been emptied
        clocks.let_pass(11)
        _turn(ledger, n)
    seen = ledger.reader()
    assert not seen.is_duplicate("dev-1", 7, 1000)
    seen.close()
    assert not _answered(ledger, key)
    ledger.close()


def test_a_running_claim_is_not_taken_for_abandoned_when_the_wall_clock_steps_forward(tmp_path, clocks):
    ledger = _ledger(tmp_path / "ledger")
    key = idempotency_key("dev-1", "slow")
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.pid = os.getpid() + 1_000_000  # as another worker: the claim's owner (this process) is alive
    clocks.step_wall(3_600)
    assert ledger.claim_request(key, SHA_1).outcome == "running"
    clocks.let_pass(CLAIM_STALE_SECS + 1)  # a claim held this long is a stuck request: a retry may run
    assert ledger.claim_request(key, SHA_1).outcome == "run"
    ledger.close()
