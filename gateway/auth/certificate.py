"""Devices that authenticate with a client certificate, in front of the HMAC authenticator.

A request whose connection (or trusted proxy) presented a verified certificate is the device the
certificate names: it needs no HMAC headers, but the device must be in the registry (so it has
metadata and can be disabled), and its records must still name it. Any other request goes to the
inner authenticator unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.auth.hmac import Principal
from gateway.errors import Forbidden, Unauthorized
from gateway.auth.registry import DeviceRegistry


@dataclass(frozen=True, slots=True)
class CertPending:
    device_id: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    clock_skew_ms: int | None = None


class DeviceAuthenticator:
    def __init__(self, inner, registry: Callable[[], DeviceRegistry]) -> None:
        self.inner = inner
        self._registry = registry

    def begin(self, headers: Mapping[str, str], *, cert_device: str | None = None):
        if cert_device is None:
            return self.inner.begin(headers)
        device = self._registry().get(cert_device)
        if device is None:
            raise Unauthorized("the client certificate does not name a registered device", reason="unknown_device")
        if not device.enabled:
            raise Forbidden(f"device {cert_device!r} is disabled", reason="disabled")
        return CertPending(cert_device, device.metadata)

    def finish(self, pending, method: str, path: str, body_sha256_hex: str) -> Principal:
        if isinstance(pending, CertPending):
            return Principal(pending.device_id, pending.metadata, None)
        return self.inner.finish(pending, method, path, body_sha256_hex)
