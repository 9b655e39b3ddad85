"""One truthful view of an instance whatever ``listen.workers`` is.

With several workers the device port reaches whichever worker the kernel picks, so a scrape of
one worker's registry would show a random slice of the instance. Instead each supervised worker
also listens on a Unix socket in a private runtime directory the supervisor creates
(``EDGE_GATEWAY_RUNTIME_DIR``, mode 0700), and whichever worker answers ``/metrics`` asks its
siblings there and merges their series, each with a ``worker`` label. A sibling that does not
answer in time (restarting) shows as ``edge_gateway_worker_up{worker="N"} 0`` instead of
silently vanishing from the sums.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.settings import lake_process_lands
from gateway.supervisor import LAKE, RUNTIME_ENV

log = logging.getLogger(__name__)

PEER_TIMEOUT_SECS = 2.0
_GATEWAY = web.AppKey("peer_gateway", object)


def runtime_dir() -> Path | None:
    value = os.environ.get(RUNTIME_ENV)
    return Path(value) if value else None


def peer_socket(runtime: Path, index: int) -> Path:
    return runtime / f"w{index}.sock"


def lake_socket(runtime: Path) -> Path:
    """Where the lake process (gateway/lake/lake_process.py) answers for its metrics."""
    return runtime / "lake.sock"


class Cluster:
    """The workers of this instance as one worker sees them."""

    def __init__(self, gateway, runtime: Path | None) -> None:
        self.gateway = gateway
        self.runtime = runtime
        self.index = gateway.worker_index
        self.workers = gateway.settings.listen.workers if runtime is not None else 1
        self.lake = runtime is not None and lake_process_lands(gateway.settings)

    @property
    def single(self) -> bool:
        return self.workers <= 1

    def others(self) -> list[int]:
        return [i for i in range(self.workers) if i != self.index]

    def _socket(self, index: int | str) -> Path:
        return lake_socket(self.runtime) if index == LAKE else peer_socket(self.runtime, index)

    async def get(self, index: int | str, path: str) -> bytes | None:
        """A sibling's answer to ``GET path`` on its local socket, or None when it does not answer."""
        connector = aiohttp.UnixConnector(path=str(self._socket(index)))
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_SECS)) as s:
                async with s.get(f"http://worker{index}{path}") as resp:
                    if resp.status != 200:
                        return None
                    return await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("a sibling worker did not answer", extra={"worker": index, "path": path, "error": repr(exc)})
            return None

    async def stream(self, index: int | str, path: str) -> AsyncIterator[bytes]:
        """A sibling's streamed answer, line by line, until it ends or the caller stops."""
        connector = aiohttp.UnixConnector(path=str(self._socket(index)))
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=PEER_TIMEOUT_SECS)) as s:
                async with s.get(f"http://worker{index}{path}") as resp:
                    if resp.status != 200:
                        return
                    async for line in resp.content:
                        yield line
        except (aiohttp.ClientError, OSError, TimeoutError):
            return

    async def metrics(self) -> bytes:
        """The instance's exposition: this worker's alone, or every worker's with a ``worker`` label."""
        own = generate_latest(self.gateway.metrics.registry)
        if self.single:
            return own
        peers = [*self.others(), *([LAKE] if self.lake else [])]
        answers = await asyncio.gather(*(self.get(i, "/metrics") for i in peers))
        parts = {self.index: own, **dict(zip(peers, answers, strict=True))}
        return merge_expositions(parts)


def merge_expositions(parts: dict[int | str, bytes | None]) -> bytes:
    """Merge per-worker expositions into one, each sample labelled with its worker (the lake process: ``lake``)."""
    families: dict[str, Metric] = {}
    up = Metric("edge_gateway_worker_up", "1 when the worker answered this scrape, 0 when it did not (restarting)", "gauge")
    for worker, text in sorted(parts.items(), key=lambda part: str(part[0])):
        up.samples.append(Sample("edge_gateway_worker_up", {"worker": str(worker)}, 0.0 if text is None else 1.0, None, None))
        if text is None:
            continue
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.samples.append(Sample(s.name, {**s.labels, "worker": str(worker)}, s.value, s.timestamp, s.exemplar))
    return generate_latest(_Families([up, *families.values()]))


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self):
        return self._families


# -- the worker's side: its local socket ---------------------------------------------------------


async def _local_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_GATEWAY].metrics.registry)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def start_peer_listener(gateway) -> web.AppRunner | None:
    """In a supervised worker: listen on ``<runtime>/w<N>.sock`` for siblings; the caller cleans up."""
    from gateway.ops.status.page import tap_handler  # page.py builds on this module

    runtime = runtime_dir()
    if runtime is None or gateway.settings.listen.workers <= 1:
        return None
    app = web.Application()
    app[_GATEWAY] = gateway
    app.router.add_get("/metrics", _local_metrics)
    app.router.add_get("/tap", tap_handler(_GATEWAY, whole_instance=False))
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    path = peer_socket(runtime, gateway.worker_index)
    path.unlink(missing_ok=True)  # left by this worker's previous life
    await web.UnixSite(runner, str(path)).start()
    return runner
