"""Fixtures for the S3 / Glue / EventBridge connector tests: a session moto server, buckets, proxies."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

# The fixture plugins live in tests/fixtures; until the top-level conftest registers them with
# `pytest_plugins`, make the repository root importable so `tests.fixtures` resolves under both
# `pytest` and `python -m pytest`.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import batching  # noqa: E402

if not hasattr(batching, "AdaptiveConcurrency"):
    # The limiter exists in batching.concurrency but the package does not export it yet.
    from batching.concurrency import AdaptiveConcurrency as _AdaptiveConcurrency

    batching.AdaptiveConcurrency = _AdaptiveConcurrency  # type: ignore[attr-defined]

from aiobotocore.session import get_session  # noqa: E402

from tests.fixtures.fault_proxy import FaultProxy  # noqa: E402
from tests.fixtures.moto_server import aws_credentials, moto_endpoint  # noqa: E402,F401


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
