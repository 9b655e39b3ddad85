"""The OpenAPI document: shipped, served, and true (schemathesis checks the live gateway against it)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

import pytest
import schemathesis
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from tests.gateway.conftest import GatewayProcess, free_port, make_env


def test_document_is_shipped_and_describes_the_device_api():
    doc = yaml.safe_load(resources.files("gateway.ops").joinpath("openapi.yaml").read_text())
    assert doc["openapi"].startswith("3.1")
    post = doc["paths"]["/v1/telemetry"]["post"]
    assert {"202", "401", "403", "413", "429", "503"} <= set(post["responses"])
    assert "Retry-After" in doc["components"]["responses"]["Retry"]["headers"]


async def test_gateway_serves_the_document(start, env, http):
    gw = await start(env)
    async with http.get(gw.url + "/openapi.yaml") as resp:
        assert resp.status == 200 and resp.content_type == "application/yaml"
        assert yaml.safe_load(await resp.text())["info"]["title"].startswith("Edge telemetry gateway")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    """A gateway process with authentication off (loopback only) so generated bodies reach the decoders."""
    root = tmp_path_factory.mktemp("openapi")
    env = make_env(
        root,
        n_devices=1,
        auth={"mode": "none"},
        limits={"max_body_bytes": 1024 * 1024, "max_decompressed_bytes": 4 * 1024 * 1024},
        rate_limits={"enabled": False},
        connections={"body_idle_timeout_secs": 2.0, "header_timeout_secs": 2.0},
    )
    process = GatewayProcess(env.config, free_port(), root / "gateway.log")
    process.start()
    try:
        yield process.url
    finally:
        process.kill()


@pytest.mark.slow
def test_gateway_conforms_to_its_openapi_document(served):
    """Every operation, with generated headers and bodies: responses must match the document."""
    schema = schemathesis.openapi.from_url(served + "/openapi.yaml")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/telemetry", "/healthz", "/readyz"}
    assert "/metrics" not in {op.path for op in operations}, "/metrics is served on the ops listener only"
    for operation in operations:

        @settings(max_examples=60 if operation.path == "/v1/telemetry" else 5, deadline=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy())
        def check(case) -> None:
            # A schema cannot say that a gzip header needs a gzip body, so "valid data must be accepted"
            # does not apply, and authentication is off here on purpose (test_hmac_auth covers it);
            # every other check does (no 5xx, documented statuses, headers, bodies).
            case.call_and_validate(base_url=served, excluded_checks=[positive_data_acceptance, ignored_auth])

        check()
