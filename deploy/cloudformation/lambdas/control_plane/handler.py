"""The fleet's control-plane API: register, rotate, disable, enable and list devices.

An HTTP API (API Gateway v2, IAM authorization: callers sign with SigV4 and need
``execute-api:Invoke``) sends every route here (payload format 2.0). This function keeps the device
registry secret the gateways read (README, "Device keys in AWS Secrets Manager"):

    {"devices": {"<device_id>": {"key": "<hex>", "enabled": true, "metadata": {...}}}}

    GET  /devices                      every device: id, enabled, metadata, whether it has a key (never keys)
    POST /devices                      {"device_id", "metadata"?}: 201 with the new key (shown once)
    GET  /devices/{device_id}          one device (no key)
    POST /devices/{device_id}/rotate   a new key (200, shown once); the old one keeps verifying until the next rotation
    POST /devices/{device_id}/disable  refused by every gateway within one refresh interval (403)
    POST /devices/{device_id}/enable

Secrets Manager's stages carry the rotation semantics the gateways implement: keys in
``AWSCURRENT`` and ``AWSPREVIOUS`` both verify; ``enabled`` and ``metadata`` come from
``AWSCURRENT``. Every write is a new version:

- it is built from the ``AWSCURRENT`` version it read, stored under a private label, and made
  ``AWSCURRENT`` by moving the label *from the version it read*: if another write moved
  ``AWSCURRENT`` meanwhile, Secrets Manager refuses the move and the write starts again from the
  new version (no lost updates);
- a rotation lets Secrets Manager make the replaced version ``AWSPREVIOUS`` (the old key keeps
  verifying until the next rotation, the scheduled one included); any other write puts
  ``AWSPREVIOUS`` back where it was, so registering or disabling a device never cuts short the
  grace of a key rotated before;
- while a scheduled rotation is in progress (an ``AWSPENDING`` version that is not ``AWSCURRENT``)
  writes are refused with 409: that rotation was built from the older version and would drop them.

Keys are never logged; every write logs the caller, the action, the device and the new version.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

LOG = logging.getLogger()
LOG.setLevel(os.environ.get("LOG_LEVEL", "INFO"))

KEY_BYTES = 32
MAX_SECRET_BYTES = 65536  # Secrets Manager's limit for a SecretString
CURRENT, PREVIOUS, PENDING = "AWSCURRENT", "AWSPREVIOUS", "AWSPENDING"
STAGING = "EDGE_GATEWAY_CONTROL_PLANE"  # the label a write's version carries until it is AWSCURRENT
WRITE_ATTEMPTS = 5
DEVICE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # the gateway's record schema; used with fullmatch
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_METADATA_ENTRIES = 16
MAX_METADATA_VALUE = 256


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class RegistryFull(ApiError):
    status, code = 413, "registry_full"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


# -- the registry document ------------------------------------------------------------------------


def new_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def public(device_id: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """What the API shows of a device: never its key."""
    return {"device_id": device_id, "enabled": bool(entry.get("enabled", True)),
            "metadata": dict(entry.get("metadata") or {}), "has_key": bool(entry.get("key"))}


def _device(document: Mapping[str, Any], device_id: str) -> dict[str, Any]:
    entry = document.get("devices", {}).get(device_id)
    if entry is None:
        raise NotFound(f"no device {device_id!r} in the registry")
    return entry


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA_ENTRIES:
        raise ApiError(f"metadata must be an object of at most {MAX_METADATA_ENTRIES} string values")
    for key, item in value.items():
        if not METADATA_KEY.match(key) or not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise ApiError(f"metadata {key!r}: keys are [A-Za-z0-9_.-]{{1,64}}, values strings of at most {MAX_METADATA_VALUE} characters")
    return dict(value)


def register(document: dict[str, Any], device_id: str, metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    devices = dict(document.get("devices", {}))
    if device_id in devices:
        raise Conflict(f"device {device_id!r} is already registered (rotate its key instead)")
    key = new_key()
    devices[device_id] = {"key": key, "enabled": True, "metadata": metadata}
    return {**document, "devices": devices}, {**public(device_id, devices[device_id]), "key": key}


def rotate(document: dict[str, Any], device_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    entry = _device(document, device_id)
    if not entry.get("enabled", True):
        raise Conflict(f"device {device_id!r} is disabled; enable it before rotating its key")
    key = new_key()
    devices = {**document["devices"], device_id: {**entry, "key": key}}
    return {**document, "devices": devices}, {**public(device_id, devices[device_id]), "key": key}


def set_enabled(document: dict[str, Any], device_id: str, enabled: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    entry = _device(document, device_id)
    devices = {**document["devices"], device_id: {**entry, "enabled": enabled}}
    return {**document, "devices": devices}, public(device_id, devices[device_id])


# -- Secrets Manager ------------------------------------------------------------------------------


def _stages(described: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for version, stages in (described.get("VersionIdsToStages") or {}).items():
        for stage in stages:
            out[stage] = version
    return out


def _read(client: Any, arn: str) -> tuple[dict[str, Any], dict[str, str]]:
    stages = _stages(client.describe_secret(SecretId=arn))
    if CURRENT not in stages:
        raise Unavailable(f"the registry secret has no {CURRENT} version")
    text = client.get_secret_value(SecretId=arn, VersionId=stages[CURRENT]).get("SecretString")
    try:
        document = json.loads(text or "")
    except ValueError:
        raise Unavailable("the registry secret is not a JSON document") from None
    if not isinstance(document, dict) or not isinstance(document.setdefault("devices", {}), dict):
        raise Unavailable('the registry secret is not {"devices": {...}}')
    return document, stages


Change = Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


def write(client: Any, arn: str, change: Change, *, rotation: bool) -> tuple[dict[str, Any], str]:
    """Apply ``change`` to the current registry as a new AWSCURRENT version; returns (answer, version)."""
    for _ in range(WRITE_ATTEMPTS):
        document, stages = _read(client, arn)
        current, previous = stages[CURRENT], stages.get(PREVIOUS)
        if stages.get(PENDING, current) != current:
            raise Conflict("a key rotation of the registry is in progress; retry when it has finished", retry_after=30)
        updated, answer = change(document)
        text = json.dumps(updated, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) > MAX_SECRET_BYTES:
            raise RegistryFull(f"the registry secret would exceed {MAX_SECRET_BYTES} bytes; shard the fleet over several secrets")
        version = str(uuid.uuid4())
        client.put_secret_value(SecretId=arn, ClientRequestToken=version, SecretString=text, VersionStages=[STAGING])
        try:
            # Refused if AWSCURRENT is no longer on the version this write was built from.
            client.update_secret_version_stage(SecretId=arn, VersionStage=CURRENT, MoveToVersionId=version,
                                               RemoveFromVersionId=current)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidParameterException":
                raise
            LOG.info(json.dumps({"event": "write_conflict", "retrying": True}))
            continue
        if not rotation and previous and previous != current:
            # Moving AWSCURRENT made the version it left AWSPREVIOUS; a write that is not a rotation
            # leaves the previous keys' grace where it was.
            client.update_secret_version_stage(SecretId=arn, VersionStage=PREVIOUS, MoveToVersionId=previous,
                                               RemoveFromVersionId=current)
        client.update_secret_version_stage(SecretId=arn, VersionStage=STAGING, RemoveFromVersionId=version)
        return answer, version
    raise Conflict("the registry kept changing under this write; retry", retry_after=1)


# -- HTTP -----------------------------------------------------------------------------------------


def _body(event: Mapping[str, Any]) -> dict[str, Any]:
    raw = event.get("body") or ""
    if event.get("isBase64Encoded"):
        raw = base64.b64decode(raw).decode("utf-8", "replace")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object")
    return body


def _device_id(value: Any) -> str:
    if not isinstance(value, str) or not DEVICE_ID.fullmatch(value):
        raise ApiError("device_id must be 1 to 128 characters of [A-Za-z0-9._:-]")
    return value


def _response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
            "body": json.dumps(body)}


def route(event: Mapping[str, Any], arn: str, client: Any) -> tuple[int, Any, str]:
    """(status, body, audit action) for one API request."""
    key = event.get("routeKey", "")
    path = event.get("pathParameters") or {}
    if key == "GET /devices":
        document, _ = _read(client, arn)
        devices = [public(d, e) for d, e in sorted(document["devices"].items())]
        return 200, {"devices": devices, "count": len(devices)}, ""
    if key == "GET /devices/{device_id}":
        device_id = _device_id(path.get("device_id"))
        document, _ = _read(client, arn)
        return 200, public(device_id, _device(document, device_id)), ""
    if key == "POST /devices":
        body = _body(event)
        unknown = sorted(set(body) - {"device_id", "metadata"})
        if unknown:
            raise ApiError(f"unknown fields {unknown}")
        device_id, metadata = _device_id(body.get("device_id")), _metadata(body.get("metadata"))
        answer, version = write(client, arn, lambda doc: register(doc, device_id, metadata), rotation=False)
        return 201, answer | {"version": version}, "register"
    if key in ("POST /devices/{device_id}/rotate", "POST /devices/{device_id}/disable", "POST /devices/{device_id}/enable"):
        device_id = _device_id(path.get("device_id"))
        action = key.rsplit("/", 1)[1]
        if action == "rotate":
            answer, version = write(client, arn, lambda doc: rotate(doc, device_id), rotation=True)
        else:
            answer, version = write(client, arn, lambda doc: set_enabled(doc, device_id, action == "enable"), rotation=False)
        return 200, answer | {"version": version}, action
    raise NotFound(f"no route {key!r}")


def handle(event: Mapping[str, Any], env: Mapping[str, str], client: Any) -> dict[str, Any]:
    arn = env.get("DEVICE_KEYS_SECRET_ARN")
    if not arn:
        return _response(500, {"error": "misconfigured", "message": "DEVICE_KEYS_SECRET_ARN is not set"})
    context = event.get("requestContext") or {}
    caller = ((context.get("authorizer") or {}).get("iam") or {}).get("userArn", "")
    try:
        status, body, action = route(event, arn, client)
    except ApiError as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _response(exc.status, {"error": exc.code, "message": str(exc)}, headers)
    except (ClientError, BotoCoreError) as exc:
        LOG.error(json.dumps({"event": "secrets_manager_error", "error": type(exc).__name__, "route": event.get("routeKey")}))
        return _response(503, {"error": "unavailable", "message": "the device registry cannot be reached; retry"}, {"Retry-After": "5"})
    if action:
        LOG.info(json.dumps({"event": "registry_write", "action": action, "device_id": body.get("device_id"),
                             "version": body.get("version"), "caller": caller, "request_id": context.get("requestId")}))
    return _response(status, body)


def lambda_handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    client = boto3.client("secretsmanager", endpoint_url=os.environ.get("SECRETS_MANAGER_ENDPOINT") or None)
    return handle(event, os.environ, client)
