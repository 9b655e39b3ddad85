"""The device registry: who may send, with which keys, and what we know about each device.

The embedded default is a JSON file::

    {"devices": {"dev-000001": {"keys": ["<current>", "<previous>"], "enabled": true,
                                "metadata": {"site": "plant-7", "model": "th-200"}}}}

The first key signs new requests; the others still verify during a rotation. ``edge-gateway device
add`` writes entries, so nobody edits keys by hand.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from connectors.durable_files import write_atomically
from gateway.ingest.records import DeviceId

KEY_BYTES = 32


class RegistryError(Exception):
    """The registry file cannot be read or written."""


class NoSuchDevice(RegistryError):
    """A change named a device the registry does not hold."""


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
        self._devices = _sharing_metadata(devices or {})
        self._key_bytes = {d: tuple(k.encode() for k in dev.keys) for d, dev in self._devices.items()}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceRegistry:
        return cls(load_devices(path))

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def keys(self, device_id: str) -> tuple[bytes, ...]:
        return self._key_bytes.get(device_id, ())

    def __len__(self) -> int:
        return len(self._devices)


def _sharing_metadata(devices: dict[str, Device]) -> dict[str, Device]:
    """``devices`` with one metadata mapping per distinct value (a fleet has few: site, model, ...),
    whatever source they came from: a copy per device was over a third of a large registry's memory
    in every worker. The mappings are only ever read, so sharing them is safe."""
    shared: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    compact = {}
    for device_id, device in devices.items():
        metadata = shared.setdefault(tuple(device.metadata.items()), device.metadata)
        compact[device_id] = device if metadata is device.metadata else msgspec.structs.replace(device, metadata=metadata)
    return compact


class _LoadedDevice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device as a gateway loads it: its metadata left as sent, to be decoded once per distinct value."""

    keys: list[Key]
    enabled: bool = True
    metadata: msgspec.Raw = msgspec.Raw(b"{}")


class _LoadedFile(msgspec.Struct, forbid_unknown_fields=True):
    devices: dict[DeviceId, msgspec.Raw] = {}  # each decoded on its own, below


_DEVICE = msgspec.json.Decoder(_LoadedDevice)
_METADATA = msgspec.json.Decoder(dict[str, str])


def load_devices(path: str | os.PathLike[str]) -> dict[str, Device]:
    """The registry file's devices, for a gateway: a fleet's metadata (its sites, its models) decoded
    and kept once per distinct value, so a large registry never holds a mapping per device, not
    even while it loads (decoded whole, a worker's memory kept the peak for good). Each device is
    decoded on its own: one call over the whole file held the interpreter's lock, and so a worker's
    event loop, for as long as it took (0.2-0.3 s of late answers per reload of 100,000 devices)."""
    data = _registry_bytes(path)
    if data is None:
        return {}
    try:
        loaded = msgspec.json.decode(data, type=_LoadedFile)
    except msgspec.DecodeError as exc:
        raise RegistryError(f"{path}: {exc}") from None
    shared: dict[bytes, dict[str, str]] = {}
    devices = {}
    for device_id, entry in loaded.devices.items():
        try:
            device = _DEVICE.decode(entry)
        except msgspec.DecodeError as exc:
            raise RegistryError(f"{path}: device {device_id!r}: {exc}") from None
        raw = bytes(device.metadata)
        if (metadata := shared.get(raw)) is None:
            try:
                metadata = shared[raw] = _METADATA.decode(raw)
            except msgspec.DecodeError as exc:
                raise RegistryError(f"{path}: the metadata of device {device_id!r}: {exc}") from None
        devices[device_id] = Device(device.keys, device.enabled, metadata)
    return devices


def read_registry(path: str | os.PathLike[str]) -> RegistryFile:
    data = _registry_bytes(path)
    if data is None:
        return RegistryFile()
    try:
        return msgspec.json.decode(data, type=RegistryFile)
    except msgspec.DecodeError as exc:
        raise RegistryError(f"{path}: {exc}") from None


