"""The failover drill's state machine, executed by moto's Step Functions interpreter.

Deploys what moto supports of the drill (standby Auto Scaling group behind a target group, gate
alarms, freeze parameter, lake bucket, device key secret, topic, bus, the two drill functions with
the environment drill.yaml gives them), renders drill.asl.json with its substitutions and runs it:
the standby capacity rises during the drill and the rollback restores it, including when a step fails.
While shifted the drill reads the ALB's request counts per zone from CloudWatch: the test publishes
them, as the ALB would, the moment the shift starts.

moto's Lambda without Docker only echoes; here its invoke runs the real drill handler in process
against the same moto backends, with a recording stand-in for ARC (moto has no zonal shift API), and
turns a raised error into a Lambda function error the state machine's Catch sees.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from datetime import datetime, timedelta, timezone
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import importlib.util
import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.awslambda_simple.models import LambdaSimpleBackend

from .conftest import CFN

_spec = importlib.util.spec_from_file_location("drill_handler", CFN / "lambdas" / "drill" / "handler.py")
assert _spec is not None and _spec.loader is not None
drill_handler = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drill_handler)

REGION = "us-east-1"
# The observed window must hold the request counts published when the shift starts.
SETTINGS = {"settings": {"standby_capacity": 3, "settle_seconds": 0, "shift_settle_seconds": 0, "observe_seconds": 2,
                         "max_shifted_zone_minutes": 0}}
LOAD_BALANCER = "app/edge-gateway-test/0123456789abcdef"


class FakeZonalShift:
    """Stands in for the arc-zonal-shift client; records shifts and can refuse to start one."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}
        self.started: list[dict[str, Any]] = []
        self.refuse = False
        # Requests per zone letter the ALB serves once the shift has started.
        self.traffic_after_shift: dict[str, float] = {"a": 0, "b": 120, "c": 95}

    def start_zonal_shift(self, **kwargs: Any) -> dict[str, Any]:
        if self.refuse:
            raise ClientError({"Error": {"Code": "ConflictException", "Message": "practice run in progress"}}, "StartZonalShift")
        shift_id = f"shift-{len(self.started) + 1}"
        self.started.append(kwargs)
        publish_requests(self.traffic_after_shift)
        self.active[shift_id] = kwargs["awayFrom"]
        return {"zonalShiftId": shift_id, "status": "ACTIVE"}

    def cancel_zonal_shift(self, zonalShiftId: str) -> dict[str, Any]:
        if self.active.pop(zonalShiftId, None) is None:
            raise ClientError({"Error": {"Code": "ResourceNotFoundException", "Message": "no such shift"}}, "CancelZonalShift")
        return {"zonalShiftId": zonalShiftId, "status": "CANCELED"}


def publish_requests(per_zone: dict[str, float]) -> None:
    """AWS/ApplicationELB RequestCount as the ALB publishes it: per zone, and for the load balancer."""
    when = datetime.now(timezone.utc) + timedelta(seconds=1)
    data = [{"MetricName": "RequestCount", "Timestamp": when, "Value": count, "Unit": "Count",
             "Dimensions": [{"Name": "LoadBalancer", "Value": LOAD_BALANCER}, {"Name": "AvailabilityZone", "Value": f"{REGION}{zone}"}]}
            for zone, count in per_zone.items() if count]
    if data:  # no requests, no datapoint
        data.append({"MetricName": "RequestCount", "Timestamp": when, "Value": sum(per_zone.values()), "Unit": "Count",
                     "Dimensions": [{"Name": "LoadBalancer", "Value": LOAD_BALANCER}]})
        boto3.client("cloudwatch", region_name=REGION).put_metric_data(Namespace="AWS/ApplicationELB", MetricData=data)


def run_handler_in_process(arc: FakeZonalShift):
    def invoke(self: LambdaSimpleBackend, function_name: str, qualifier: Any, body: Any, headers: Any, response_headers: Any):
        function = self.get_function(function_name, qualifier)
        env = dict(function.environment_vars)

        def client(service: str) -> Any:
            return arc if service == "arc-zonal-shift" else boto3.client(service, region_name=REGION)

        try:
            result = drill_handler.handle(json.loads(body or "{}"), env, client)
        except Exception as exc:  # noqa: BLE001 - every raised error becomes a function error, as in Lambda
            response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps({"errorType": type(exc).__name__, "errorMessage": str(exc)}).encode()
        return json.dumps(result).encode()

    return invoke


