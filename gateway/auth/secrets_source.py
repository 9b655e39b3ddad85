"""The device registry kept in AWS Secrets Manager: loaded at start, refreshed in the background.

The keys are cached for ``refresh_interval_secs``; a refresh that fails (Secrets Manager unreachable,
throttled, a malformed new version) keeps the last good registry, raises
``edge_gateway_registry_stale`` to 1 and logs a warning, and the next interval tries again. Keys are
never logged: the log lines name secrets, versions and counts only.

Staleness is bounded: keys Secrets Manager has not confirmed for ``max_stale_secs`` stop verifying
(a device disabled during an outage cannot stay accepted for ever). The last good registry is also
kept in a cache file (0600, beside the WAL), so a worker or instance that starts during an outage
serves with it while it is younger than ``max_stale_secs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from connectors.aws.secrets import SecretsManagerDeviceSource, SecretsManagerSettings, SecretVersions
from connectors.errors import ConnectorError
from connectors.durable_files import ensure_directory, write_atomically
from gateway.durable.ledger_clock import Instant
from gateway.ops.metrics import GatewayMetrics
from gateway.ingest.records import DeviceId
from gateway.auth.registry import MIN_KEY_CHARS, Device, DeviceRegistry, RegistryError

log = logging.getLogger(__name__)


def devices_from_secrets(secrets: list[SecretVersions]) -> dict[str, Device]:
    """AWSCURRENT says who exists (and if enabled); both stages' keys verify."""
    devices: dict[str, Device] = {}
    for secret in secrets:
        previous = secret.previous.devices if secret.previous else {}
        for device_id, entry in secret.current.devices.items():
            try:
                msgspec.convert(device_id, DeviceId)
            except msgspec.ValidationError:
                log.warning("device registry: skipping an invalid device id", extra={"secret_id": secret.secret_id})
                continue
            keys = [entry.key] if entry.key else []
            old = previous.get(device_id)
            if old is not None and old.key and old.key != entry.key:
                keys.append(old.key)
            if any(len(k) < MIN_KEY_CHARS for k in keys):
                log.warning(
                    "device registry: skipping a device whose key is too short",
                    extra={"secret_id": secret.secret_id, "device_id": device_id, "min_key_chars": MIN_KEY_CHARS},
                )
                continue
            devices[device_id] = Device(keys=keys, enabled=entry.enabled, metadata=dict(entry.metadata))
    return devices


class SecretsManagerRegistry:
    """Owns the refresh task; ``on_update`` receives every new registry (the gateway swaps it in)."""

    def __init__(
        self,
        settings: SecretsManagerSettings,
        metrics: GatewayMetrics,
        on_update: Callable[[DeviceRegistry], None],
        *,
        source: SecretsManagerDeviceSource | None = None,
        cache_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._on_update = on_update
        self._source = source or SecretsManagerDeviceSource(settings)
        self._cache = Path(cache_path) if cache_path else None
        self.expired = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.last_success: float | None = None  # the wall clock, for the admin API and metrics
        # When Secrets Manager last confirmed the keys: their age is the time that really passed since
        # (a step of the wall clock must neither expire them early nor keep revoked ones verifying).
        self._confirmed: Instant | None = None
        self.stale = False

    async def start(self) -> None:
        """Load once (from Secrets Manager, else from a fresh enough cache, else fail), then refresh."""
        try:
            async with asyncio.timeout(self.settings.startup_timeout_secs):
                await self.refresh(raise_errors=True)
        except (ConnectorError, RegistryError, TimeoutError) as exc:
            if not await asyncio.to_thread(self._start_from_cache, exc):
                await self._source.close()
                raise RegistryError(f"cannot load the device registry from Secrets Manager: {_describe(exc)}") from None
        self._task = asyncio.create_task(self._run(), name="registry-refresh")

    def _start_from_cache(self, exc: BaseException) -> bool:
        if self._cache is None:
            return False
        try:
            cached = msgspec.json.decode(self._cache.read_bytes(), type=_Cached)
            confirmed = Instant.unpack(bytes.fromhex(cached.confirmed)) if cached.confirmed else Instant(int(cached.fetched_at * 1000), 0, b"")
        except (OSError, ValueError, struct.error, msgspec.DecodeError, msgspec.ValidationError):
            return False  # an unreadable cache is no cache: the start says Secrets Manager is unreachable
        age = Instant.now().real_ms_since(confirmed) / 1000
        if age > self.settings.max_stale_secs:
            return False
        self._on_update(DeviceRegistry(cached.devices))
        self.last_success, self._confirmed = cached.fetched_at, confirmed
        self.stale = True
        self._metrics.registry_stale.set(1)
        log.warning(
            "Secrets Manager unreachable at start; serving the last good keys from the cache",
            extra={"error": _describe(exc), "cache_age_secs": round(age, 1), "devices": len(cached.devices)},
        )
        return True

    def _write_cache(self, devices: dict[str, Device]) -> None:
        if self._cache is None:
            return
        payload = msgspec.json.encode(_Cached(time.time(), devices, Instant.now().pack().hex()))
        try:
            ensure_directory(self._cache.parent)
            write_atomically(self._cache, payload, mode=0o600)  # keys: readable by the owner only
        except OSError as exc:
            log.warning("cannot write the registry cache; a start during an outage will fail", extra={"error": str(exc)})

    def refresh_soon(self) -> None:
        """Refresh now rather than at the end of the interval (SIGHUP, admin API)."""
        self._wake.set()

    async def refresh(self, *, raise_errors: bool = False) -> bool:
        started = time.monotonic()
        try:
            devices = devices_from_secrets(await self._source.read())
            registry = DeviceRegistry(devices)
        except (ConnectorError, RegistryError) as exc:
            self._metrics.registry_refreshes.labels("error").inc()
            self._metrics.registry_stale.set(1)
            self.stale = True
            age = None if self._confirmed is None else round(Instant.now().real_ms_since(self._confirmed) / 1000, 1)
            if age is not None and age > self.settings.max_stale_secs and not self.expired:
                self.expired = True
                self._on_update(DeviceRegistry())  # no key verifies until Secrets Manager answers again
                log.critical(
                    "device keys are older than secretsmanager.max_stale_secs; refusing every device until a refresh succeeds",
                    extra={"last_success_age_secs": age, "max_stale_secs": self.settings.max_stale_secs},
                )
            elif not self.expired:
                log.warning(
                    "device registry refresh failed; keeping the last good keys",
                    extra={"source": "secretsmanager", "error": _describe(exc), "last_success_age_secs": age},
                )
            if raise_errors:
                raise
            return False
        self._on_update(registry)
        self.expired = False
        self.last_success, self._confirmed = time.time(), Instant.now()
        await asyncio.to_thread(self._write_cache, devices)
        if self.stale:
            log.info("device registry refresh recovered", extra={"source": "secretsmanager", "devices": len(registry)})
        self.stale = False
        m = self._metrics
        m.registry_refreshes.labels("ok").inc()
        m.registry_stale.set(0)
        m.registry_devices.set(len(registry))
        m.registry_last_success.set(self.last_success)
        m.registry_refresh_duration.observe(time.monotonic() - started)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._source.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.refresh_interval_secs):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a bug must not stop refreshing; the last good keys stay in place
                log.exception("device registry refresh crashed; keeping the last good keys")


class _Cached(msgspec.Struct):
    fetched_at: float  # the wall clock, for people; ``confirmed`` (an Instant, hex) tells its age
    devices: dict[str, Device]
    confirmed: str = ""  # absent from caches written by earlier versions: the wall clock alone then


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
