"""checkov (offline) over the CloudFormation templates, the Ansible roles and the Dockerfile."""

from __future__ import annotations

from pathlib import Path

from .conftest import REPO, output, run, tool


def checkov(*args: str):
    return run([tool("checkov"), *args], cwd=REPO, timeout=170)


def test_checkov_passes_on_deploy_and_docker():
    result = checkov("--config-file", "deploy/.checkov.yaml")
    assert result.returncode == 0, output(result)
    assert "Failed checks: 0" in result.stdout, output(result)
    for framework in ("cloudformation scan results", "ansible scan results", "dockerfile scan results"):
        assert framework in result.stdout, output(result)


def test_checkov_fails_a_launch_template_without_imdsv2(cfn_copy: Path):
    compute = cfn_copy / "compute.yaml"
    compute.write_text(compute.read_text().replace("HttpTokens: required", "HttpTokens: optional"))
    result = checkov("-f", str(compute), "--framework", "cloudformation", "--skip-download", "--compact", "--quiet")
    assert result.returncode == 1, output(result)
    assert "CKV_AWS_79" in result.stdout, output(result)
