"""The WAL under a full disk, a failed fsync, a crash inside a request and a damaged frame.

Disk-full tests run on a real small filesystem (tmpfs, mounted as root), never a simulated error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess

import pytest

from gateway.durable import wal as wal_module
from connectors.durable_files import ReservedStateFile
from gateway.durable.wal import KIND_RECORDS, WalFailed, WalNoSpace, WriteAheadLog, encode_frame
from tests.fixtures.failing_disk import FailingDisk


def frame(n: int, tag: bytes = b"r", pad: int = 0) -> bytes:
    payload = b"".join(b'{"v":"%s%d","pad":"%s"}\n' % (tag, i, b"x" * pad) for i in range(n))
    return encode_frame(KIND_RECORDS, 1, 1000, 10, 20, n, payload)


async def open_wal(path, **kw) -> WriteAheadLog:
    wal = WriteAheadLog(path, segment_bytes=kw.pop("segment_bytes", 1 << 20), max_total_bytes=kw.pop("max_total_bytes", 1 << 30), **kw)
    await wal.start()
    return wal


def fail_next_fdatasync(monkeypatch):
    """The next fdatasync fails with EIO in this process only; returns the real one (``failing_disk`` fails them for real)."""
    real_fdatasync = os.fdatasync
    calls = []

    def failing_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_fdatasync(fd)

    monkeypatch.setattr(wal_module.os, "fdatasync", failing_once)
    return real_fdatasync


async def assert_cut_back_and_resumed(wal: WriteAheadLog, path, monkeypatch, real_fdatasync) -> None:
    """After a failed fsync: the log holds what was durable before it ("kept"), appends resume, and a
    reopened log holds exactly the kept request and the one after."""
    assert wal.next_lsn == 2, "the log was cut back to the last good fsync"
    assert await wal.append([frame(1, b"later")]) == 3
    await wal.close()
    monkeypatch.setattr(wal_module.os, "fdatasync", real_fdatasync)
    wal = await open_wal(path)
    assert [f.payload[:12] for f in read_all(wal)] == [b'{"v":"kept0"', b'{"v":"later0']
    await wal.close()


def read_all(wal: WriteAheadLog) -> list:
    reader = wal.reader(0)
    frames = []
    while batch := reader.read(1 << 20):
        frames.extend(batch)
    reader.close()
    return frames


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB filesystem (tmpfs) and a way to fill it to the last bytes."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def failing_disk(tmp_path):
    """A FUSE filesystem whose fsyncs fail with EIO on command (tests/fixtures/failing_disk.py; needs root)."""
    with FailingDisk(tmp_path / "disk") as disk:
        yield disk


async def appends_taken_again(wal: WriteAheadLog) -> None:
    """Within 5 s, as the log's next recovery retry comes at most 2 s after a disk heals."""
    for _ in range(100):
        if wal.refusal() is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"appends stayed refused after the disk healed: {wal.failure}")


def fill(directory, leave_bytes: int = 0) -> os.PathLike:
    """Fill the filesystem with a ballast file, leaving about ``leave_bytes`` free."""
    ballast = directory / "ballast"
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    with open(ballast, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave_bytes))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return ballast


async def test_a_full_disk_rolls_the_append_back_and_ingest_resumes_when_space_returns(small_fs):
    wal = await open_wal(small_fs / "wal", segment_bytes=512 * 1024, max_total_bytes=64 << 20)
    acked = []
    ballast = fill(small_fs, leave_bytes=40 * 1024)
    with pytest.raises(WalNoSpace):
        for i in range(1000):
            f = frame(20, b"a%d-" % i, pad=50)
            await wal.append([f, frame(1, b"b%d-" % i)])  # a request of two frames
            acked.append(i)
    assert acked, "some appends fit before the disk filled"
    segment = next((small_fs / "wal").glob("*.wal"))
    assert segment.stat().st_size == wal.total_bytes, "no partial frame is left on disk"
    assert wal.refusal() == "no_space"
    with pytest.raises(WalNoSpace):
        await wal.append([frame(1)])  # refused at once while the disk stays full
    ballast.unlink()
    assert wal.refusal() is None
    end = await wal.append([frame(3, b"after")])
    await wal.close()
    wal = await open_wal(small_fs / "wal", segment_bytes=512 * 1024, max_total_bytes=64 << 20)
    assert wal.next_lsn == end == len(acked) * 21 + 3
    assert [f.count for f in read_all(wal)] == [20, 1] * len(acked) + [3]
    await wal.close()


