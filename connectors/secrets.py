"""Device keys from AWS Secrets Manager: ``SecretsManagerDeviceSource`` reads the fleet's secrets.

Secret layout (decided here, documented in README "Configuration"): one JSON secret per fleet, or
per shard of a fleet when it outgrows Secrets Manager's 64 KiB limit (about 400 devices with metadata
per secret; list several ``secret_ids``)::

    {"devices": {"dev-000001": {"key": "<hex>", "enabled": true, "metadata": {"site": "plant-7"}}}}

Rotation is Secrets Manager's own: a new version becomes ``AWSCURRENT`` and the one before it
``AWSPREVIOUS``. A device's key verifies while it is in either version; ``enabled`` and
``metadata`` come from ``AWSCURRENT`` only, and a device missing from ``AWSCURRENT`` does not exist.

Each refresh asks ``DescribeSecret`` which version holds each stage and fetches only versions it has
not seen, so an idle fleet costs one call per secret per refresh. Errors are translated once, at
this edge (``connectors.aws.translate``); values are never logged and never put into an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from connectors import aws
from connectors.errors import PermanentError
from connectors.retry import RetryPolicy, RetrySettings

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra, imported where a client is made (connectors/aws.py)
    from aiobotocore.session import AioSession

CURRENT = "AWSCURRENT"
PREVIOUS = "AWSPREVIOUS"

PositiveSecs = Annotated[float, Meta(gt=0)]
SecretId = Annotated[str, Meta(min_length=1, max_length=2048)]


class SecretsManagerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where the device keys live (used when auth.registry_source = "secretsmanager")."""

    secret_ids: Annotated[list[SecretId], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["edge-gateway/devices"])
    region: str = ""
    # Empty: AWS itself. Set for a VPC interface endpoint or moto.
    endpoint_url: str = ""
    # A disabled device is refused within one interval; rotation takes effect within one too.
    refresh_interval_secs: PositiveSecs = 60.0
    # The first load must succeed within this, or the gateway starts from its last-good cache (if
    # younger than max_stale_secs) or does not start at all (no keys, no service).
    startup_timeout_secs: PositiveSecs = 20.0
    # Keys not confirmed by Secrets Manager for this long stop verifying: a device disabled during
    # an outage is refused once it ends or after this, whichever comes first.
    max_stale_secs: PositiveSecs = 3600.0
    connect_timeout_secs: PositiveSecs = 2.0
    read_timeout_secs: PositiveSecs = 5.0
    retry: RetrySettings = RetrySettings(max_elapsed_secs=10.0)

    def __post_init__(self) -> None:
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must start with http:// or https://")


class SecretDevice(msgspec.Struct, frozen=True):
    # Empty for devices that authenticate with a client certificate only.
    key: str = ""
    enabled: bool = True
    metadata: dict[str, str] = {}


class FleetSecret(msgspec.Struct, frozen=True):
    devices: dict[str, SecretDevice] = {}


_decode_fleet = msgspec.json.Decoder(FleetSecret)


@dataclass(frozen=True, slots=True)
class SecretVersions:
    """One secret's ``AWSCURRENT`` and (if any) ``AWSPREVIOUS`` contents."""

    secret_id: str
    current: FleetSecret
    previous: FleetSecret | None


class SecretsManagerDeviceSource:
    """Reads the fleet secrets; keeps an aiobotocore client open between refreshes."""

    def __init__(self, settings: SecretsManagerSettings, *, session: AioSession | None = None) -> None:
        self.settings = settings
        self._session = session or aws.build_session()
        self._retry = RetryPolicy(settings.retry)
        self._endpoint = settings.endpoint_url or "secretsmanager"
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._versions: dict[tuple[str, str], FleetSecret] = {}  # (secret id, version id) -> contents

    async def start(self) -> None:
        if self._client is not None:
            return
        s = self.settings
        config = aws.client_config(connect_timeout_secs=s.connect_timeout_secs, read_timeout_secs=s.read_timeout_secs)
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            aws.create_client(self._session, "secretsmanager", config, region=s.region, endpoint_url=s.endpoint_url)
        )
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def read(self) -> list[SecretVersions]:
        """Every configured secret's current and previous versions (raises ``ConnectorError``)."""
        return [await self._read_one(secret_id) for secret_id in self.settings.secret_ids]

    async def _read_one(self, secret_id: str) -> SecretVersions:
        described = await self._call("describe_secret", SecretId=secret_id)
        stages: dict[str, str] = {}
        for version_id, version_stages in (described.get("VersionIdsToStages") or {}).items():
            for stage in version_stages:
                stages[stage] = version_id
        if CURRENT not in stages:
            raise PermanentError(f"secret {secret_id!r} has no {CURRENT} version", endpoint=self._endpoint)
        current = await self._version(secret_id, stages[CURRENT])
        previous = await self._version(secret_id, stages[PREVIOUS]) if PREVIOUS in stages else None
        # Forget versions that left both stages: memory stays bounded and old keys stay gone.
        live = {(secret_id, stages[CURRENT]), (secret_id, stages.get(PREVIOUS, ""))}
        for cached in [k for k in self._versions if k[0] == secret_id and k not in live]:
            del self._versions[cached]
        return SecretVersions(secret_id, current, previous)

    async def _version(self, secret_id: str, version_id: str) -> FleetSecret:
        cached = self._versions.get((secret_id, version_id))
        if cached is not None:
            return cached
        answer = await self._call("get_secret_value", SecretId=secret_id, VersionId=version_id)
        text = answer.get("SecretString")
        if text is None:
            raise PermanentError(f"secret {secret_id!r} must be a JSON SecretString", endpoint=self._endpoint)
        try:
            fleet = _decode_fleet.decode(text)
        except msgspec.DecodeError as exc:
            # The decoder's message names the path, never the value: no key can leak through it.
            raise PermanentError(f"secret {secret_id!r} version {version_id}: {_path_only(exc)}", endpoint=self._endpoint) from None
        self._versions[(secret_id, version_id)] = fleet
        return fleet

    async def _call(self, operation: str, **params: Any) -> Any:
        if self._client is None:
            await self.start()

        async def attempt() -> Any:
            try:
                return await getattr(self._client, operation)(**params)
            except Exception as exc:
                if not aws.is_vendor_error(exc):
                    raise
                raise aws.translate(exc, endpoint=self._endpoint) from None

        return await self._retry.run(attempt)


def _path_only(exc: msgspec.DecodeError) -> str:
    """A decode error without any quoted input: 'Expected `str`, got `int` - at `$.devices...`'."""
    message = str(exc)
    _, sep, path = message.rpartition(" - at ")
    return f"not the expected layout at {path}" if sep else "not valid JSON"
