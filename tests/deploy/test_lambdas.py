"""The Lambda handlers of the drill, the enrichment hand-off and the key rotation, against moto's server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from .conftest import load_handler

REGION = "us-east-1"


drill = load_handler("drill")
partitions = load_handler("partitions")
rotation = load_handler("key_rotation")


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(key, value)

    def client(service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=moto_endpoint)

    yield client
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=10).close()


# ---- drill ---------------------------------------------------------------------------------------

def standby_env(aws: Any) -> dict[str, str]:
    aws("s3").create_bucket(Bucket="lake")
    secret = aws("secretsmanager").create_secret(Name="device-keys", SecretString="{}")["ARN"]
    return {"LAKE_BUCKET": "lake", "DEVICE_KEYS_SECRET_ARN": secret, "STANDBY_GROUP": "standby"}


def test_warm_standby_reaches_the_lake_and_the_registry(aws: Any):
    result = drill.handle({"action": "warm_standby"}, standby_env(aws), aws)
    assert result == {"ready": True, "checks": {"lake_bucket": "ok", "device_keys": "ok"}}


def test_warm_standby_fails_when_the_lake_is_unreachable(aws: Any):
    env = standby_env(aws) | {"LAKE_BUCKET": "missing-bucket"}
    with pytest.raises(drill.StandbyNotReady):
        drill.handle({"action": "warm_standby"}, env, aws)


def make_group(aws: Any, desired: int) -> None:
    aws("ec2").create_launch_template(
        LaunchTemplateName="standby-template", LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c7i.large"}
    )
    aws("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName="standby", LaunchTemplate={"LaunchTemplateName": "standby-template"},
        MinSize=0, MaxSize=5, DesiredCapacity=desired, AvailabilityZones=[f"{REGION}c"],
    )


def test_standby_in_service_counts_healthy_instances(aws: Any):
    make_group(aws, 2)
    env = standby_env(aws)
    assert drill.handle({"action": "standby_in_service", "wanted": 2}, env, aws) == {"inService": 2, "wanted": 2}
    with pytest.raises(drill.StandbyNotReady, match="2 standby instances in service, need 3"):
        drill.handle({"action": "standby_in_service", "wanted": 3}, env, aws)


def test_validate_counts_only_targets_outside_zone_a(aws: Any):
    ec2 = aws("ec2")
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    elbv2 = aws("elbv2")
    group = elbv2.create_target_group(Name="gateway", Protocol="HTTP", Port=8080, VpcId=vpc)["TargetGroups"][0]["TargetGroupArn"]
    ids = {}
    for zone in ("a", "c", "c"):
        subnet = [s for s in ec2.describe_subnets()["Subnets"] if s["AvailabilityZone"] == f"{REGION}{zone}"][0]["SubnetId"]
        instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet)["Instances"][0]
        ids.setdefault(zone, []).append(instance["InstanceId"])
    elbv2.register_targets(TargetGroupArn=group, Targets=[{"Id": i} for zone in ids.values() for i in zone])
    env = {"TARGET_GROUP_ARN": group, "AWAY_FROM_AZ": f"{REGION}a", "MIN_HEALTHY_TARGETS": "2"}
    assert drill.handle({"action": "validate"}, env, aws) == {"healthyOutside": 2}
    with pytest.raises(drill.ValidationFailed):
        drill.handle({"action": "validate"}, env | {"MIN_HEALTHY_TARGETS": "3"}, aws)


def arc_client() -> tuple[Any, Stubber]:
    client = boto3.client("arc-zonal-shift", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    return client, Stubber(client)


def test_start_shift_moves_the_load_balancer_away_from_zone_a_by_zone_id(aws: Any):
    arc, stub = arc_client()
    zone_id = aws("ec2").describe_availability_zones(ZoneNames=[f"{REGION}a"])["AvailabilityZones"][0]["ZoneId"]
    stub.add_response(
        "start_zonal_shift",
        {"zonalShiftId": "zs-0001", "resourceIdentifier": "arn:aws:elasticloadbalancing:lb", "awayFrom": zone_id,
         "expiryTime": "2030-01-01T00:00:00Z", "startTime": "2030-01-01T00:00:00Z", "status": "ACTIVE", "comment": "c"},
        {"resourceIdentifier": "arn:aws:elasticloadbalancing:lb", "awayFrom": zone_id, "expiresIn": "2h",
         "comment": "failover drill run-1"},
    )
    env = {"LOAD_BALANCER_ARN": "arn:aws:elasticloadbalancing:lb", "AWAY_FROM_AZ": f"{REGION}a"}
    with stub:
        result = drill.handle({"action": "start_shift", "execution": "run-1"}, env,
                              lambda s: arc if s == "arc-zonal-shift" else aws(s))
    assert result == {"zonalShiftId": "zs-0001", "awayFrom": zone_id, "status": "ACTIVE"}
    stub.assert_no_pending_responses()


def test_start_shift_failure_is_a_shift_failed_error(aws: Any):
    arc, stub = arc_client()
    stub.add_client_error("start_zonal_shift", service_error_code="ConflictException", http_status_code=409)
    env = {"LOAD_BALANCER_ARN": "arn:aws:elasticloadbalancing:lb", "AWAY_FROM_AZ": f"{REGION}a"}
    with stub, pytest.raises(drill.ShiftFailed):
        drill.handle({"action": "start_shift"}, env, lambda s: arc if s == "arc-zonal-shift" else aws(s))


def test_cancel_shift_is_idempotent():
    arc, stub = arc_client()
    stub.add_response("cancel_zonal_shift", {"zonalShiftId": "zs-0001", "resourceIdentifier": "arn:aws:elasticloadbalancing:lb", "awayFrom": "use1-az6",
                                             "expiryTime": "2030-01-01T00:00:00Z", "startTime": "2030-01-01T00:00:00Z",
                                             "status": "CANCELED", "comment": "c"}, {"zonalShiftId": "zs-0001"})
    stub.add_client_error("cancel_zonal_shift", service_error_code="ResourceNotFoundException", http_status_code=404)
    with stub:
        assert drill.handle({"action": "cancel_shift", "shift": {"zonalShiftId": "zs-0001"}}, {}, lambda s: arc) == {
            "cancelled": True, "zonalShiftId": "zs-0001"}
        assert drill.handle({"action": "cancel_shift", "shift": {"zonalShiftId": "zs-0001"}}, {}, lambda s: arc)["cancelled"] is False
    assert drill.handle({"action": "cancel_shift"}, {}, lambda s: arc) == {"cancelled": False, "reason": "no shift was started"}


def test_unknown_action_and_missing_environment_are_errors():
    with pytest.raises(drill.UnknownAction):
        drill.handle({"action": "explode"}, {}, lambda s: None)
    with pytest.raises(drill.DrillStepError, match="LAKE_BUCKET"):
        drill.handle({"action": "warm_standby"}, {}, lambda s: None)


# ---- enrichment hand-off: partition registrar ----------------------------------------------------

KEY = "curated/telemetry/dt=2026-03-01/hour=07/gw-1-100-199-qzkbwmea.parquet"


def test_parse_key_follows_the_lake_layout():
    assert partitions.parse_key(KEY) == {"zone": "curated", "dataset": "telemetry", "dt": "2026-03-01", "hour": "07",
                                         "gateway_id": "gw-1", "first_seq": "100", "last_seq": "199", "tag": "qzkbwmea", "ext": "parquet"}
    # An object an earlier version landed has no tag.
    assert partitions.parse_key(KEY.replace("-qzkbwmea", ""))["tag"] is None
    assert partitions.parse_key(KEY.replace("-qzkbwmea", ""))["gateway_id"] == "gw-1"
    for bad in ("curated/telemetry/dt=2026-03-01/hour=24/gw-1-1-2.parquet", "raw/telemetry/dt=2026-03-01/hour=07/gw-1-1-2.parquet",
                "scratch/file.txt", "curated/telemetry/2026/gw-1-1-2.parquet"):
        with pytest.raises(partitions.NotALakeObject):
            partitions.parse_key(bad)


def test_register_creates_the_partition_once(aws: Any):
    glue = aws("glue")
    glue.create_database(DatabaseInput={"Name": "lake_db"})
    glue.create_table(DatabaseName="lake_db", TableInput={
        "Name": "curated_telemetry", "PartitionKeys": [{"Name": "dt", "Type": "string"}, {"Name": "hour", "Type": "string"}],
        "StorageDescriptor": {"Columns": [{"Name": "device_id", "Type": "string"}], "Location": "s3://lake/curated/telemetry/"}})
    env = {"LAKE_DATABASE": "lake_db"}
    event = {"detail": {"bucket": {"name": "lake"}, "object": {"key": KEY}}}
    first = partitions.register(event, env, glue)
    assert first["created"] is True
    assert first["partition"] == {"dt": "2026-03-01", "hour": "07"}
    assert partitions.register(event, env, glue)["created"] is False
    assert first["table"] == "curated_telemetry"
    stored = glue.get_partition(DatabaseName="lake_db", TableName="curated_telemetry", PartitionValues=["2026-03-01", "07"])
    assert stored["Partition"]["StorageDescriptor"]["Location"] == "s3://lake/curated/telemetry/dt=2026-03-01/hour=07/"


# ---- device key rotation -------------------------------------------------------------------------

REGISTRY = {"devices": {"dev-1": {"key": "aa" * 32, "enabled": True, "metadata": {"site": "north"}},
                        "dev-2": {"key": "bb" * 32, "enabled": False, "metadata": {}},
                        "dev-3": {"key": "", "enabled": True, "metadata": {}}}}


def test_rotation_keeps_previous_keys_and_promotes_the_new_version(aws: Any):
    sm = aws("secretsmanager")
    arn = sm.create_secret(Name="registry", SecretString=json.dumps(REGISTRY))["ARN"]
    token = "00000000-0000-4000-8000-000000000001"
    rotation.create_secret(sm, arn, token)
    rotation.create_secret(sm, arn, token)  # a retried step changes nothing
    rotation.test_secret(sm, arn, token)
    rotation.finish_secret(sm, arn, token)
    stages = sm.describe_secret(SecretId=arn)["VersionIdsToStages"]
    assert "AWSCURRENT" in stages[token] and len([v for v in stages.values() if "AWSPREVIOUS" in v]) == 1
    # Read by version: moto's unqualified read keeps returning the first version after a stage move.
    current = json.loads(sm.get_secret_value(SecretId=arn, VersionId=token)["SecretString"])
    new_key = current["devices"]["dev-1"]["key"]
    assert new_key != "aa" * 32 and len(bytes.fromhex(new_key)) == 32
    assert current["devices"]["dev-1"]["metadata"] == {"site": "north"}
    assert current["devices"]["dev-2"] == REGISTRY["devices"]["dev-2"]  # disabled devices keep their key
    assert current["devices"]["dev-3"] == REGISTRY["devices"]["dev-3"]  # certificate-only devices have none
    # The gateway keeps accepting the old key: it is the AWSPREVIOUS version.
    previous = [v for v, labels in stages.items() if "AWSPREVIOUS" in labels][0]
    assert json.loads(sm.get_secret_value(SecretId=arn, VersionId=previous)["SecretString"]) == REGISTRY


def test_rotation_refuses_a_secret_without_rotation(aws: Any):
    sm = aws("secretsmanager")
    arn = sm.create_secret(Name="registry", SecretString=json.dumps(REGISTRY))["ARN"]
    with pytest.raises(rotation.RotationError, match="not enabled"):
        rotation.rotate({"SecretId": arn, "ClientRequestToken": "t" * 32, "Step": "createSecret"}, sm)


def test_rotation_test_step_rejects_a_short_key(aws: Any):
    sm = aws("secretsmanager")
    broken = {"devices": {"dev-1": {"key": "abcd", "enabled": True, "metadata": {}}}}
    arn = sm.create_secret(Name="registry", SecretString=json.dumps(REGISTRY))["ARN"]
    sm.put_secret_value(SecretId=arn, ClientRequestToken="00000000-0000-4000-8000-000000000002", SecretString=json.dumps(broken),
                        VersionStages=["AWSPENDING"])
    with pytest.raises(rotation.RotationError, match="dev-1"):
        rotation.test_secret(sm, arn, "00000000-0000-4000-8000-000000000002")