def _registry_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """The registry file's bytes; None when there is none yet."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry: {exc.strerror} (a symbolic link is refused)") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise RegistryError(
                f"{path}: a registry file holds device keys, but its mode is {mode & 0o777:04o}; make it readable by its owner only (chmod 600)"
            )
        return f.read()


def new_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def add_device(path: str | os.PathLike[str], device_id: str, metadata: dict[str, str], *, replace: bool = False) -> str:
    """Create (or, with ``replace``, re-key) a device; return its new key."""
    try:
        msgspec.convert(device_id, DeviceId)
    except msgspec.ValidationError as exc:
        raise RegistryError(f"invalid device id {device_id!r}: {exc}") from None
    key = new_key()

    def add(registry: RegistryFile) -> None:
        if device_id in registry.devices and not replace:
            raise RegistryError(f"device {device_id!r} already exists; use `device rotate` to give it a new key")
        registry.devices[device_id] = Device(keys=[key], metadata=metadata)

    change_registry(path, add)
    return key


def rotate_key(path: str | os.PathLike[str], device_id: str) -> str:
    """Give a device a new key; its current key keeps verifying until the next rotation."""
    key = new_key()

    def rotate(registry: RegistryFile) -> None:
        device = _existing(registry, path, device_id)
        registry.devices[device_id] = msgspec.structs.replace(device, keys=[key, device.keys[0]])

    change_registry(path, rotate)
    return key


def remove_device(path: str | os.PathLike[str], device_id: str) -> None:
    """Delete a device and its keys; a gateway watching the file refuses it from its next check on."""

    def remove(registry: RegistryFile) -> None:
        _existing(registry, path, device_id)
        del registry.devices[device_id]

    change_registry(path, remove)


def set_enabled(path: str | os.PathLike[str], device_id: str, enabled: bool) -> None:
    def set_(registry: RegistryFile) -> None:
        device = _existing(registry, path, device_id)
        registry.devices[device_id] = msgspec.structs.replace(device, enabled=enabled)

    change_registry(path, set_)


def _existing(registry: RegistryFile, path: str | os.PathLike[str], device_id: str) -> Device:
    device = registry.devices.get(device_id)
    if device is None:
        raise NoSuchDevice(f"no device {device_id!r} in {path}")
    return device


# How long a change waits for another one (a provisioning script adding devices in parallel).
LOCK_WAIT_SECS = 10.0


def change_registry(path: str | os.PathLike[str], change: Callable[[RegistryFile], object]) -> None:
    """Read, change and write the registry holding its lock: of two changes at once, both stay
    (each read the file the other wrote), where two plain read-modify-writes lose one."""
    target = Path(path)
    _check_directory(target)
    lock = target.with_name(f".{target.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RegistryError(f"{lock}: cannot open the registry's lock: {exc.strerror}") from None
    try:
        _lock(fd, lock)
        registry = read_registry(target)
        change(registry)
        write_registry(target, registry)
    finally:
        os.close(fd)  # releases the lock, as any exit of the process would


def _lock(fd: int, lock: Path) -> None:
    deadline = time.monotonic() + LOCK_WAIT_SECS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise RegistryError(
                    f"{lock}: another change to the registry has held its lock for {LOCK_WAIT_SECS:g} s; retry"
                ) from None
            time.sleep(0.01)


def _check_directory(target: Path) -> None:
    if not target.parent.is_dir():
        # A typo in --registry must not quietly start a second registry somewhere else.
        raise RegistryError(f"{target}: the directory {target.parent} does not exist; create it first")


def write_registry(path: str | os.PathLike[str], registry: RegistryFile) -> None:
    target = Path(path)
    _check_directory(target)
    try:
        # Keys are secrets: the file is readable by its owner only.
        write_atomically(target, msgspec.json.format(msgspec.json.encode(registry), indent=2) + b"\n", mode=0o600)
    except OSError as exc:
        raise RegistryError(f"{target}: cannot write the registry: {exc.strerror}") from None


class RegistryFileWatcher:
    """Reloads the registry file when it changes, so `device add` and friends apply without SIGHUP.

    Polls the file's (mtime, size, inode) every ``interval_secs``: cheap, and it works on every file
    system and through the atomic rename ``write_registry`` does. A file that does not decode, or is
    gone (moved aside for a moment, a volume unmounted), keeps the previous registry in use (logged,
    counted as a failed refresh) until it is back: removing devices is `device remove`'s job.
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
            if seen is None:
                self._on_error(RegistryError(f"{self._path()}: the registry file is gone"))
                continue
            try:
                registry = await asyncio.to_thread(DeviceRegistry.load, self._path())
            except RegistryError as exc:
                self._on_error(exc)
                continue
            self._on_load(registry)
