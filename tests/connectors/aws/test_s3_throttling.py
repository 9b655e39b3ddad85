"""S3Sink under SlowDown, timeouts and an S3 that goes away, through the fault proxy in front of moto."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from connectors.aws.s3 import S3Sink
from connectors.errors import TransientError
from connectors.retry import RetrySettings
from tests.connectors.helpers import GATEWAY_ID, lake_object, read_back, settings
from tests.fixtures.fault_proxy import FaultProxy, SeenRequest
from tests.fixtures.moto_server import free_port

# Generous per-test guard: a hang fails the test instead of the suite's global timeout.
GUARD_SECS = 20


class Recorder:
    """An injected sleep that records each backoff and the concurrency limit at that moment."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.limits: list[int] = []
        self.sink: S3Sink | None = None

    async def sleep(self, secs: float) -> None:
        self.sleeps.append(secs)
        if self.sink is not None:
            self.limits.append(self.sink.concurrency_limit)
        await asyncio.sleep(secs)


async def test_slow_down_is_retried_with_backoff_and_cuts_concurrency(
    bucket: str, s3_client: Any, proxy: FaultProxy
) -> None:
    recorder = Recorder()
    retry = RetrySettings(initial_interval_secs=0.02, max_interval_secs=0.1, max_elapsed_secs=5.0)
    s = settings(proxy.url, bucket, retry=retry, initial_concurrency=4)
    sink = S3Sink(s, gateway_id=GATEWAY_ID, sleep=recorder.sleep)
    recorder.sink = sink
    await sink.start()
    proxy.throttle_next = 3
    obj = lake_object(b"payload" * 100)
    try:
        async with asyncio.timeout(GUARD_SECS):
            await sink.put_object(obj)
    finally:
        await sink.close()

    assert proxy.throttled == 3
    assert (sink.stats.throttles, sink.stats.retries) == (3, 3)
    # Full jitter: each wait lies in [0, min(max_interval, initial * 2**n)].
    ceilings = [0.02, 0.04, 0.08]
    assert all(0 <= slept <= ceiling for slept, ceiling in zip(recorder.sleeps, ceilings, strict=True))
    # Every SlowDown was its own round of calls, so each one cut the limit.
    assert recorder.limits == [3, 2, 1]
    assert sink.concurrency_limit < 4
    assert await read_back(s3_client, bucket, f"lake/{obj.key}") == obj.body


async def test_throttled_concurrent_load_lands_everything(bucket: str, s3_client: Any, proxy: FaultProxy) -> None:
    limits_after_throttle: list[int] = []
    sink: S3Sink

    def observe(operation: str, outcome: str, secs: float) -> None:
        if outcome == "throttled":
            limits_after_throttle.append(sink.concurrency_limit)

    retry = RetrySettings(initial_interval_secs=0.01, max_interval_secs=0.05, max_elapsed_secs=10.0)
    s = settings(proxy.url, bucket, retry=retry, initial_concurrency=8)
    sink = S3Sink(s, gateway_id=GATEWAY_ID, on_request=observe)
    await sink.start()
    proxy.throttle_fraction = 0.3
    objects = [lake_object(f"object {i}".encode() * 50, first=i * 10, last=i * 10 + 9) for i in range(24)]
    try:
        async with asyncio.timeout(GUARD_SECS):
            await asyncio.gather(*(sink.put_object(obj) for obj in objects))
    finally:
        await sink.close()

    assert proxy.throttled > 0
    assert sink.stats.throttles == proxy.throttled
    assert min(limits_after_throttle) < 8
    listing = await s3_client.list_objects_v2(Bucket=bucket)
    assert listing["KeyCount"] == len(objects)


async def test_read_timeouts_are_transient_and_cut_concurrency(bucket: str, proxy: FaultProxy) -> None:
    def hold_puts(request: SeenRequest) -> bool:
        return request.method == "PUT"

    retry = RetrySettings(initial_interval_secs=0.01, max_interval_secs=0.02, max_elapsed_secs=0.5)
    sink = S3Sink(settings(proxy.url, bucket, retry=retry, read_timeout_secs=0.2), gateway_id=GATEWAY_ID)
    await sink.start()
    proxy.delay_when, proxy.delay_secs = hold_puts, 5.0
    try:
        async with asyncio.timeout(GUARD_SECS):
            with pytest.raises(TransientError):
                await sink.put_object(lake_object(b"slow"))
    finally:
        await sink.close()
    assert sink.stats.timeouts >= 1
    assert sink.concurrency_limit < 4


async def test_unreachable_s3_gives_transient_error_after_the_deadline(bucket: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    retry = RetrySettings(initial_interval_secs=0.01, max_interval_secs=0.05, max_elapsed_secs=0.5)
    sink = S3Sink(settings(dead, bucket, retry=retry, start_timeout_secs=0.2), gateway_id=GATEWAY_ID)
    async with asyncio.timeout(GUARD_SECS):
        await sink.start()  # start-up survives an unreachable S3: records wait in the WAL
        try:
            with pytest.raises(TransientError, match="gave up after"):
                await sink.put_object(lake_object(b"x"))
        finally:
            await sink.close()
    assert sink.stats.retries > 0
    assert sink.stats.objects_landed == 0


async def test_upload_resumes_when_s3_comes_back(bucket: str, s3_client: Any, proxy: FaultProxy) -> None:
    retry = RetrySettings(initial_interval_secs=0.02, max_interval_secs=0.1, max_elapsed_secs=10.0)
    sink = S3Sink(settings(proxy.url, bucket, retry=retry), gateway_id=GATEWAY_ID)
    await sink.start()
    await proxy.pause()
    obj = lake_object(b"held back" * 10)
    try:
        async with asyncio.timeout(GUARD_SECS):
            upload = asyncio.create_task(sink.put_object(obj))
            while sink.stats.retries < 2:  # it is failing against the absent server
                await asyncio.sleep(0.01)
            await proxy.resume()
            await upload
    finally:
        await sink.close()
    assert await read_back(s3_client, bucket, f"lake/{obj.key}") == obj.body
