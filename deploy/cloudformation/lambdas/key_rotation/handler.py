"""Secrets Manager rotation for the device key registry.

The secret is the gateway's fleet document: ``{"devices": {"<device_id>": {"key": hex, "enabled":
bool, "metadata": {...}}}}``. Rotation gives every enabled device that has a key a new one; the
gateway reads both AWSCURRENT and AWSPREVIOUS, so the old key stays valid until the next rotation and
devices pick up their new key from provisioning without a gap. Devices without a key (client
certificate only) and disabled devices are left as they are. The four steps are Secrets Manager's
rotation contract.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.exceptions import ClientError

LOG = logging.getLogger()
LOG.setLevel(os.environ.get("LOG_LEVEL", "INFO"))

KEY_BYTES = 32


class RotationError(Exception):
    """The secret is not in a state this rotation can continue from."""


def rotated(registry: Mapping[str, Any]) -> dict[str, Any]:
    devices = {}
    for device_id, entry in registry.get("devices", {}).items():
        keeps_key = not entry.get("enabled", True) or not entry.get("key")
        devices[device_id] = dict(entry) if keeps_key else {**entry, "key": secrets.token_hex(KEY_BYTES)}
    return {**registry, "devices": devices}


def _version_with_stage(metadata: Mapping[str, Any], stage: str) -> str | None:
    for version, stages in metadata["VersionIdsToStages"].items():
        if stage in stages:
            return version
    return None


def create_secret(client: Any, arn: str, token: str) -> None:
    try:
        client.get_secret_value(SecretId=arn, VersionId=token, VersionStage="AWSPENDING")
        return  # Already created by an earlier attempt of this rotation.
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
    current = json.loads(client.get_secret_value(SecretId=arn, VersionStage="AWSCURRENT")["SecretString"])
    client.put_secret_value(
        SecretId=arn, ClientRequestToken=token, SecretString=json.dumps(rotated(current)), VersionStages=["AWSPENDING"]
    )


def set_secret(client: Any, arn: str, token: str) -> None:
    """Nothing to push: gateways read the registry from the secret itself."""


def test_secret(client: Any, arn: str, token: str) -> None:
    pending = json.loads(client.get_secret_value(SecretId=arn, VersionId=token, VersionStage="AWSPENDING")["SecretString"])
    for device_id, entry in pending.get("devices", {}).items():
        key = entry.get("key")
        if entry.get("enabled", True) and key and (not isinstance(key, str) or len(bytes.fromhex(key)) < KEY_BYTES):
            raise RotationError(f"pending version has no valid key for device {device_id}")


def finish_secret(client: Any, arn: str, token: str) -> None:
    metadata = client.describe_secret(SecretId=arn)
    current = _version_with_stage(metadata, "AWSCURRENT")
    if current == token:
        return
    client.update_secret_version_stage(
        SecretId=arn, VersionStage="AWSCURRENT", MoveToVersionId=token, RemoveFromVersionId=current
    )


STEPS = {"createSecret": create_secret, "setSecret": set_secret, "testSecret": test_secret, "finishSecret": finish_secret}


def rotate(event: Mapping[str, Any], client: Any) -> None:
    arn, token, step = event["SecretId"], event["ClientRequestToken"], event["Step"]
    metadata = client.describe_secret(SecretId=arn)
    if not metadata.get("RotationEnabled"):
        raise RotationError(f"rotation is not enabled for {arn}")
    stages = metadata["VersionIdsToStages"].get(token)
    if stages is None:
        raise RotationError(f"version {token} is not a version of {arn}")
    if "AWSCURRENT" in stages and step != "finishSecret":
        return
    if step not in STEPS:
        raise RotationError(f"unknown rotation step {step}")
    STEPS[step](client, arn, token)
    LOG.info("rotation step %s done for %s", step, arn)


def lambda_handler(event: Mapping[str, Any], context: Any) -> None:
    rotate(event, boto3.client("secretsmanager", endpoint_url=os.environ.get("SECRETS_MANAGER_ENDPOINT")))
