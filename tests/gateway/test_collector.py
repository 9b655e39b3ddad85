"""The garbage collector stays off the request path: records are not tracked, start-up state is frozen."""

from __future__ import annotations

import gc

import msgspec
import numpy as np

from gateway.ingest.records import CuratedRequest, CuratedSource, Record, RecordOfAnyId
from gateway.lake.curated import decode_frames
from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, ndjson, record


def test_decoded_records_are_not_tracked_by_the_collector() -> None:
    line = ndjson({**record(seq=1), "tags": {"site": "a"}}).strip()
    for schema in (Record, RecordOfAnyId):
        decoded = msgspec.json.decode(line, type=schema)
        assert decoded.tags == {"site": "a"}
        assert not gc.is_tracked(decoded), schema.__name__


def test_the_curated_zones_decoded_lines_are_not_tracked_by_the_collector() -> None:
    """The curated zone decodes thousands of raw lines per read; tracked, collections cost more than decoding."""
    raw_line = (
        b'{"ingest_id":"i1","received_at":"2026-01-01T00:00:00.000Z","gateway_id":"gw","availability_zone":"az",'
        b'"device":{"site":"s1"},"index":0,"device_id":"d1","event_time_ms":5,"seq":3,'
        b'"record":{"device_id":"d1","ts":5,"metrics":{"t":1.5},"tags":{"fw":"1"}}}'
    )
    source = msgspec.json.decode(raw_line, type=CuratedSource)
    request = msgspec.json.decode(raw_line, type=CuratedRequest)
    assert (source.seq, source.record.metrics, source.record.tags, request.device) == (3, {"t": 1.5}, {"fw": "1"}, {"site": "s1"})
    for decoded in (source, source.record, request):
        assert not gc.is_tracked(decoded), type(decoded).__name__
    decoded = decode_frames([raw_line], ["t"], np.zeros(1, np.float32), False)
    assert decoded.table.column("metrics").to_pylist() == [[("t", 1.5)]]


async def test_a_started_gateway_has_frozen_what_start_up_built(tmp_path) -> None:
    gc.unfreeze()
    gc.disable()  # as a worker imports its stack (gateway/__main__.py)
    env = make_env(tmp_path)
    running = await start_gateway(load_settings(env.config, environ={}))
    try:
        # The gateway's own long-lived state is among it: full collections no longer walk it.
        assert gc.get_freeze_count() > 0
        assert not any(o is running.gateway for o in gc.get_objects())
        assert gc.isenabled()  # and what it builds from now on is collected as usual
    finally:
        gc.enable()
        await running.stop()
        gc.unfreeze()
