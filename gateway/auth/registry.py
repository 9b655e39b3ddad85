"""The device registry: who may send, with which keys, and what we know about each device.

The embedded default is a JSON file::

    {"devices": {"dev-000001": {"keys": ["<current>", "<previous>"], "enabled": true,
                                "metadata": {"site": "plant-7", "model": "th-200"}}}}

The first key signs new requests; the others still verify during a rotation. ``edge-gateway device
add`` writes entries, so nobody edits keys by hand.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from connectors.durable_files import write_atomically
from gateway.ingest.records import DeviceId

KEY_BYTES = 32


class RegistryError(Exception):
    """The registry file cannot be read or written."""


# A device key must be at least this long (new keys are 64 hex digits: 32 random bytes).
MIN_KEY_CHARS = 32
Key = Annotated[str, Meta(min_length=MIN_KEY_CHARS)]


class Device(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: list[Key]
    enabled: bool = True
    metadata: dict[str, str] = {}


class RegistryFile(msgspec.Struct, forbid_unknown_fields=True):
    devices: dict[DeviceId, Device] = {}


class DeviceRegistry:
    """An in-memory view of the registry; ``reload`` swaps it atomically."""

    def __init__(self, devices: dict[str, Device] | None = None) -> None:
        self._devices = dict(devices or {})
        self._key_bytes = {d: tuple(k.encode() for k in dev.keys) for d, dev in self._devices.items()}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceRegistry:
        return cls(read_registry(path).devices)

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def keys(self, device_id: str) -> tuple[bytes, ...]:
        return self._key_bytes.get(device_id, ())

    def __len__(self) -> int:
        return len(self._devices)


def read_registry(path: str | os.PathLike[str]) -> RegistryFile:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return RegistryFile()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry: {exc.strerror} (a symbolic link is refused)") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise RegistryError(
                f"{path}: the registry holds keys but its mode is {mode & 0o777:04o}; make it readable by its owner only (chmod 600)"
            )
        data = f.read()
    try:
        return msgspec.json.decode(data, type=RegistryFile)
    except msgspec.DecodeError as exc:
        raise RegistryError(f"{path}: {exc}") from None


def new_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def add_device(path: str | os.PathLike[str], device_id: str, metadata: dict[str, str], *, replace: bool = False) -> str:
    """Create (or, with ``replace``, re-key) a device; return its new key."""
    try:
        msgspec.convert(device_id, DeviceId)
    except msgspec.ValidationError as exc:
        raise RegistryError(f"invalid device id {device_id!r}: {exc}") from None
    registry = read_registry(path)
    if device_id in registry.devices and not replace:
        raise RegistryError(f"device {device_id!r} already exists; use `device rotate` to give it a new key")
    key = new_key()
    registry.devices[device_id] = Device(keys=[key], metadata=metadata)
    write_registry(path, registry)
    return key


def rotate_key(path: str | os.PathLike[str], device_id: str) -> str:
    """Give a device a new key; its current key keeps verifying until the next rotation."""
    registry = read_registry(path)
    device = registry.devices.get(device_id)
    if device is None:
        raise RegistryError(f"no device {device_id!r} in {path}")
    key = new_key()
    registry.devices[device_id] = msgspec.structs.replace(device, keys=[key, device.keys[0]])
    write_registry(path, registry)
    return key


def remove_device(path: str | os.PathLike[str], device_id: str) -> None:
    """Delete a device and its keys; a gateway watching the file refuses it from its next check on."""
    registry = read_registry(path)
    if registry.devices.pop(device_id, None) is None:
        raise RegistryError(f"no device {device_id!r} in {path}")
    write_registry(path, registry)


def set_enabled(path: str | os.PathLike[str], device_id: str, enabled: bool) -> None:
    registry = read_registry(path)
    device = registry.devices.get(device_id)
    if device is None:
        raise RegistryError(f"no device {device_id!r} in {path}")
    registry.devices[device_id] = msgspec.structs.replace(device, enabled=enabled)
    write_registry(path, registry)


def write_registry(path: str | os.PathLike[str], registry: RegistryFile) -> None:
    target = Path(path)
    if not target.parent.is_dir():
        # A typo in --registry must not quietly start a second registry somewhere else.
        raise RegistryError(f"{target}: the directory {target.parent} does not exist; create it first")
    try:
        # Keys are secrets: the file is readable by its owner only.
        write_atomically(target, msgspec.json.format(msgspec.json.encode(registry), indent=2) + b"\n", mode=0o600)
    except OSError as exc:
        raise RegistryError(f"{target}: cannot write the registry: {exc.strerror}") from None


class RegistryFileWatcher:
    """Reloads the registry file when it changes, so `device add` and friends apply without SIGHUP.

    Polls the file's (mtime, size, inode) every ``interval_secs``: cheap, and it works on every file
    system and through the atomic rename ``write_registry`` does. A file that does not decode keeps
    the previous registry in use (logged, counted as a failed refresh) until it is fixed.
    """

    def __init__(self, path, on_load, on_error, *, interval_secs: float = 1.0) -> None:
        self._path = path  # a callable: the path may change with a reload
        self._on_load = on_load
        self._on_error = on_error
        self._interval = interval_secs
        self._seen = self._signature()
        self._task = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path())
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-watch")

    def reset(self) -> None:
        """The registry was just loaded by someone else (SIGHUP, the admin API): no reload for that change."""
        self._seen = self._signature()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            seen = self._signature()
            if seen == self._seen:
                continue
            self._seen = seen
            try:
                registry = await asyncio.to_thread(DeviceRegistry.load, self._path())
            except RegistryError as exc:
                self._on_error(exc)
                continue
            self._on_load(registry)
