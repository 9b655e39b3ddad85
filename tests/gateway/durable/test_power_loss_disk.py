"""The power-loss filesystem the crash tests use: it keeps what was made durable and loses, at random,
only what was not (tests/fixtures/power_loss_disk.py; needs root and libfuse 2)."""

from __future__ import annotations

import os

import pytest

from connectors.durable_files import fsync_directory, write_atomically
from tests.fixtures.power_loss_disk import PAGE, PowerLossDisk


@pytest.fixture
def disk(tmp_path):
    with PowerLossDisk(tmp_path / "power-loss-disk") as mounted:
        yield mounted


def write(path, data: bytes, *, at: int | None = None, sync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if at is not None else os.O_APPEND), 0o644)
    try:
        os.pwrite(fd, data, at) if at is not None else os.write(fd, data)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def test_what_was_fsynced_survives_every_power_loss_and_what_was_not_may_not(disk):
    root = disk.mountpoint
    synced = bytes(range(256)) * 40  # 10 KiB: two whole pages and part of a third
    outcomes = set()
    for seed in range(12):
        write(root / "log", synced, sync=True)
        fsync_directory(root)
        write(root / "log", b"\xff" * (3 * PAGE))  # rewrites the third page's tail, adds three more
        write(root / "log", b"\xee" * 100, at=0)  # over synced bytes, never synced
        write(root / "new", b"x" * 100, sync=True)  # its content synced, its name never
        summary = disk.lose_power(seed)
        data = (root / "log").read_bytes()
        assert data[100:len(synced)] == synced[100:], f"seed {seed}: fsynced bytes changed: {summary}"
        assert data[:100] in (synced[:100], b"\xee" * 100), f"seed {seed}: a page is neither old nor new"
        assert len(data) in (len(synced), len(synced) + 3 * PAGE)
        # A tail page that did not reach the disk reads as zeros, never as anything else.
        assert set(data[len(synced):]) <= {0xFF, 0}
        outcomes.add((data[:100] == synced[:100], len(data), (root / "new").exists()))
        (root / "log").unlink(missing_ok=True)
        (root / "new").unlink(missing_ok=True)
        fsync_directory(root)
    # Twelve draws: each unsynced change was lost in some and kept in others.
    assert {o[0] for o in outcomes} == {True, False}
    assert {o[1] for o in outcomes} == {len(synced), len(synced) + 3 * PAGE}
    assert {o[2] for o in outcomes} == {True, False}


def test_an_atomic_replacement_is_the_old_file_or_the_new_one_after_a_power_loss(disk):
    state = disk.mountpoint / "state"
    seen = set()
    for seed in range(10):
        write_atomically(state, b"old" * 2000)
        write_atomically(state, b"new" * 3000, fsync=seed % 2 == 0)  # without fsync: anything but torn
        disk.lose_power(seed)
        data = state.read_bytes()
        if seed % 2 == 0:
            assert data == b"new" * 3000, f"seed {seed}: a replacement made durable was lost"
        else:
            # The rename may reach the disk before the data: the new name with missing pages, as on a
            # real disk; that is why write_atomically fsyncs before it renames.
            assert data == b"old" * 2000 or set(data) <= set(b"new\0"), f"seed {seed}: {data[:20]!r}"
            seen.add(data == b"old" * 2000)
        leftovers = [p.name for p in disk.mountpoint.iterdir() if p.name != "state"]
        assert all(name.endswith(".tmp") for name in leftovers)
        for name in leftovers:
            (disk.mountpoint / name).unlink()
    assert seen == {True, False}, "without fsync the replacement must sometimes be lost"


def test_a_removal_not_made_durable_can_come_back(disk):
    root = disk.mountpoint
    came_back = []
    for seed in range(8):
        write(root / "segment", b"s" * 5000, sync=True)
        fsync_directory(root)
        (root / "segment").unlink()
        disk.lose_power(seed)
        came_back.append((root / "segment").exists())
        if came_back[-1]:
            assert (root / "segment").read_bytes() == b"s" * 5000
            (root / "segment").unlink()
        fsync_directory(root)
        (root / "gone").write_bytes(b"g")
        fsync_directory(root)
        (root / "gone").unlink()
        fsync_directory(root)
        disk.lose_power(seed)
        assert not (root / "gone").exists(), "a removal made durable came back"
    assert set(came_back) == {True, False}
