"""The launch template's user data, read without booting anything (test_role_boot.py runs it for real).

It must apply the site playbook to this host (a play that matches no host succeeds having done
nothing), with variables the roles accept, from the pinned bundle, and report to CloudFormation once:
failure on any error, success only after /readyz answers.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from .conftest import ANSIBLE, CFN, output, render_sub, run, tool
from .test_cloudformation import load

PARAMETERS = {
    "AWS::StackName": "edge-gateway-prod-Compute-1ABC", "AWS::Region": "eu-west-1", "ArtifactBucketName": "artifacts",
    "ArtifactPrefix": "releases", "GatewayVersion": "0.1.0", "Environment": "prod", "ProjectName": "edge-gateway",
    "LakeBucketName": "edge-gateway-prod-lake", "DataKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/abc",
    "LakeDatabaseName": "edge_gateway_prod_lake", "EventBusName": "edge-gateway-prod",
    "DeviceKeysSecretArn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:devices-AbCdEf", "DrainDeadlineSeconds": 300,
}


def script() -> str:
    data = load(CFN / "compute.yaml")["Resources"]["GatewayLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    return render_sub(data["UserData"]["Fn::Base64"]["Fn::Sub"], PARAMETERS)


def playbook_command(text: str) -> list[str]:
    """The ansible-playbook invocation the script runs, from the ansible directory of the bundle."""
    calls = [line for line in text.splitlines() if "ansible-playbook" in line]
    assert len(calls) == 1, calls
    arguments = re.search(r'ansible-playbook"?\s+(.*)$', calls[0]).group(1)
    return shlex.split(arguments.replace('"$@"', "").split(" -e ", 1)[0])  # the variables come separately


def test_the_script_passes_shellcheck(tmp_path: Path):
    path = tmp_path / "user-data"
    path.write_text(script())
    result = run([tool("shellcheck"), "--shell=bash", "--severity=style", str(path)])
    assert result.returncode == 0, output(result)


def test_the_play_it_runs_targets_this_host():
    args = playbook_command(script())
    assert "playbooks/site.yml" in args
    listed = run([tool("ansible-playbook"), *args, "--list-hosts"], cwd=ANSIBLE)
    assert listed.returncode == 0, output(listed)
    counts = set(re.findall(r"hosts \((\d+)\)", listed.stdout))
    assert counts == {"1"} and re.search(r"^\s+localhost$", listed.stdout, re.M), output(listed)
    # The inventory connects locally, with the interpreter that has the distribution's package bindings.
    inventory = yaml.safe_load((ANSIBLE / args[args.index("-i") + 1]).read_text())
    host = inventory["all"]["children"]["edge_gateways"]["hosts"]["localhost"]
    assert host["ansible_connection"] == "local"


def test_it_refuses_a_play_that_targets_no_host():
    text = script()
    guard = text[text.index("play --list-hosts"):text.index("host-vars.json")]
    assert 'hosts (1)' in guard and "exit 1" in guard


def host_vars(text: str) -> dict[str, Any]:
    body = text[text.index("<<EOF\n") + len("<<EOF\n"):text.index("\nEOF\n")]
    return json.loads(re.sub(r"\$[a-z_]+|\$\{[a-z_]+\}", "X", body))


def test_its_variables_are_ones_the_roles_accept():
    variables = host_vars(script())
    specs: dict[str, Any] = {}
    for spec in (ANSIBLE / "roles").glob("*/meta/argument_specs.yml"):
        specs |= yaml.safe_load(spec.read_text())["argument_specs"]["main"]["options"]
    assert set(variables) <= set(specs), set(variables) - set(specs)
    for name, value in variables.items():
        kind = specs[name].get("type", "str")
        assert isinstance(value, {"str": str, "int": int, "bool": bool, "float": (int, float)}.get(kind, object)), (name, value)
        assert value in specs[name].get("choices", [value]), (name, value)
    assert variables["edge_gateway_wheelhouse"].endswith("/wheelhouse")


def test_it_uses_the_bundle_s_pinned_ansible_not_the_distribution_s():
    text = script()
    assert not re.search(r"dnf install[^\n]*ansible", text), "ansible-core from the distribution carries no collections"
    assert '--no-index --find-links "$release/provisioning/wheels"' in text
    assert "sha256sum --check --strict" in text


def test_it_signals_once_on_exit_success_only_after_readiness():
    text = script()
    assert text.count("/opt/aws/bin/cfn-signal") == 1
    assert "trap finish EXIT" in text
    finish = text[text.index("finish() {"):text.index("trap finish EXIT")]
    assert "signal 1" in finish and "signal 0" in finish
    assert text.count("signal 0") == 1 and text.count("signal 1") == 1
    # The last thing the script does before exiting 0 is to find /readyz answering 200 and the unit active.
    tail = text[text.index('play -e "@$release/host-vars.json"'):]
    assert "http://127.0.0.1:8080/readyz" in tail and "systemctl is-active --quiet edge-gateway.service" in tail