async def test_a_disk_out_of_inodes_refuses_a_new_segment_says_so_and_resumes_when_one_frees(tmp_path, caplog):
    """Bytes to spare but no inode for the next segment: the request that needed one is refused, an
    error says why, and later requests are refused at once (readiness off) until an inode frees.
    (Before, nothing was logged and every request tried and failed again: the free bytes read as
    space returned.)"""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=64", "tmpfs", str(mount)], check=True)
    try:
        wal = await open_wal(mount / "wal", segment_bytes=8 * 1024, max_total_bytes=4 << 20)
        await wal.append([frame(80, pad=100)])  # past segment_bytes: the next append rotates
        taken = []
        with contextlib.suppress(OSError):
            while True:
                taken.append(mount / f"ballast-{len(taken)}")
                taken[-1].touch()
        with caplog.at_level(logging.ERROR), pytest.raises(WalNoSpace):
            await wal.append([frame(1)])
        assert "no room for a new segment" in caplog.text
        assert wal.refusal() == "no_space"
        taken[0].unlink()
        assert wal.refusal() is None
        assert await wal.append([frame(2)]) == 82
        await wal.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_while_rotating_keeps_the_live_segment(small_fs):
    wal = await open_wal(small_fs / "wal", segment_bytes=8 * 1024, max_total_bytes=64 << 20)
    end = await wal.append([frame(80, pad=100)])  # past segment_bytes: the next append rotates
    ballast = fill(small_fs)
    for _ in range(3):  # repeated attempts must not retire the live descriptor twice (EBADF)
        with pytest.raises(WalNoSpace):
            await wal.append([frame(1)])
    ballast.unlink()
    end = await wal.append([frame(2)])
    assert end == 82 and len(list((small_fs / "wal").glob("*.wal"))) == 2
    await wal.close()
    wal = await open_wal(small_fs / "wal", segment_bytes=8 * 1024, max_total_bytes=64 << 20)
    assert [f.count for f in read_all(wal)] == [80, 2]
    await wal.close()


async def test_state_writes_go_into_reserved_space_on_a_full_disk(small_fs):
    state = ReservedStateFile(small_fs / "raw.state", slot_bytes=16 * 1024)
    assert state.open() is None
    fill(small_fs)
    for generation in range(5):
        state.write(b'{"position": %d}' % generation)  # in place: needs no new blocks
    state.close()
    state = ReservedStateFile(small_fs / "raw.state", slot_bytes=16 * 1024)
    assert state.open() == b'{"position": 4}'
    state.close()


async def test_a_request_cut_short_by_a_crash_is_removed_whole(tmp_path):
    wal = await open_wal(tmp_path)
    await wal.append([frame(2, b"first")])
    before = wal.total_bytes
    await wal.append([frame(3, b"x"), frame(4, b"y"), frame(5, b"z")])
    await wal.close()
    segment = next(tmp_path.glob("*.wal"))
    os.truncate(segment, segment.stat().st_size - 10)  # the last frame of the request is torn
    wal = await open_wal(tmp_path)
    assert wal.next_lsn == 2 and wal.total_bytes == before, "none of the torn request survives"
    assert [f.count for f in read_all(wal)] == [2]
    await wal.close()


async def test_a_failed_fsync_refuses_what_it_covered_and_is_never_retried(tmp_path, monkeypatch, caplog):
    wal = await open_wal(tmp_path)
    await wal.append([frame(2, b"kept")])
    real_fdatasync = fail_next_fdatasync(monkeypatch)
    with caplog.at_level(logging.CRITICAL), pytest.raises(WalFailed):
        await wal.append([frame(5, b"lost")])
    assert "fsync failed" in caplog.text
    await assert_cut_back_and_resumed(wal, tmp_path, monkeypatch, real_fdatasync)


async def test_a_failed_fsync_at_rotation_refuses_every_request_written_since_the_last_good_one(tmp_path, monkeypatch, caplog):
    # Two requests written together: the second needs a new segment, and fsyncing the full one fails.
    wal = await open_wal(tmp_path, segment_bytes=300)
    await wal.append([frame(2, b"kept")])
    real_fdatasync = fail_next_fdatasync(monkeypatch)
    with caplog.at_level(logging.CRITICAL):
        results = await asyncio.gather(wal.append([frame(3, b"fills", pad=300)]), wal.append([frame(1, b"rotates")]), return_exceptions=True)
    assert all(isinstance(r, WalFailed) for r in results), f"a request covered by the failed fsync was acknowledged: {results}"
    await assert_cut_back_and_resumed(wal, tmp_path, monkeypatch, real_fdatasync)


