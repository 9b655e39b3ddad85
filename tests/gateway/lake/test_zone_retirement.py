"""A zone turned off lands what it owes, then pins nothing; turned on again it lands nothing twice."""

from __future__ import annotations

import asyncio

from connectors.local_lake import LocalLakeSink
from gateway.lake.landing import RETIRED, owes_records
from tests.gateway.lake.test_landing import frame, landed_seqs, lander, open_wal


async def _land_some(tmp_path, wal, sink, seqs: range) -> None:
    on = lander(tmp_path, wal, sink)
    await on.start()
    await wal.append([frame(seqs)])
    assert await on.drain(5)
    await on.close()  # this life ends: its reader's files with it


async def _retire(tmp_path, wal, sink) -> None:
    """A start with the zone turned off, run until it has landed what it owed."""
    off = lander(tmp_path, wal, sink, retiring=True)
    await off.start()
    await asyncio.wait_for(off._task, 5)
    await off.close()


async def _stalled(frames):  # a life cut short (SIGKILL) before it lands anything
    await asyncio.Event().wait()
    return frames


async def test_a_retiring_zone_lands_below_until_only_then_releases_everything(tmp_path):
    wal = await open_wal(tmp_path)
    sink = LocalLakeSink(tmp_path / "lake")
    await _land_some(tmp_path, wal, sink, range(0, 5))
    await wal.append([frame(range(5, 10))])  # acknowledged while on, never landed (the crash)
    assert owes_records(tmp_path / "state", "raw")
    off = lander(tmp_path, wal, sink, retiring=True)
    await off.start()
    await wal.append([frame(range(10, 15))])  # acknowledged while off: not this zone's
    await asyncio.wait_for(off._task, 5)
    assert landed_seqs(tmp_path / "lake") == list(range(10))
    assert wal._consumers["raw"] == RETIRED  # it holds no segment back any more
    assert off.unlanded() == (0, 0.0)
    assert not owes_records(tmp_path / "state", "raw")
    await off.close()
    await wal.close()


async def test_a_zone_off_across_restarts_keeps_where_it_stopped_owing(tmp_path):
    wal = await open_wal(tmp_path)
    sink = LocalLakeSink(tmp_path / "lake")
    await _land_some(tmp_path, wal, sink, range(0, 3))
    await wal.append([frame(range(3, 6))])
    first = lander(tmp_path, wal, sink, _stalled, retiring=True)
    await first.start()
    await wal.append([frame(range(6, 9))])  # acknowledged while off
    await first.close()
    await _retire(tmp_path, wal, sink)
    assert landed_seqs(tmp_path / "lake") == list(range(6)), "the second start moved where the zone stops owing"
    await wal.close()


async def test_a_zone_turned_on_again_resumes_where_it_stopped_owing(tmp_path):
    wal = await open_wal(tmp_path)
    sink = LocalLakeSink(tmp_path / "lake")
    await _land_some(tmp_path, wal, sink, range(0, 4))
    await _retire(tmp_path, wal, sink)
    await wal.append([frame(range(4, 8))])  # acknowledged while off, still in the WAL
    on = lander(tmp_path, wal, sink)
    await on.start()
    await wal.append([frame(range(8, 12))])
    assert await on.drain(5)
    await on.close()
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(12)), "landed twice, or skipped what the WAL still held"
    assert owes_records(tmp_path / "state", "raw"), "a zone that is on owes what it has not landed"


async def test_a_zone_turned_on_again_owes_from_its_first_start(tmp_path):
    """On, off, on (killed before it landed anything), off again: what was acknowledged during the
    short second life is still owed."""
    wal = await open_wal(tmp_path)
    sink = LocalLakeSink(tmp_path / "lake")
    await _land_some(tmp_path, wal, sink, range(0, 2))
    await _retire(tmp_path, wal, sink)
    on = lander(tmp_path, wal, sink, _stalled)
    await on.start()
    await wal.append([frame(range(2, 5))])
    await on.close()
    assert owes_records(tmp_path / "state", "raw")
    await _retire(tmp_path, wal, sink)
    await wal.close()
    assert landed_seqs(tmp_path / "lake") == list(range(5))
