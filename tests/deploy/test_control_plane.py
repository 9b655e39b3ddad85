"""The control-plane API (control-plane.yaml + lambdas/control_plane) against moto's Secrets Manager.

The handler gets API Gateway v2 events (payload format 2.0) as the HTTP API sends them; what it
writes is then read back the way the gateways read it (connectors.aws.secrets and
gateway.auth.secrets_source), so "the old key keeps verifying" is checked on the gateway's own code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from cfnlint.decode import decode

from .conftest import CFN, load_handler

REGION = "us-east-1"


cp = load_handler("control_plane")
rotation = load_handler("key_rotation")


@pytest.fixture
def sm(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    yield boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_endpoint)
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=10).close()


@pytest.fixture
def secret(sm: Any) -> str:
    return sm.create_secret(Name="edge-gateway/devices", SecretString='{"devices": {}}')["ARN"]


def call(sm: Any, arn: str, route: str, device_id: str | None = None, body: Any = None, **extra: Any) -> tuple[int, dict, dict]:
    method, _, path = route.partition(" ")
    event = {
        "version": "2.0", "routeKey": route, "rawPath": path.replace("{device_id}", device_id or ""),
        "pathParameters": {"device_id": device_id} if device_id else None,
        "body": body if isinstance(body, str) or body is None else json.dumps(body), "isBase64Encoded": False,
        "requestContext": {"http": {"method": method}, "requestId": "r-1",
                           "authorizer": {"iam": {"userArn": "arn:aws:iam::123456789012:user/operator"}}},
    } | extra
    answer = cp.handle(event, {"DEVICE_KEYS_SECRET_ARN": arn}, sm)
    assert answer["headers"]["Content-Type"] == "application/json"
    return answer["statusCode"], json.loads(answer["body"]), answer["headers"]


def stages(sm: Any, arn: str) -> dict[str, str]:
    return {stage: v for v, labels in sm.describe_secret(SecretId=arn)["VersionIdsToStages"].items() for stage in labels}


def version(sm: Any, arn: str, stage: str) -> dict[str, Any]:
    # Read by version id, as the gateways do (moto's unqualified read lags a stage move).
    return json.loads(sm.get_secret_value(SecretId=arn, VersionId=stages(sm, arn)[stage])["SecretString"])


def gateway_registry(moto_endpoint: str, arn: str):
    """The devices a gateway builds from the secret (connectors.aws.secrets + gateway.auth.secrets_source): id -> Device."""
    from connectors.aws.secrets import SecretsManagerDeviceSource, SecretsManagerSettings
    from gateway.auth.secrets_source import devices_from_secrets

    async def read():
        source = SecretsManagerDeviceSource(SecretsManagerSettings(secret_ids=[arn], region=REGION, endpoint_url=moto_endpoint))
        try:
            return devices_from_secrets(await source.read())
        finally:
            await source.close()

    return asyncio.run(read())


# ---- the routes ----------------------------------------------------------------------------------


def test_register_list_and_get_never_show_a_key(sm: Any, secret: str):
    status, body, headers = call(sm, secret, "POST /devices", body={"device_id": "pump-7", "metadata": {"site": "plant-1"}})
    assert status == 201, body
    assert len(bytes.fromhex(body["key"])) == 32
    assert body["device_id"] == "pump-7" and body["enabled"] is True and body["metadata"] == {"site": "plant-1"}
    assert headers["Cache-Control"] == "no-store"
    stored = version(sm, secret, "AWSCURRENT")
    assert stored == {"devices": {"pump-7": {"key": body["key"], "enabled": True, "metadata": {"site": "plant-1"}}}}
    call(sm, secret, "POST /devices", body={"device_id": "pump-8"})
    status, listing, _ = call(sm, secret, "GET /devices")
    assert status == 200 and listing["count"] == 2
    assert [d["device_id"] for d in listing["devices"]] == ["pump-7", "pump-8"]
    assert all("key" not in d and d["has_key"] for d in listing["devices"])
    status, one, _ = call(sm, secret, "GET /devices/{device_id}", "pump-7")
    assert status == 200 and one == {"device_id": "pump-7", "enabled": True, "metadata": {"site": "plant-1"}, "has_key": True}
    assert "EDGE_GATEWAY_CONTROL_PLANE" not in stages(sm, secret)  # the write's private label is gone


def test_bad_requests_are_refused_with_reasons(sm: Any, secret: str):
    assert call(sm, secret, "POST /devices", body={"device_id": "bad id"})[0] == 400
    assert call(sm, secret, "POST /devices", body={"device_id": "x" * 129})[0] == 400
    assert call(sm, secret, "POST /devices", body={"device_id": "dev-1\n"})[0] == 400  # "$" alone would let it through
    assert call(sm, secret, "POST /devices", body={"device_id": "ok", "key": "chosen"})[1]["message"] == "unknown fields ['key']"
    assert call(sm, secret, "POST /devices", body={"device_id": "ok", "metadata": {"site": 7}})[0] == 400
    assert call(sm, secret, "POST /devices", body="{not json")[0] == 400
    assert call(sm, secret, "POST /devices", body="[1]")[0] == 400
    assert call(sm, secret, "POST /devices/{device_id}/rotate", "ghost")[0] == 404
    assert call(sm, secret, "GET /devices/{device_id}", "ghost")[0] == 404
    assert call(sm, secret, "DELETE /devices/{device_id}", "ghost")[0] == 404
    assert call(sm, secret, "POST /devices", body={"device_id": "dup"})[0] == 201
    status, body, _ = call(sm, secret, "POST /devices", body={"device_id": "dup"})
    assert (status, body["error"]) == (409, "conflict")
    assert version(sm, secret, "AWSCURRENT")["devices"].keys() == {"dup"}  # nothing half-written


def test_a_base64_body_is_read():
    import base64

    event = {"body": base64.b64encode(b'{"device_id": "b64"}').decode(), "isBase64Encoded": True}
    assert cp._body(event) == {"device_id": "b64"}


def test_rotation_keeps_the_old_key_verifying_on_the_gateway(sm: Any, secret: str, moto_endpoint: str):
    old = call(sm, secret, "POST /devices", body={"device_id": "pump-7"})[1]["key"]
    status, body, _ = call(sm, secret, "POST /devices/{device_id}/rotate", "pump-7")
    assert status == 200
    new = body["key"]
    assert new != old
    assert version(sm, secret, "AWSCURRENT")["devices"]["pump-7"]["key"] == new
    assert version(sm, secret, "AWSPREVIOUS")["devices"]["pump-7"]["key"] == old
    assert gateway_registry(moto_endpoint, secret)["pump-7"].keys == [new, old]


def test_other_writes_do_not_cut_a_rotated_keys_grace_short(sm: Any, secret: str, moto_endpoint: str):
    old = call(sm, secret, "POST /devices", body={"device_id": "pump-7"})[1]["key"]
    new = call(sm, secret, "POST /devices/{device_id}/rotate", "pump-7")[1]["key"]
    call(sm, secret, "POST /devices", body={"device_id": "pump-8"})
    call(sm, secret, "POST /devices/{device_id}/disable", "pump-8")
    devices = gateway_registry(moto_endpoint, secret)
    assert devices["pump-7"].keys == [new, old]  # the old key still verifies
    assert devices["pump-8"].enabled is False
    # The next rotation (any device's) ends the grace, as Secrets Manager's stages define it.
    call(sm, secret, "POST /devices/{device_id}/enable", "pump-8")
    call(sm, secret, "POST /devices/{device_id}/rotate", "pump-8")
    assert gateway_registry(moto_endpoint, secret)["pump-7"].keys == [new]


def test_disable_and_enable_reach_the_gateway(sm: Any, secret: str, moto_endpoint: str):
    call(sm, secret, "POST /devices", body={"device_id": "pump-7", "metadata": {"site": "north"}})
    status, body, _ = call(sm, secret, "POST /devices/{device_id}/disable", "pump-7")
    assert status == 200 and body["enabled"] is False
    device = gateway_registry(moto_endpoint, secret)["pump-7"]
    assert device.enabled is False and device.metadata == {"site": "north"}
    status, body, _ = call(sm, secret, "POST /devices/{device_id}/rotate", "pump-7")
    assert status == 409  # a disabled device gets no new key
    call(sm, secret, "POST /devices/{device_id}/enable", "pump-7")
    assert gateway_registry(moto_endpoint, secret)["pump-7"].enabled is True


def test_writes_wait_for_a_scheduled_rotation_in_progress(sm: Any, secret: str):
    call(sm, secret, "POST /devices", body={"device_id": "pump-7"})
    token = "00000000-0000-4000-8000-0000000000aa"
    rotation.create_secret(sm, secret, token)  # the scheduled rotation's first step: AWSPENDING
    status, body, headers = call(sm, secret, "POST /devices", body={"device_id": "pump-8"})
    assert status == 409 and "rotation" in body["message"] and headers["Retry-After"] == "30"
    assert call(sm, secret, "GET /devices")[0] == 200  # reads still work
    rotation.test_secret(sm, secret, token)
    rotation.finish_secret(sm, secret, token)
    assert call(sm, secret, "POST /devices", body={"device_id": "pump-8"})[0] == 201
    assert set(version(sm, secret, "AWSCURRENT")["devices"]) == {"pump-7", "pump-8"}


def test_the_scheduled_rotation_still_works_after_api_writes(sm: Any, secret: str):
    first = call(sm, secret, "POST /devices", body={"device_id": "pump-7"})[1]["key"]
    second = call(sm, secret, "POST /devices/{device_id}/rotate", "pump-7")[1]["key"]
    token = "00000000-0000-4000-8000-0000000000bb"
    for step in (rotation.create_secret, rotation.test_secret, rotation.finish_secret):  # as Secrets Manager drives them
        step(sm, secret, token)
    assert stages(sm, secret)["AWSCURRENT"] == token
    assert version(sm, secret, "AWSCURRENT")["devices"]["pump-7"]["key"] not in (first, second)
    assert version(sm, secret, "AWSPREVIOUS")["devices"]["pump-7"]["key"] == second
    assert call(sm, secret, "POST /devices", body={"device_id": "pump-8"})[0] == 201


class Interleaved:
    """A Secrets Manager client on which another writer moves AWSCURRENT just before our first move."""

    def __init__(self, sm: Any, arn: str) -> None:
        self.sm, self.arn, self.interfered = sm, arn, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sm, name)

    def update_secret_version_stage(self, **kwargs: Any) -> Any:
        if kwargs["VersionStage"] == "AWSCURRENT" and not self.interfered:
            self.interfered = True
            assert call(self.sm, self.arn, "POST /devices", body={"device_id": "racer"})[0] == 201
        return self.sm.update_secret_version_stage(**kwargs)


def test_concurrent_writes_lose_nothing(sm: Any, secret: str):
    racing = Interleaved(sm, secret)
    answer = cp.handle({"routeKey": "POST /devices", "body": json.dumps({"device_id": "pump-7"})},
                       {"DEVICE_KEYS_SECRET_ARN": secret}, racing)
    assert answer["statusCode"] == 201 and racing.interfered
    assert set(version(sm, secret, "AWSCURRENT")["devices"]) == {"racer", "pump-7"}


def test_a_full_registry_is_refused(sm: Any):
    big = {"devices": {f"dev-{i:04d}": {"key": "ab" * 32, "enabled": True, "metadata": {"note": "x" * 120}}
                       for i in range(300)}}
    arn = sm.create_secret(Name="full", SecretString=json.dumps(big))["ARN"]
    status, body, _ = call(sm, arn, "POST /devices", body={"device_id": "one-more", "metadata": {"note": "x" * 200}})
    assert (status, body["error"]) == (413, "registry_full")


def test_an_unreachable_registry_is_a_503():
    from botocore.config import Config

    closed = boto3.client("secretsmanager", region_name=REGION, endpoint_url="http://127.0.0.1:9",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1))
    answer = cp.handle({"routeKey": "GET /devices"}, {"DEVICE_KEYS_SECRET_ARN": "arn:aws:secretsmanager:x"}, closed)
    assert answer["statusCode"] == 503 and answer["headers"]["Retry-After"] == "5"


# ---- the template ----------------------------------------------------------------------------------


class Reached(Exception):
    pass


class Probe:
    """A Secrets Manager client that only records that the handler got as far as calling it."""

    def __getattr__(self, name: str) -> Any:
        raise Reached(name)


def template() -> dict[str, Any]:
    parsed, matches = decode(str(CFN / "control-plane.yaml"))
    assert not matches, matches
    return parsed["Resources"]


def test_every_route_needs_iam_and_reaches_the_function():
    resources = template()
    routes = {r["Properties"]["RouteKey"]: r["Properties"] for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Route"}
    handled = {"GET /devices", "POST /devices", "GET /devices/{device_id}", "POST /devices/{device_id}/rotate",
               "POST /devices/{device_id}/disable", "POST /devices/{device_id}/enable"}
    assert set(routes) == handled
    assert all(r["AuthorizationType"] == "AWS_IAM" for r in routes.values())
    for route in handled:  # the handler dispatches every route the API has (and reaches the registry)
        with pytest.raises(Reached):
            cp.route({"routeKey": route, "pathParameters": {"device_id": "d-1"}, "body": '{"device_id": "d-1"}'}, "arn", Probe())
    integration = [r for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Integration"][0]["Properties"]
    assert integration["IntegrationType"] == "AWS_PROXY" and integration["PayloadFormatVersion"] == "2.0"
    api = [r for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Api"][0]["Properties"]
    assert api["ProtocolType"] == "HTTP"


def test_the_stage_logs_and_throttles_and_the_function_is_wired():
    resources = template()
    stage = [r for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Stage"][0]["Properties"]
    assert "$context.identity.userArn" in stage["AccessLogSettings"]["Format"]
    assert stage["DefaultRouteSettings"]["ThrottlingRateLimit"] and stage["DefaultRouteSettings"]["ThrottlingBurstLimit"]
    function = resources["Function"]["Properties"]
    assert function["Code"] == "./lambdas/control_plane"
    assert (CFN / "lambdas" / "control_plane" / "handler.py").exists()
    assert function["Handler"] == "handler.lambda_handler"
    assert set(function["Environment"]["Variables"]) == {"DEVICE_KEYS_SECRET_ARN", "SECRETS_MANAGER_ENDPOINT"}
    actions = {a for s in resources["FunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
               for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    assert not {"secretsmanager:DeleteSecret", "secretsmanager:*", "secretsmanager:RotateSecret"} & actions


def test_the_root_stack_passes_the_registry_secret():
    parsed, _ = decode(str(CFN / "main.yaml"))
    params = parsed["Resources"]["ControlPlane"]["Properties"]["Parameters"]
    assert params["DeviceKeysSecretArn"] == {"Fn::GetAtt": ["Secrets", "Outputs.DeviceKeysSecretArn"]}
    assert params["SecretsKeyArn"] == {"Fn::GetAtt": ["Secrets", "Outputs.SecretsKeyArn"]}