async def test_a_disk_that_fails_every_fsync_for_a_while_is_recovered_from_when_it_heals(failing_disk, caplog):
    """fsync fails, and so does every fsync of the recovery after it (the disk stays bad): appends
    are refused, the log tries its recovery again by itself, and once the disk works appends resume
    without a restart; what was durable before is kept and nothing the failed fsyncs covered is."""
    path = failing_disk.mountpoint / "wal"
    wal = await open_wal(path)
    assert await wal.append([frame(2, b"kept")]) == 2
    failing_disk.fail_always()
    with pytest.raises(WalFailed, match="fsync failed"):
        await wal.append([frame(1, b"lost")])
    assert "recovery after a failure failed" in caplog.text
    await asyncio.sleep(1.5)  # the first retry, still on a failing disk
    assert wal.refusal() == "failed"
    with pytest.raises(WalFailed, match="recovering"):
        await wal.append([frame(1, b"refused")])
    failing_disk.heal()
    await appends_taken_again(wal)
    assert "appends resume" in caplog.text
    assert await wal.append([frame(1, b"later")]) == 3
    await wal.close()
    wal = await open_wal(path)
    assert [f.payload[:12] for f in read_all(wal)] == [b'{"v":"kept0"', b'{"v":"later0']
    assert failing_disk.failed >= 3, "the failed fsync, and at least two recoveries"
    await wal.close()


async def test_a_cut_back_that_failed_half_way_leaves_no_later_segment_behind(failing_disk):
    """The fsync after a rotation fails, so the new segment holds nothing durable and must go; the
    disk also fails to delete it. The recovery that succeeds later deletes it: left on disk, its
    refused records would be read back as durable at the next start."""
    path = failing_disk.mountpoint / "wal"
    wal = await open_wal(path, segment_bytes=4096)
    end = await wal.append([frame(40, b"kept", pad=100)])  # past 4 KiB: the next append starts a segment
    new_segment = f"{end:020d}.wal"
    failing_disk.fail_always(new_segment, call="fdatasync")  # its header's fsync works, the commit's fails
    failing_disk.fail_always(new_segment, call="unlink")
    with pytest.raises(WalFailed, match="fsync failed"):
        await wal.append([frame(1, b"lost")])
    assert wal.refusal() == "failed", "the segment could not be deleted: the cut is not done"
    failing_disk.heal()
    await appends_taken_again(wal)
    assert not (path / new_segment).exists(), "the segment past the last good fsync is still there"
    await wal.close()
    wal = await open_wal(path, segment_bytes=4096)
    assert [f.payload[:12] for f in read_all(wal)] == [b'{"v":"kept0"'], "only what was durable is read back"
    await wal.close()


async def test_a_reader_never_serves_bytes_the_log_cut_back_and_wrote_again(tmp_path):
    """Bytes past the durable end (a request written, its fsync not yet done or failed) can be in a
    reader's hands when it reads; if the log is then cut back and the same place written again, the
    reader must read the new frames, not what it saw there before (same LSNs, valid checksums)."""
    wal = await open_wal(tmp_path / "wal")
    start = wal.first_lsn
    await wal.append([frame(1, b"kept")])
    segment = next((tmp_path / "wal").glob("*.wal"))
    durable_size = segment.stat().st_size
    with open(segment, "ab") as f:  # a request written after the last good fsync
        f.write(frame(1, b"refused"))
    reader = wal.reader(start)
    assert [f.payload[:12] for f in reader.read(1 << 20)] == [b'{"v":"kept0"'], "only what is durable"
    os.truncate(segment, durable_size)  # the cut back after its fsync failed
    await wal.append([frame(1, b"later")])
    assert [f.payload[:13] for f in reader.read(1 << 20)] == [b'{"v":"later0"'], "the frame written after the cut"
    reader.close()
    await wal.close()


async def test_a_wals_zones_wait_for_room_for_their_state_and_then_start(small_fs, caplog):
    """A WAL directory's zones allocate their state files whole when first started (a worker added):
    on a full disk that raised, and the lake process died with it, landing no other WAL meanwhile."""
    from connectors.local_lake import LocalLakeSink
    from gateway.durable.wal_layout import WalSlot
    from gateway.lake.zones import Zones
    from gateway.ops.metrics import GatewayMetrics
    from gateway.settings import Settings
    from tests.gateway.durable.test_wal_follower import follower_of, owned_wal

    wal = await owned_wal(small_fs / "w2")
    await wal.append([frame(3)])
    slot = WalSlot(small_fs / "w2", "gw-w2", "w2")
    zones = Zones(Settings(), wal=follower_of(small_fs / "w2"), slot=slot, sink=LocalLakeSink(small_fs.parent / "lake"), metrics=GatewayMetrics(), scorer=None)
    zones.wal.refresh()
    ballast = fill(small_fs)
    starting = asyncio.create_task(zones.start())
    await asyncio.sleep(1.5)
    if starting.done():
        starting.result()
    assert not starting.done(), "the zones neither wait nor fail while the disk is full"
    assert "start once their files have room" in caplog.text
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) < 200, "each try leaves its descriptor open"
    ballast.unlink()
    await asyncio.wait_for(starting, 10)
    assert [f.name for f in (small_fs / "w2" / "consumers").glob("*.state")] != []
    await zones.close()
    await wal.close()
