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
this edge (``AwsConnector``, ``connectors.aws.connector``); values are never logged and never put
into an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from connectors.aws.connector import AwsConnector
from connectors.aws.settings import AwsClientSettings, PositiveSecs
from connectors.errors import PermanentError
from connectors.retry import RetrySettings

if TYPE_CHECKING:  # the AWS SDK is the `s3` extra, imported where a client is made (connectors/aws/client.py)
    from aiobotocore.session import AioSession

CURRENT = "AWSCURRENT"
PREVIOUS = "AWSPREVIOUS"

SecretId = Annotated[str, Meta(min_length=1, max_length=2048)]


class SecretsManagerSettings(AwsClientSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where the device keys live (used when auth.registry_source = "secretsmanager").

    Start-up waits on Secrets Manager, which answers fast: its timeouts and retry budget are
    shorter than the other AWS connectors'.
    """

    secret_ids: Annotated[list[SecretId], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["edge-gateway/devices"])
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


class SecretsManagerDeviceSource(AwsConnector):
    """Reads the fleet secrets; keeps an aiobotocore client open between refreshes."""

    service = "secretsmanager"

    def __init__(self, settings: SecretsManagerSettings, *, session: AioSession | None = None) -> None:
        super().__init__(settings, session=session)
        self.settings = settings
        self._versions: dict[tuple[str, str], FleetSecret] = {}  # (secret id, version id) -> contents

    async def start(self) -> None:
        await self._open_client()

    async def read(self) -> list[SecretVersions]:
        """Every configured secret's current and previous versions (raises ``ConnectorError``)."""
        return [await self._read_one(secret_id) for secret_id in self.settings.secret_ids]

    async def _read_one(self, secret_id: str) -> SecretVersions:
        described = await self._request("describe_secret", SecretId=secret_id)
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
        answer = await self._request("get_secret_value", SecretId=secret_id, VersionId=version_id)
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

    async def _request(self, operation: str, **params: Any) -> Any:
        """One Secrets Manager call under the retry policy; the client opens on first use."""
        await self._open_client()
        return await self._call(operation, lambda: getattr(self._client, operation)(**params))


def _path_only(exc: msgspec.DecodeError) -> str:
    """A decode error without any quoted input: 'Expected `str`, got `int` - at `$.devices...`'."""
    message = str(exc)
    _, sep, path = message.rpartition(" - at ")
    return f"not the expected layout at {path}" if sep else "not valid JSON"
