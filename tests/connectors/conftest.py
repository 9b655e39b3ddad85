"""Fixtures for the S3 / Glue / EventBridge connector tests: buckets, proxies (the event bus feeding a queue, ``landed_queue``, is in tests/fixtures/moto_server.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiobotocore.session import get_session

from tests.fixtures.fault_proxy import FaultProxy


@pytest.fixture
async def s3_client(moto_endpoint: str) -> AsyncIterator[Any]:
    """A plain aiobotocore client on moto, for arranging and asserting (not the code under test)."""
    async with get_session().create_client("s3", endpoint_url=moto_endpoint, region_name="us-east-1") as client:
        yield client


@pytest.fixture
async def bucket(s3_client: Any) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"lake-{uuid.uuid4().hex[:12]}"
    await s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
async def proxy(moto_endpoint: str) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def glue_client(moto_endpoint: str) -> AsyncIterator[Any]:
    async with get_session().create_client("glue", endpoint_url=moto_endpoint, region_name="us-east-1") as client:
        yield client
