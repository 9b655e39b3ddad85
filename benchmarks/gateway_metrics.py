"""Reading a running gateway's own figures from its ``/metrics`` (the ops listener)."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

WAL_FSYNC = "edge_gateway_wal_fsync_duration_seconds"
T = TypeVar("T")


async def scrape(ops_url: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(ops_url + "/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()


async def with_wal_fsync_p99_ms(ops_url: str, measurement: Awaitable[T]) -> tuple[T, float]:
    """``measurement``'s result, and the p99 of the WAL's fsyncs while it ran (ms, a bucket bound)."""
    before = await scrape(ops_url)
    result = await measurement
    return result, histogram_quantile(before, await scrape(ops_url), WAL_FSYNC, 0.99) * 1000


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` (labels, value), whichever family it belongs to."""
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def histogram_quantile(before: str, after: str, name: str, q: float) -> float:
    """The ``q`` quantile of what a histogram observed between two scrapes: the upper bound of the
    bucket it falls in (seconds; NaN when nothing was observed), summed over workers and labels."""
    def buckets(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for labels, value in samples(text, name + "_bucket"):
            le = float(labels["le"])
            out[le] = out.get(le, 0.0) + value
        return out

    start, end = buckets(before), buckets(after)
    delta = sorted((le, end[le] - start.get(le, 0.0)) for le in end)
    total = delta[-1][1] if delta else 0.0
    if total <= 0:
        return math.nan
    for le, cumulative in delta:
        if cumulative >= q * total:
            return le
    return math.inf
