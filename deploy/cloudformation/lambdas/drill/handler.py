"""Steps of the monthly AZ failover drill that the state machine cannot express as SDK calls.

The state machine (statemachines/drill.asl.json) scales capacity, reads alarms and publishes the
result itself; it calls this code with ``{"action": ...}``. Two functions run it: the standby
function, placed in the isolated standby subnet of AZ C, for

- ``warm_standby``: prove the standby connectors in AZ C can reach what ingestion needs (the lake
  bucket through the S3 gateway endpoint, the device key registry through its interface endpoint);
- ``standby_in_service``: enough standby instances are in service and healthy;

and the control function, in the app subnets, for

- ``start_shift``: start an ARC zonal shift of the ALB away from AZ A.
- ``validate``: the synthetic check: enough healthy targets outside AZ A, none left serving in it.
- ``cancel_shift``: end the zonal shift (rollback); a shift that already ended is not an error.

Failures raise ``DrillStepError`` subclasses; their class name is the Step Functions error name,
which the state machine's ``Catch`` routes to the rollback.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

LOG = logging.getLogger()
LOG.setLevel(os.environ.get("LOG_LEVEL", "INFO"))

# Long enough for the drill's observation window; ARC caps a shift at 3 days.
SHIFT_EXPIRES_IN = os.environ.get("SHIFT_EXPIRES_IN", "2h")


class DrillStepError(Exception):
    """Base of every error this function raises on purpose."""


class StandbyNotReady(DrillStepError):
    """A dependency of the standby path is unreachable."""


class ShiftFailed(DrillStepError):
    """ARC refused or failed to start the zonal shift."""


class ValidationFailed(DrillStepError):
    """Ingestion is not healthy without AZ A."""


class UnknownAction(DrillStepError):
    """The state machine asked for an action this function does not know."""


ClientFactory = Callable[[str], Any]


def _client(service: str) -> Any:
    return boto3.client(service)


def _settings(env: Mapping[str, str], required: tuple[str, ...]) -> dict[str, str]:
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise DrillStepError(f"missing environment variables: {', '.join(missing)}")
    return {name: env[name] for name in required} | {"MIN_HEALTHY_TARGETS": env.get("MIN_HEALTHY_TARGETS", "2")}


def zone_id_for(ec2: Any, zone_name: str) -> str:
    """ARC names zones by ID (use1-az1), which differ per account from names (us-east-1a)."""
    zones = ec2.describe_availability_zones(ZoneNames=[zone_name])["AvailabilityZones"]
    if not zones:
        raise DrillStepError(f"unknown availability zone {zone_name}")
    return zones[0]["ZoneId"]


def warm_standby(event: Mapping[str, Any], settings: Mapping[str, str], client: ClientFactory) -> dict[str, Any]:
    checks: dict[str, str] = {}
    try:
        client("s3").head_bucket(Bucket=settings["LAKE_BUCKET"])
        checks["lake_bucket"] = "ok"
        client("secretsmanager").describe_secret(SecretId=settings["DEVICE_KEYS_SECRET_ARN"])
        checks["device_keys"] = "ok"
    except (ClientError, BotoCoreError) as exc:
        raise StandbyNotReady(f"standby path check failed after {sorted(checks)}: {exc}") from exc
    return {"ready": True, "checks": checks}


def standby_in_service(event: Mapping[str, Any], settings: Mapping[str, str], client: ClientFactory) -> dict[str, Any]:
    wanted = int(event.get("wanted", 1))
    groups = client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[settings["STANDBY_GROUP"]])[
        "AutoScalingGroups"
    ]
    if not groups:
        raise StandbyNotReady(f"standby group {settings['STANDBY_GROUP']} does not exist")
    in_service = sum(
        1
        for instance in groups[0]["Instances"]
        if instance["LifecycleState"] == "InService" and instance["HealthStatus"] == "Healthy"
    )
    if in_service < wanted:
        raise StandbyNotReady(f"{in_service} standby instances in service, need {wanted}")
    return {"inService": in_service, "wanted": wanted}


def start_shift(event: Mapping[str, Any], settings: Mapping[str, str], client: ClientFactory) -> dict[str, Any]:
    away_from = zone_id_for(client("ec2"), settings["AWAY_FROM_AZ"])
    try:
        shift = client("arc-zonal-shift").start_zonal_shift(
            resourceIdentifier=settings["LOAD_BALANCER_ARN"],
            awayFrom=away_from,
            expiresIn=SHIFT_EXPIRES_IN,
            comment=f"failover drill {event.get('execution', '')}"[:128],
        )
    except (ClientError, BotoCoreError) as exc:
        raise ShiftFailed(f"could not shift away from {away_from}: {exc}") from exc
    return {"zonalShiftId": shift["zonalShiftId"], "awayFrom": away_from, "status": shift.get("status", "ACTIVE")}


def validate(event: Mapping[str, Any], settings: Mapping[str, str], client: ClientFactory) -> dict[str, Any]:
    descriptions = client("elbv2").describe_target_health(TargetGroupArn=settings["TARGET_GROUP_ARN"])[
        "TargetHealthDescriptions"
    ]
    ec2 = client("ec2")
    healthy_outside = 0
    for description in descriptions:
        if description["TargetHealth"]["State"] != "healthy":
            continue
        zone = description.get("AvailabilityZone") or _instance_zone(ec2, description["Target"]["Id"])
        if zone != settings["AWAY_FROM_AZ"]:
            healthy_outside += 1
    needed = int(settings["MIN_HEALTHY_TARGETS"])
    if healthy_outside < needed:
        raise ValidationFailed(f"{healthy_outside} healthy targets outside {settings['AWAY_FROM_AZ']}, need {needed}")
    return {"healthyOutside": healthy_outside}


def _instance_zone(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["Placement"]["AvailabilityZone"]


def cancel_shift(event: Mapping[str, Any], settings: Mapping[str, str], client: ClientFactory) -> dict[str, Any]:
    shift = event.get("shift") or {}
    shift_id = (shift.get("Payload") or shift).get("zonalShiftId") if isinstance(shift, Mapping) else None
    if not shift_id:
        return {"cancelled": False, "reason": "no shift was started"}
    try:
        client("arc-zonal-shift").cancel_zonal_shift(zonalShiftId=shift_id)
    except ClientError as exc:
        # An expired or already cancelled shift leaves nothing to roll back.
        if exc.response["Error"]["Code"] in {"ResourceNotFoundException", "ConflictException"}:
            return {"cancelled": False, "reason": exc.response["Error"]["Code"]}
        raise
    return {"cancelled": True, "zonalShiftId": shift_id}


Step = Callable[[Mapping[str, Any], Mapping[str, str], ClientFactory], dict[str, Any]]

# Each action with the environment it needs.
ACTIONS: dict[str, tuple[Step, tuple[str, ...]]] = {
    "warm_standby": (warm_standby, ("LAKE_BUCKET", "DEVICE_KEYS_SECRET_ARN")),
    "standby_in_service": (standby_in_service, ("STANDBY_GROUP",)),
    "start_shift": (start_shift, ("LOAD_BALANCER_ARN", "AWAY_FROM_AZ")),
    "validate": (validate, ("TARGET_GROUP_ARN", "AWAY_FROM_AZ")),
    "cancel_shift": (cancel_shift, ()),
}


def handle(event: Mapping[str, Any], env: Mapping[str, str], client: ClientFactory = _client) -> dict[str, Any]:
    action = event.get("action")
    if action not in ACTIONS:
        raise UnknownAction(f"unknown action {action!r}")
    step, required = ACTIONS[action]
    result = step(event, _settings(env, required), client)
    LOG.info(json.dumps({"action": action, "result": result}))
    return result


def lambda_handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    return handle(event, os.environ)
