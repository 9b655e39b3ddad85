"""The HMAC ``v1`` request signature, shared by the verifier and by clients (load generator, demo).

    X-Signature: v1=<hex HMAC-SHA256(key, "<ts>\\n<METHOD>\\n<path>\\n<sha256 hex of the body as sent>")>
"""

from __future__ import annotations

import hashlib
import hmac
import time

SCHEME = "v1"


def string_to_sign(timestamp: str, method: str, path: str, body_sha256_hex: str) -> bytes:
    return f"{timestamp}\n{method.upper()}\n{path}\n{body_sha256_hex}".encode()


def signature(key: bytes, timestamp: str, method: str, path: str, body_sha256_hex: str) -> str:
    return hmac.new(key, string_to_sign(timestamp, method, path, body_sha256_hex), hashlib.sha256).hexdigest()


def sign_request(
    device_id: str, key: str, body: bytes, *, method: str = "POST", path: str = "/v1/telemetry", now: float | None = None
) -> dict[str, str]:
    """Headers that authenticate ``body`` (exactly the bytes sent, compressed or not)."""
    ts = str(int(time.time() if now is None else now))
    digest = hashlib.sha256(body).hexdigest()
    return {
        "X-Device-Id": device_id,
        "X-Timestamp": ts,
        "X-Signature": f"{SCHEME}={signature(key.encode(), ts, method, path, digest)}",
    }
