"""Shared helpers for the provisioning checks: where the repository and the tools are."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CFN = DEPLOY / "cloudformation"
ANSIBLE = DEPLOY / "ansible"
OBSERVABILITY = DEPLOY / "observability"
DOCKER = REPO / "docker"
TOOLS_DIR = Path(sys.executable).parent

# The gateway's metric contract (DESIGN and the issue); dashboards, rules and alarms may use only these.
GATEWAY_METRICS = frozenset(
    {
        "edge_gateway_http_requests_total",
        "edge_gateway_http_request_duration_seconds",
        "edge_gateway_records_total",
        "edge_gateway_records_rejected_total",
        "edge_gateway_request_bytes_total",
        "edge_gateway_inflight_requests",
        "edge_gateway_draining",
        "edge_gateway_wal_bytes",
        "edge_gateway_wal_capacity_bytes",
        "edge_gateway_wal_fsync_duration_seconds",
        "edge_gateway_wal_backlog_bytes",
        "edge_gateway_wal_oldest_unlanded_age_seconds",
        "edge_gateway_wal_records_lost_total",
        "edge_gateway_objects_rolled_early_total",
        "edge_gateway_objects_landed_total",
        "edge_gateway_records_landed_total",
        "edge_gateway_bytes_landed_total",
        "edge_gateway_stage_errors_total",
        "edge_gateway_event_loop_lag_seconds",
        "edge_gateway_rate_limited_total",
        "edge_gateway_inference_batch_size",
        "edge_gateway_inference_latency_seconds",
        "edge_gateway_inference_records_total",
        "edge_gateway_inference_desired_capacity",
        "edge_gateway_inference_endpoint_idle_seconds",
        # Connectors and operations (issue 13).
        "edge_gateway_s3sink_throttles_total",
        "edge_gateway_s3sink_retries_total",
        "edge_gateway_eventbridgepublisher_events_dropped_total",
        "edge_gateway_eventoutbox_events_rejected_total",
        "edge_gateway_worker_up",
        "edge_gateway_registry_devices",
        "edge_gateway_config_reloads_total",
        "edge_gateway_config_last_reload_success",
        "edge_gateway_auth_refused_total",
        "edge_gateway_admission_refused_total",
        "edge_gateway_admission_inflight_limit",
        # While an instance starts, its ops listener answers these alone (gateway/ops/starting_metrics.py).
        "edge_gateway_starting",
        "edge_gateway_start_waiting_for_room",
        "edge_gateway_start_seconds",
    }
)
HISTOGRAMS = frozenset(
    {
        "edge_gateway_http_request_duration_seconds",
        "edge_gateway_wal_fsync_duration_seconds",
        "edge_gateway_inference_batch_size",
        "edge_gateway_inference_latency_seconds",
    }
)


def tool(name: str) -> str:
    """A tool next to the running interpreter (the lint virtualenv) or on PATH; never skipped."""
    beside = TOOLS_DIR / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run deploy/install-lint-tools.sh <venv> and use that venv's python")
    return found


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 120, env: dict[str, str] | None = None):
    merged = os.environ | {"PATH": f"{TOOLS_DIR}{os.pathsep}{os.environ.get('PATH', '')}"} | (env or {})
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=merged, check=False
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"rc={result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


# ---- the release: deploy/package.sh, once per session ----------------------------------------------

ARTIFACT_BUCKET = "edge-gateway-test-artifacts"
ARTIFACT_PREFIX = "releases"


@dataclass(frozen=True)
class Release:
    """What `make package` built: OUT/s3 mirrors the artifact bucket."""

    out: Path
    version: str
    bucket: str = ARTIFACT_BUCKET
    prefix: str = ARTIFACT_PREFIX

    @property
    def bucket_dir(self) -> Path:
        return self.out / "s3"

    @property
    def bundle(self) -> Path:
        return self.bucket_dir / self.prefix / self.version / f"edge-gateway-{self.version}.tar.gz"

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.out / "manifest.json").read_text())


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    out = tmp_path_factory.mktemp("package") / "out"
    result = run(["bash", str(DEPLOY / "package.sh"), "--s3-bucket", ARTIFACT_BUCKET, "--s3-prefix", ARTIFACT_PREFIX,
                  "--out", str(out)], cwd=REPO, timeout=600, env={"PYTHON": sys.executable})
    assert result.returncode == 0, output(result)
    return Release(out=out, version=project_version())


# ---- CloudFormation's Fn::Sub, for the scripts the templates carry ---------------------------------

SUB_VARIABLE = re.compile(r"\$\{(!?)([^}]+)\}")


def render_sub(text: str, values: dict[str, str]) -> str:
    """What Fn::Sub makes of TEXT: ${Name} from VALUES (every one must be given), ${!Literal} as ${Literal}."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "${" + match.group(2) + "}"
        if match.group(2) not in values:
            raise KeyError(f"no value for ${{{match.group(2)}}}")
        return str(values[match.group(2)])

    return SUB_VARIABLE.sub(replace, text)


@pytest.fixture
def cfn_copy(tmp_path: Path) -> Path:
    """A scratch copy of deploy/cloudformation that a test may break."""
    target = tmp_path / "cloudformation"
    shutil.copytree(CFN, target)
    return target


def load_handler(name: str) -> ModuleType:
    """A Lambda function's handler module, loaded from its file as Lambda would."""
    spec = importlib.util.spec_from_file_location(f"{name}_handler", CFN / "lambdas" / name / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's server on a free loopback port, for the AWS calls the Lambda functions make."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
