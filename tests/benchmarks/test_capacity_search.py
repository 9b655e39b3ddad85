"""The inference scenarios' capacity search: one stall of a shared machine does not zero it, a slow endpoint does."""

from __future__ import annotations

import asyncio

import numpy as np

from benchmarks.scenario import Collector
from benchmarks.scenarios_inference import SLO_S, _search_capacity

ROWS = np.zeros((64, 4), dtype=np.float32)


def _endpoint(service_secs: float, stall_secs: float = 0.0):
    """An endpoint taking ``service_secs`` per call, and three deadlines per call during its first ``stall_secs``."""
    loop_time = asyncio.get_running_loop().time
    began = loop_time()

    async def dispatch(endpoint: str, items: list[np.ndarray]):
        await asyncio.sleep(SLO_S * 3 if loop_time() - began < stall_secs else service_secs)
        return [0.0] * len(items)

    return dispatch


def test_a_stall_in_one_probe_does_not_give_up_its_rate() -> None:
    # The first probe (half of 2,000 rec/s) meets a 0.3 s stall; its second try holds, so the search goes up from there.
    async def search() -> float:
        return await _search_capacity(_endpoint(0.001, stall_secs=0.3), "fake", ROWS, [0], 2000.0, True, seed=1)

    found = asyncio.run(search())
    assert found >= 1000


def test_an_endpoint_slower_than_the_deadline_has_no_capacity() -> None:
    async def search() -> float:
        return await _search_capacity(_endpoint(SLO_S * 2), "fake", ROWS, [0], 2000.0, True, seed=1)

    found = asyncio.run(search())
    assert found == 0


def test_a_caution_is_listed_with_the_warnings() -> None:
    out = Collector("inference-x", "x")
    out.caution("no rate held")
    assert out.warnings() == ["inference-x: no rate held"]
