"""Building aiobotocore clients the way every AWS connector needs them.

Credentials always come from the standard AWS chain (environment, shared profile, container or
instance role); no settings struct has a field for them, so a key can never end up in a config file.

Retries are ours, not botocore's: clients are built with a single attempt so that ``RetryPolicy``
and the adaptive concurrency limiter see every throttle and timeout.

The SDK is the `s3` extra, so it is imported here, when a connector first builds a client, never
when a settings module is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

EXTRA_HINT = "the AWS connectors need the `s3` extra: pip install 'edge-gateway[s3]'"
USER_AGENT_EXTRA = "edge-gateway"


def build_session() -> AioSession:
    """A session on the standard credential chain."""
    try:
        from aiobotocore.session import get_session
    except ImportError as exc:
        raise ImportError(EXTRA_HINT) from exc
    return get_session()


def client_config(
    *,
    connect_timeout_secs: float,
    read_timeout_secs: float,
    max_pool_connections: int = 10,
    s3: Mapping[str, Any] | None = None,
) -> AioConfig:
    """An ``AioConfig`` with botocore's own retries off and explicit timeouts."""
    try:
        from aiobotocore.config import AioConfig
    except ImportError as exc:
        raise ImportError(EXTRA_HINT) from exc
    return AioConfig(
        connect_timeout=connect_timeout_secs,
        read_timeout=read_timeout_secs,
        max_pool_connections=max_pool_connections,
        retries={"total_max_attempts": 1},
        # Connectors send the checksums they computed themselves (off the event loop); this stops
        # botocore from computing a second one on the loop.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra=USER_AGENT_EXTRA,
        s3=dict(s3) if s3 else None,
    )


def create_client(session: AioSession, service: str, config: AioConfig, *, region: str, endpoint_url: str) -> Any:
    """``session.create_client`` (an async context manager); empty settings defer to the AWS chain."""
    kwargs: dict[str, Any] = {}
    if region:
        kwargs["region_name"] = region
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    return session.create_client(service, config=config, **kwargs)
