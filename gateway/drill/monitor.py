"""What the drill watches while it runs: every instance's WAL figures, HAProxy's view, the lake.

Every ``sample_interval_secs`` it scrapes ``/metrics`` of each running instance (WAL backlog,
bytes, capacity, oldest unlanded age) and HAProxy's stats page (each instance's check state). The
samples feed the blocking alarms during the drill and the timeline in the report.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.drill.devices import Clock
from gateway.drill.fleet import Fleet
from gateway.drill.lake import LakeIndex

WATCHED = {
    "edge_gateway_wal_backlog_bytes": "backlog_bytes",
    "edge_gateway_wal_bytes": "wal_bytes",
    "edge_gateway_wal_capacity_bytes": "capacity_bytes",
    "edge_gateway_wal_oldest_unlanded_age_seconds": "oldest_age_secs",
}


@dataclass(slots=True)
class InstanceSample:
    running: bool
    lb_state: str  # HAProxy's check state, "" when unknown
    redispatched: int = 0  # requests HAProxy sent elsewhere after a refused connection (cumulative)
    scraped: bool = False
    backlog_bytes: float = 0.0  # summed over the zones (consumers)
    wal_bytes: float = 0.0
    capacity_bytes: float = 0.0
    oldest_age_secs: float = 0.0  # the oldest over the zones
    backlog_by_zone: dict[str, float] = field(default_factory=dict)

    @property
    def wal_fill_percent(self) -> float:
        return 100.0 * self.wal_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


@dataclass(slots=True)
class Sample:
    t: float
    instances: dict[str, InstanceSample]


def parse_metrics(text: str) -> dict[str, Any]:
    """The watched gauges of a Prometheus text page; per-zone values are kept by their ``consumer`` label."""
    out: dict[str, Any] = {"backlog_by_zone": {}}
    for line in text.splitlines():
        if not line.startswith("edge_gateway_wal_"):
            continue
        head, _, value_text = line.rpartition(" ")
        name, _, labels = head.partition("{")
        field_name = WATCHED.get(name)
        if field_name is None:
            continue
        try:
            value = float(value_text)
        except ValueError:
            continue
        consumer = labels.partition('consumer="')[2].partition('"')[0]
        if field_name == "backlog_bytes" and consumer:
            out["backlog_by_zone"][consumer] = value
        if field_name == "oldest_age_secs":
            out[field_name] = max(out.get(field_name, 0.0), value)
        else:
            out[field_name] = out.get(field_name, 0.0) + value
    return out


class Monitor:
    def __init__(self, fleet: Fleet, lake: LakeIndex, clock: Clock, interval: float) -> None:
        self.fleet = fleet
        self.lake = lake
        self.clock = clock
        self.interval = interval
        self.samples: list[Sample] = []

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as http:
            lake_task = asyncio.create_task(self._watch_lake(stop))
            try:
                while not stop.is_set():
                    await self.sample(http)
                    try:
                        await asyncio.wait_for(stop.wait(), self.interval)
                    except TimeoutError:
                        pass
            finally:
                await lake_task

    async def sample(self, http: aiohttp.ClientSession) -> Sample:
        t = self.clock.now()
        stats, scraped = await asyncio.gather(
            self.fleet.balancer.server_stats(http),
            asyncio.gather(*(self._scrape(http, zone) for zone in self.fleet.zones)),
        )
        instances = {}
        for zone, figures in zip(self.fleet.zones, scraped):
            row = stats.get(zone, {})
            sample = InstanceSample(self.fleet[zone].running(), row.get("status", ""), _int(row.get("wredis")))
            if figures is not None:
                sample.scraped = True
                for name, value in figures.items():
                    setattr(sample, name, value)
            instances[zone] = sample
        result = Sample(t, instances)
        self.samples.append(result)
        return result

    async def _scrape(self, http: aiohttp.ClientSession, zone: str) -> dict[str, Any] | None:
        instance = self.fleet[zone]
        if not instance.running():
            return None
        try:
            async with http.get(instance.ops_url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status != 200:
                    return None
                return parse_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            return None

    async def _watch_lake(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.lake.refresh)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
