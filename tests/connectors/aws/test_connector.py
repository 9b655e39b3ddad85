"""``AwsConnector``, the base of the four AWS connectors, against moto's server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import botocore.exceptions as bce
import pytest

from connectors.aws.connector import AwsConnector
from connectors.aws.settings import AwsClientSettings
from connectors.errors import PermanentError, TransientError
from connectors.retry import RetrySettings
from tests.connectors.helpers import FAST_RETRY
from tests.fixtures.moto_server import free_port


class Probe(AwsConnector):
    """The smallest connector: S3 requests, each try counted."""

    service = "s3"

    def __init__(self, settings: AwsClientSettings) -> None:
        super().__init__(settings)
        self.tries = 0

    async def start(self) -> None:
        await self._open_client()

    async def run(self, request: Callable[[Any], Awaitable[Any]]) -> Any:
        async def counted() -> Any:
            self.tries += 1
            return await request(self._client)

        return await self._call("Probe", counted)


def client_settings(endpoint_url: str, **overrides: Any) -> AwsClientSettings:
    values: dict[str, Any] = {"endpoint_url": endpoint_url, "region": "us-east-1", "retry": FAST_RETRY, **overrides}
    return AwsClientSettings(**values)


@pytest.fixture
async def probe(moto_endpoint: str) -> AsyncIterator[Probe]:
    connector = Probe(client_settings(moto_endpoint))
    await connector.start()
    yield connector
    await connector.close()


async def test_a_permanent_failure_is_translated_once_with_its_cause(probe: Probe, moto_endpoint: str) -> None:
    with pytest.raises(PermanentError) as caught:
        await probe.run(lambda client: client.head_bucket(Bucket="no-such-bucket"))

    assert probe.tries == 1
    assert caught.value.endpoint == moto_endpoint
    assert isinstance(caught.value.__cause__, bce.ClientError)


async def test_an_unreachable_endpoint_is_retried_until_the_budget_then_transient() -> None:
    retry = RetrySettings(initial_interval_secs=0.01, max_interval_secs=0.02, max_elapsed_secs=0.3)
    connector = Probe(client_settings(f"http://127.0.0.1:{free_port()}", connect_timeout_secs=0.5, retry=retry))
    await connector.start()
    try:
        with pytest.raises(TransientError, match="gave up after"):
            await connector.run(lambda client: client.list_buckets())
    finally:
        await connector.close()
    assert connector.tries > 1


async def test_a_connector_error_raised_by_the_request_passes_through_and_transient_ones_are_retried(
    probe: Probe, bucket: str
) -> None:
    failures = [TransientError("checksum mismatch", endpoint="s3")]

    async def flaky(client: Any) -> Any:
        if failures:
            raise failures.pop()
        return await client.head_bucket(Bucket=bucket)

    await probe.run(flaky)
    assert probe.tries == 2


async def test_a_foreign_exception_is_a_bug_and_is_neither_translated_nor_retried(probe: Probe) -> None:
    async def broken(client: Any) -> Any:
        raise KeyError("not a vendor error")

    with pytest.raises(KeyError):
        await probe.run(broken)
    assert probe.tries == 1


async def test_close_then_start_opens_a_new_client(probe: Probe, bucket: str) -> None:
    await probe.close()
    await probe.close()  # closing twice is harmless
    await probe.start()

    await probe.run(lambda client: client.head_bucket(Bucket=bucket))
