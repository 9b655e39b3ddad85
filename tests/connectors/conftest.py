"""Fixtures for the S3 / Glue / EventBridge connector tests: buckets, proxies, an event bus feeding a queue."""

from __future__ import annotations

import json
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
async def landed_queue(moto_endpoint: str) -> AsyncIterator[tuple[str, Any]]:
    """A fresh event bus whose every event goes to an SQS queue; yields (bus name, sqs client)."""
    session = get_session()
    bus = f"lake-{uuid.uuid4().hex[:8]}"
    async with (
        session.create_client("events", endpoint_url=moto_endpoint, region_name="us-east-1") as events,
        session.create_client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1") as sqs,
    ):
        queue_url = (await sqs.create_queue(QueueName=bus))["QueueUrl"]
        attributes = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        arn = attributes["Attributes"]["QueueArn"]
        await events.create_event_bus(Name=bus)
        await events.put_rule(Name="landed", EventBusName=bus, EventPattern=json.dumps({"source": ["edge-gateway"]}))
        await events.put_targets(Rule="landed", EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn}])
        sqs.queue_url = queue_url  # type: ignore[attr-defined]
        yield bus, sqs


@pytest.fixture
async def glue_client(moto_endpoint: str) -> AsyncIterator[Any]:
    async with get_session().create_client("glue", endpoint_url=moto_endpoint, region_name="us-east-1") as client:
        yield client