@dataclass
class Drill:
    clients: dict[str, Any]
    state_machine_arn: str
    names: dict[str, str]
    arc: FakeZonalShift

    def run(self, name: str) -> dict[str, Any]:
        sfn = self.clients["stepfunctions"]
        execution = sfn.start_execution(stateMachineArn=self.state_machine_arn, name=name, input=json.dumps(SETTINGS))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            described = sfn.describe_execution(executionArn=execution["executionArn"])
            if described["status"] != "RUNNING":
                break
            time.sleep(0.05)
        history = sfn.get_execution_history(executionArn=execution["executionArn"], maxResults=1000)["events"]
        return {"status": described["status"], "error": described.get("error"), "history": history}

    def standby_desired(self) -> int:
        groups = self.clients["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=[self.names["standby"]])
        return groups["AutoScalingGroups"][0]["DesiredCapacity"]

    def set_alarm(self, name: str, state: str) -> None:
        self.clients["cloudwatch"].set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")


def last_output(history: list[dict[str, Any]]) -> dict[str, Any]:
    exits = [e["stateExitedEventDetails"] for e in history if "stateExitedEventDetails" in e]
    return json.loads(exits[-1]["output"])


def entered(history: list[dict[str, Any]]) -> list[str]:
    return [e["stateEnteredEventDetails"]["name"] for e in history if "stateEnteredEventDetails" in e]


def scalar(value: Any) -> Any:
    # moto's JSONPath returns a one-element list where Step Functions returns the element.
    return value[0] if isinstance(value, list) else value


def function_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(CFN / "lambdas" / "drill" / "handler.py", "handler.py")
    return buffer.getvalue()


@pytest.fixture
def drill(monkeypatch: pytest.MonkeyPatch) -> Iterator[Drill]:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    arc = FakeZonalShift()
    monkeypatch.setattr(LambdaSimpleBackend, "invoke", run_handler_in_process(arc))
    config = {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}
    with mock_aws(config=config):
        names = {"standby": "edge-gateway-test-standby", "blocking": "drill-blocking", "outcome": "drill-outcome",
                 "freeze": "/edge-gateway/test/drill/freeze"}
        clients = {s: boto3.client(s, region_name=REGION) for s in
                   ("ec2", "autoscaling", "cloudwatch", "ssm", "sns", "events", "lambda", "iam", "stepfunctions",
                    "elbv2", "s3", "secretsmanager")}
        vpc = clients["ec2"].describe_vpcs()["Vpcs"][0]["VpcId"]
        target_group = clients["elbv2"].create_target_group(Name="gateway", Protocol="HTTP", Port=8080, VpcId=vpc)[
            "TargetGroups"][0]["TargetGroupArn"]
        clients["ec2"].create_launch_template(
            LaunchTemplateName="standby-template", LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c7i.large"}
        )
        clients["autoscaling"].create_auto_scaling_group(
            AutoScalingGroupName=names["standby"], LaunchTemplate={"LaunchTemplateName": "standby-template"},
            MinSize=0, MaxSize=6, DesiredCapacity=0, AvailabilityZones=[f"{REGION}c"], TargetGroupARNs=[target_group],
        )
        clients["s3"].create_bucket(Bucket="edge-gateway-test-lake")
        secret = clients["secretsmanager"].create_secret(Name="device-keys", SecretString='{"version": 1, "devices": {}}')["ARN"]
        for alarm in (names["blocking"], names["outcome"]):
            clients["cloudwatch"].put_metric_alarm(
                AlarmName=alarm, Namespace="EdgeGateway", MetricName="edge_gateway_wal_oldest_unlanded_age_seconds",
                Statistic="Maximum", Period=60, EvaluationPeriods=1, Threshold=900, ComparisonOperator="GreaterThanThreshold",
            )
            clients["cloudwatch"].set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="healthy")
        clients["ssm"].put_parameter(Name=names["freeze"], Value="false", Type="String")
        topic = clients["sns"].create_topic(Name="alerts")["TopicArn"]
        clients["events"].create_event_bus(Name="edge-gateway-test")
        role = clients["iam"].create_role(RoleName="drill", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        # The environment drill.yaml gives each function.
        environments = {
            "standby": {"LAKE_BUCKET": "edge-gateway-test-lake", "DEVICE_KEYS_SECRET_ARN": secret, "STANDBY_GROUP": names["standby"]},
            "control": {"LOAD_BALANCER_ARN": target_group.replace("targetgroup/gateway", "loadbalancer/app/edge"),
                        "TARGET_GROUP_ARN": target_group, "AWAY_FROM_AZ": f"{REGION}a", "MIN_HEALTHY_TARGETS": "2"},
        }
        functions = {}
        for kind, variables in environments.items():
            functions[kind] = clients["lambda"].create_function(
                FunctionName=f"drill-{kind}", Runtime="python3.12", Role=role, Handler="handler.lambda_handler",
                Code={"ZipFile": function_zip()}, Environment={"Variables": variables},
            )["FunctionArn"]
        definition = (CFN / "statemachines" / "drill.asl.json").read_text()
        substitutions = {
            "FreezeParameterName": names["freeze"], "BlockingAlarmName": names["blocking"],
            "OutcomeAlarmName": names["outcome"], "StandbyGroupName": names["standby"],
            "StandbyFunctionArn": functions["standby"], "ControlFunctionArn": functions["control"],
            "AlertTopicArn": topic, "EventBusName": "edge-gateway-test",
            "LoadBalancerFullName": LOAD_BALANCER, "ZoneA": f"{REGION}a",
        }
        for key, value in substitutions.items():
            definition = definition.replace("${%s}" % key, value)
        assert "${" not in definition
        machine = clients["stepfunctions"].create_state_machine(name="az-drill", definition=definition, roleArn=role)
        yield Drill(clients, machine["stateMachineArn"], names, arc)


def test_drill_passes_scales_standby_up_and_restores_it(drill: Drill):
    result = drill.run("passes")
    assert result["status"] == "SUCCEEDED", result
    final = last_output(result["history"])
    assert final["outcome"]["result"] == "passed"
    assert scalar(final["baseline"]["desired"]) == 0
    assert scalar(final["standby"]["desired"]) == 3  # capacity rose during the drill
    assert drill.standby_desired() == 0  # and the rollback restored it
    assert final["standbyReady"]["result"] == {"inService": 3, "wanted": 3}
    assert final["validation"]["result"]["healthyOutside"] == 3
    # Requests left zone A once the shift had settled, and went on in the other zones.
    assert final["observed"]["shiftedZone"]["minutesWithRequests"] == 0
    assert final["observed"]["allZones"]["minutesWithRequests"] >= 1
    states = entered(result["history"])
    assert states.index("ScaleUpStandby") < states.index("ShiftAwayFromZoneA") < states.index("CancelShift")
    assert states.index("CancelShift") < states.index("RestoreStandby") < states.index("PublishResult")
    assert [s["awayFrom"] for s in drill.arc.started] == ["use1-az6"]
    assert drill.arc.active == {}  # the shift was cancelled


def test_drill_rolls_back_when_ingestion_degrades(drill: Drill):
    drill.set_alarm(drill.names["outcome"], "ALARM")
    result = drill.run("degraded")
    assert result["status"] == "FAILED"
    assert result["error"] == "DrillFailed"
    final = last_output(result["history"])
    assert final["outcome"]["reason"].startswith("ingestion was not shown to leave zone A")
    assert final["outcome"]["observed"]["alarm"]["metricInAlarm"] is True
    assert scalar(final["standby"]["desired"]) == 3
    assert "ValidateIngestion" not in entered(result["history"])
    assert {"CancelShift", "RestoreStandby"} <= set(entered(result["history"]))
    assert drill.arc.active == {}
    assert drill.standby_desired() == 0


def test_drill_fails_when_requests_still_reach_the_shifted_zone(drill: Drill):
    drill.arc.traffic_after_shift = {"a": 40, "b": 120, "c": 95}  # the shift did not take traffic away
    result = drill.run("zone-still-serving")
    assert result["status"] == "FAILED" and result["error"] == "DrillFailed"
    final = last_output(result["history"])
    assert final["outcome"]["result"] == "failed"
    assert final["outcome"]["observed"]["shiftedZone"]["minutesWithRequests"] == 1
    assert final["outcome"]["observed"]["shiftedZone"]["requests"] == [40]
    assert "ValidateIngestion" not in entered(result["history"])
    assert drill.arc.active == {} and drill.standby_desired() == 0  # rolled back all the same


def test_drill_fails_when_no_requests_are_served_while_shifted(drill: Drill):
    drill.arc.traffic_after_shift = {"a": 0, "b": 0, "c": 0}  # nothing proves ingestion went on elsewhere
    result = drill.run("no-traffic")
    assert result["status"] == "FAILED"
    assert "ValidateIngestion" not in entered(result["history"])
    assert drill.arc.active == {}


def test_drill_rolls_back_when_a_step_fails(drill: Drill):
    drill.arc.refuse = True
    result = drill.run("step-fails")
    assert result["status"] == "FAILED"
    final = last_output(result["history"])
    assert final["outcome"]["result"] == "failed"
    assert final["outcome"]["reason"] == "ShiftFailed"
    assert scalar(final["standby"]["desired"]) == 3
    states = entered(result["history"])
    assert "RestoreStandby" in states and "CancelShift" not in states  # no shift was started
    assert drill.standby_desired() == 0


def test_drill_is_skipped_while_a_blocking_alarm_fires(drill: Drill):
    drill.set_alarm(drill.names["blocking"], "ALARM")
    result = drill.run("blocked")
    assert result["status"] == "SUCCEEDED"
    assert last_output(result["history"])["outcome"]["result"] == "skipped"
    assert "ScaleUpStandby" not in entered(result["history"])
    assert drill.standby_desired() == 0


def test_drill_is_skipped_during_a_change_freeze(drill: Drill):
    drill.clients["ssm"].put_parameter(Name=drill.names["freeze"], Value="true", Type="String", Overwrite=True)
    result = drill.run("frozen")
    assert result["status"] == "SUCCEEDED"
    assert last_output(result["history"])["outcome"]["reason"] == "change freeze is on"
    assert "CheckBlockingAlarms" not in entered(result["history"])
