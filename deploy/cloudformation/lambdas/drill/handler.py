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

The drill's runbook (deploy/runbooks/az-failover.yaml, shared with the local drill `edge-gateway
drill`) is packaged beside this file as ``runbook.yaml``: ``validate`` never asks for fewer healthy
targets than its planned-shift floor, every log line names the runbook step of its action, and the
``runbook`` action returns the steps and thresholds this code runs under.
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
RUNBOOK_PATH = os.environ.get("DRILL_RUNBOOK_PATH") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "runbook.yaml")


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


class RunbookInvalid(DrillStepError):
    """The packaged runbook is missing or not in the form this reader understands."""


def _scalar(text: str) -> Any:
    if text[:1] == '"':
        return json.loads(text)
    if text[:1] == "'":
        return text[1:-1].replace("''", "'")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _without_comment(line: str) -> str:
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def read_runbook(text: str) -> dict[str, Any]:
    """The runbook's YAML (the Lambda runtime has no PyYAML): block mappings, one-line scalars and
    flow lists of scalars, which is all the runbook uses; anything else is refused, never guessed."""
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict[str, Any]]] = [(-1, root)]
    for number, raw in enumerate(text.splitlines(), 1):
        line = _without_comment(raw).rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, rest = line.strip().partition(":")
        if not sep or not key or key[0] in "-[{'\"&*!|>%@" or (rest and rest[0] != " "):
            raise RunbookInvalid(f"runbook line {number}: expected 'key: value', got {raw.strip()!r}")
        while indent <= stack[-1][0]:
            stack.pop()
        parent = stack[-1][1]
        if key in parent:
            raise RunbookInvalid(f"runbook line {number}: {key} given twice")
        rest = rest.strip()
        if not rest:
            parent[key] = child = {}
            stack.append((indent, child))
        elif rest[0] == "[":
            if not rest.endswith("]"):
                raise RunbookInvalid(f"runbook line {number}: a flow list must close on its line")
            inner = rest[1:-1].strip()
            parent[key] = [_scalar(item.strip()) for item in inner.split(",")] if inner else []
        elif rest[0] in "{|>&*!":
            raise RunbookInvalid(f"runbook line {number}: {rest[0]!r} is beyond the runbook's YAML")
        else:
            parent[key] = _scalar(rest)
    return root


_RUNBOOK: dict[str, Any] = {}


def runbook() -> dict[str, Any]:
    if not _RUNBOOK:
        try:
            with open(RUNBOOK_PATH, encoding="utf-8") as fh:
                document = read_runbook(fh.read())
        except OSError as exc:
            raise RunbookInvalid(f"cannot read the drill runbook {RUNBOOK_PATH}: {exc}") from exc
        if not isinstance(document.get("steps"), dict):
            raise RunbookInvalid(f"{RUNBOOK_PATH} has no steps")
        _RUNBOOK.update(document)
    return _RUNBOOK


def runbook_step(action: str) -> str:
    """The runbook step an action belongs to; a missing runbook never stops a rollback."""
    try:
        steps = runbook()["steps"]
    except RunbookInvalid as exc:
        LOG.warning(json.dumps({"action": action, "runbook_error": str(exc)}))
        return ""
    return next((step_id for step_id, step in steps.items() if action in step.get("cloud_actions", [])), "")


def _healthy_target_floor() -> int:
    """The runbook's planned-shift floor for ready instances outside the shifted zone."""
    try:
        return int(runbook()["steps"]["planned_shift"]["thresholds"]["min_ready_outside_shifted_zone"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunbookInvalid(f"{RUNBOOK_PATH}: no planned_shift threshold min_ready_outside_shifted_zone") from exc


ClientFactory = Callable[[str], Any]


def _client(service: str) -> Any:
    return boto3.client(service)


def _settings(env: Mapping[str, str], required: tuple[str, ...]) -> dict[str, str]:
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise DrillStepError(f"missing environment variables: {', '.join(missing)}")
    return {name: env[name] for name in required} | {"MIN_HEALTHY_TARGETS": env.get("MIN_HEALTHY_TARGETS", "1")}


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
    # The stack may ask for more healthy targets than the runbook's floor, never for fewer.
    needed = max(int(settings["MIN_HEALTHY_TARGETS"]), _healthy_target_floor())
    if healthy_outside < needed:
        raise ValidationFailed(
            f"{healthy_outside} healthy targets outside {settings['AWAY_FROM_AZ']}, need {needed} "
            f"(runbook {runbook().get('name')} v{runbook().get('version')}, step planned_shift)"
        )
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


def describe_runbook(event: Mapping[str, Any], settings: Mapping[str, str], client: ClientFactory) -> dict[str, Any]:
    """The steps and thresholds this function runs under (for operators: ``{"action": "runbook"}``)."""
    document = runbook()
    return {
        "name": document.get("name"), "version": document.get("version"), "blocking": document.get("blocking", {}),
        "steps": {step_id: {"title": step.get("title"), "cloud_states": step.get("cloud_states", []),
                            "thresholds": step.get("thresholds", {})} for step_id, step in document["steps"].items()},
    }


Step = Callable[[Mapping[str, Any], Mapping[str, str], ClientFactory], dict[str, Any]]

# Each action with the environment it needs.
ACTIONS: dict[str, tuple[Step, tuple[str, ...]]] = {
    "warm_standby": (warm_standby, ("LAKE_BUCKET", "DEVICE_KEYS_SECRET_ARN")),
    "standby_in_service": (standby_in_service, ("STANDBY_GROUP",)),
    "start_shift": (start_shift, ("LOAD_BALANCER_ARN", "AWAY_FROM_AZ")),
    "validate": (validate, ("TARGET_GROUP_ARN", "AWAY_FROM_AZ")),
    "cancel_shift": (cancel_shift, ()),
    "runbook": (describe_runbook, ()),
}


def handle(event: Mapping[str, Any], env: Mapping[str, str], client: ClientFactory = _client) -> dict[str, Any]:
    action = event.get("action")
    if action not in ACTIONS:
        raise UnknownAction(f"unknown action {action!r}")
    step, required = ACTIONS[action]
    result = step(event, _settings(env, required), client)
    LOG.info(json.dumps({"action": action, "runbook_step": runbook_step(action), "result": result}))
    return result


def lambda_handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    return handle(event, os.environ)
