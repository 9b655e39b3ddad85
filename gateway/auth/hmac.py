"""Device authentication: the HMAC ``v1`` scheme, checked in two steps around the body.

``begin`` runs on the headers before the body is read (missing, malformed or stale headers fail
fast); ``finish`` runs once the body's SHA-256 is known. Nothing a request carries is decoded or
acted on before ``finish`` succeeds. An unknown device is verified against a decoy key and a
disabled one is refused only after its signature verifies, so neither timing nor answers tell an
unauthenticated client which devices exist.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.errors import Forbidden, Replayed, Unauthorized
from gateway.auth.registry import DeviceRegistry
from gateway.edge.replay import ReplayGuard
from gateway.auth.signing import SCHEME, signature


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request, once proven."""

    device_id: str | None  # None when authentication is off
    metadata: Mapping[str, str] = field(default_factory=dict)
    clock_skew_ms: int | None = None
    # The verified signature, remembered against replays; released if the request is refused for retry.
    replay_key: str | None = None


@dataclass(frozen=True, slots=True)
class _Pending:
    device_id: str
    timestamp: str
    provided: str
    keys: tuple[bytes, ...]
    metadata: Mapping[str, str]
    clock_skew_ms: int
    enabled: bool = True
    known: bool = True  # in the registry (an unknown device is checked against a decoy key)


class HmacAuthenticator:
    def __init__(
        self,
        registry: Callable[[], DeviceRegistry],
        *,
        window_secs: int,
        clock: Callable[[], float] = time.time,
        replay: ReplayGuard | None = None,
    ) -> None:
        self._registry = registry
        self._window = window_secs
        self._clock = clock
        self._replay = replay
        self._decoy = (os.urandom(32),)  # verifies nothing; makes an unknown device cost what a known one does

    def begin(self, headers: Mapping[str, str]) -> _Pending:
        device_id = headers.get("X-Device-Id", "")
        timestamp = headers.get("X-Timestamp", "")
        sig = headers.get("X-Signature", "")
        missing = [h for h, v in (("X-Device-Id", device_id), ("X-Timestamp", timestamp), ("X-Signature", sig)) if not v]
        if missing:
            raise Unauthorized(f"missing {', '.join(missing)}: every request must be signed (scheme {SCHEME})", reason="missing_headers")
        scheme, _, provided = sig.partition("=")
        if scheme != SCHEME or not provided:
            raise Unauthorized(f"X-Signature must look like '{SCHEME}=<hex>'", reason="malformed_header")
        if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
            raise Unauthorized("X-Timestamp must be whole unix seconds", reason="malformed_header")
        now = self._clock()
        skew = int(timestamp) - now
        if abs(skew) > self._window:
            raise Unauthorized(
                f"X-Timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the gateway's clock; "
                f"the limit is {self._window} s (check the device clock)",
                reason="stale_timestamp",
            )
        registry = self._registry()
        device = registry.get(device_id)
        if device is None:
            return _Pending(device_id, timestamp, provided, self._decoy, {}, int(skew * 1000), known=False)
        keys = registry.keys(device_id)
        return _Pending(device_id, timestamp, provided, keys, device.metadata, int(skew * 1000), device.enabled)

    def finish(self, pending: _Pending, method: str, path: str, body_sha256_hex: str) -> Principal:
        provided = pending.provided.encode()
        matches = [
            hmac.compare_digest(signature(key, pending.timestamp, method, path, body_sha256_hex).encode(), provided)
            for key in pending.keys
        ]
        if not any(matches):
            # The same answer for an unknown device, a wrong key and a changed body; only the reason differs.
            raise Unauthorized("the signature does not match", reason="bad_signature" if pending.known else "unknown_device")
        if not pending.enabled:
            raise Forbidden(f"device {pending.device_id!r} is disabled", reason="disabled")
        if self._replay is None:
            return Principal(pending.device_id, pending.metadata, pending.clock_skew_ms)
        if not self._replay.claim(pending.provided, int(pending.timestamp)):
            raise Replayed(
                "this exact request was already received (replay); sign every request anew",
                reason="replayed",
                device=Principal(pending.device_id, pending.metadata, pending.clock_skew_ms),
                signature=pending.provided,
            )
        return Principal(pending.device_id, pending.metadata, pending.clock_skew_ms, pending.provided)


class NoAuthenticator:
    """Authentication off (loopback only): the optional X-Device-Id header names the device."""

    def __init__(self, registry: Callable[[], DeviceRegistry]) -> None:
        self._registry = registry

    def begin(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("X-Device-Id") or None

    def finish(self, pending: str | None, method: str, path: str, body_sha256_hex: str) -> Principal:
        device = self._registry().get(pending) if pending else None
        return Principal(None, device.metadata if device else {}, None)
