"""``AwsConnector``: the base of the S3 sink, the Secrets Manager source, the Glue catalog and the
EventBridge publisher.

Each of them used to open and close its own client and wrap its own requests in its own
translate-and-retry closure; the four copies drifted apart in small ways. This class owns that
part once:

- the aiobotocore session and the client's life: ``_open_client()`` builds it from the shared
  ``AwsClientSettings`` (timeouts, region, endpoint, botocore's retries off), ``close()`` ends it;
- the one gate every request passes: ``_call()`` runs a request under the connector's
  ``RetryPolicy``, and each try goes through ``_attempt()``, which turns vendor exceptions into
  ``connectors.errors`` kinds (``connectors.aws.translate``) and lets anything else (a bug) through.

A subclass names its botocore ``service`` and writes only its own requests. The S3 sink overrides
``_attempt()`` to hold an adaptive-concurrency permit and count each try.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from connectors.aws import translate
from connectors.aws.client import build_session, client_config, create_client
from connectors.aws.settings import AwsClientSettings
from connectors.errors import ConnectorError, TransientError
from connectors.retry import RetryPolicy, Sleep

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra, imported where a client is made (connectors/aws/client.py)
    from aiobotocore.session import AioSession

log = logging.getLogger(__name__)

T = TypeVar("T")
Request = Callable[[], Awaitable[T]]


class AwsConnector:
    """A connector that talks to one AWS service through one aiobotocore client."""

    # botocore's name of the service ("s3", "secretsmanager", "glue", "events"); also the endpoint
    # named in errors when the settings leave endpoint_url empty.
    service: ClassVar[str]

    def __init__(
        self,
        settings: AwsClientSettings,
        *,
        session: AioSession | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client_settings = settings
        self._session = session or build_session()
        self._retry = RetryPolicy(settings.retry, sleep=sleep, rng=rng, clock=clock)
        self._endpoint = settings.endpoint_url or self.service
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def _open_client(self, **config: Any) -> None:
        """Open the client unless it is open; ``config`` adds options to ``client_config``."""
        if self._client is not None:
            return
        s = self._client_settings
        stack = contextlib.AsyncExitStack()
        options = client_config(connect_timeout_secs=s.connect_timeout_secs, read_timeout_secs=s.read_timeout_secs, **config)
        self._client = await stack.enter_async_context(
            create_client(self._session, self.service, options, region=s.region, endpoint_url=s.endpoint_url)
        )
        self._stack = stack

    async def close(self) -> None:
        """Close the client; ``_open_client()`` opens a new one afterwards."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _call(self, operation: str, request: Request[T], *, max_elapsed_secs: float | None = None) -> T:
        """Run ``request`` until it succeeds, retrying transient failures under the retry policy.

        ``max_elapsed_secs`` overrides the policy's budget for this one call (start-up work uses a
        short one). Raises ``ConnectorError`` for any failure AWS or the network caused.
        """
        return await self._retry.run(
            functools.partial(self._attempt, operation, request),
            on_retry=functools.partial(self._on_retry, operation),
            max_elapsed_secs=max_elapsed_secs,
        )

    async def _attempt(self, operation: str, request: Request[T]) -> T:
        """One try of ``request``, vendor exceptions translated (their original kept as ``__cause__``)."""
        try:
            return await request()
        except Exception as exc:
            error = self._translate(exc)
            if error is None or error is exc:
                raise
            raise error from exc

    def _translate(self, exc: BaseException) -> ConnectorError | None:
        """``exc`` as a connector error; None for a foreign exception, which is a bug and must propagate."""
        if isinstance(exc, ConnectorError):
            return exc
        if not translate.is_vendor_error(exc):
            return None
        return translate.translate(exc, endpoint=self._endpoint)

    def _on_retry(self, operation: str, retry: int, delay: float, error: TransientError) -> None:
        log.debug("%s: %s retry %d in %.3f s after %s", self.service, operation, retry + 1, delay, error)
