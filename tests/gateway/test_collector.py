"""The garbage collector stays off the request path: records are not tracked, start-up state is frozen."""

from __future__ import annotations

import gc

import msgspec

from gateway.ingest.records import Record, RecordOfAnyId
from gateway.server import start_gateway
from gateway.settings import load_settings
from tests.gateway.conftest import make_env, ndjson, record


def test_decoded_records_are_not_tracked_by_the_collector() -> None:
    line = ndjson({**record(seq=1), "tags": {"site": "a"}}).strip()
    for schema in (Record, RecordOfAnyId):
        decoded = msgspec.json.decode(line, type=schema)
        assert decoded.tags == {"site": "a"}
        assert not gc.is_tracked(decoded), schema.__name__


async def test_a_started_gateway_has_frozen_what_start_up_built(tmp_path) -> None:
    gc.unfreeze()
    env = make_env(tmp_path)
    running = await start_gateway(load_settings(env.config, environ={}))
    try:
        # The gateway's own long-lived state is among it: full collections no longer walk it.
        assert gc.get_freeze_count() > 0
        assert not any(o is running.gateway for o in gc.get_objects())
    finally:
        await running.stop()
        gc.unfreeze()
