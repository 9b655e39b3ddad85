"""cfn-lint over every template (nested-stack wiring included) plus the project's structural rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode

from .conftest import CFN, REPO, output, run, tool

TEMPLATES = sorted(p for p in CFN.rglob("*.yaml") if "lambdas" not in p.parts)
CHILDREN = sorted(p for p in CFN.glob("*.yaml") if p.name != "main.yaml")
STATEFUL_LOGS = "AWS::Logs::LogGroup"


def load(path: Path) -> dict[str, Any]:
    template, matches = decode(str(path))
    assert not matches, matches
    return template


def cfn_lint(*args: str, cwd: Path = REPO):
    return run([tool("cfn-lint"), *args], cwd=cwd)


def test_templates_exist():
    names = {p.name for p in TEMPLATES}
    assert {
        "main.yaml", "foundation.yaml", "network.yaml", "edge.yaml", "compute.yaml", "datalake.yaml", "secrets.yaml",
        "ml.yaml", "analytics.yaml", "orchestration.yaml", "drill.yaml", "governance.yaml", "ops.yaml",
        "guardrails.yaml", "identity-center.yaml",
    } <= names


def test_cfn_lint_passes_on_every_template():
    result = cfn_lint("--config-file", "deploy/cloudformation/.cfnlintrc")
    assert result.returncode == 0, output(result)


def test_cfn_lint_checks_nested_stack_wiring(cfn_copy: Path):
    main = cfn_copy / "main.yaml"
    main.write_text(main.read_text().replace("        AlarmEmail: !Ref AlarmEmail", "        AlarmMail: !Ref AlarmEmail"))
    result = cfn_lint("--ignore-checks", "W3002", "--", str(main))
    assert result.returncode != 0
    assert "E3043" in result.stdout, output(result)


def test_cfn_lint_catches_a_hard_coded_zone(cfn_copy: Path):
    network = cfn_copy / "network.yaml"
    text = network.read_text().replace("AvailabilityZone: !Select [0, !Ref AvailabilityZones]", "AvailabilityZone: us-east-1a", 1)
    network.write_text(text)
    result = cfn_lint("--", str(network))
    assert "W3010" in result.stdout, output(result)


def test_main_stack_nests_every_child():
    main = load(CFN / "main.yaml")
    urls = {r["Properties"]["TemplateURL"] for r in main["Resources"].values() if r["Type"] == "AWS::CloudFormation::Stack"}
    assert urls == {f"./{p.name}" for p in CHILDREN}


# ---- project rules, checked on the parsed templates -----------------------------------------------

def interface_problems(template: dict[str, Any]) -> list[str]:
    groups = template.get("Metadata", {}).get("AWS::CloudFormation::Interface", {}).get("ParameterGroups")
    if not groups:
        return ["no AWS::CloudFormation::Interface parameter groups"]
    grouped = {name for group in groups for name in group["Parameters"]}
    declared = set(template.get("Parameters", {}))
    return [f"parameter {name} is in no group" for name in sorted(declared - grouped)] + [
        f"group names unknown parameter {name}" for name in sorted(grouped - declared)
    ]


def boundary_problems(template: dict[str, Any]) -> list[str]:
    return [
        f"role {name} has no PermissionsBoundary"
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::IAM::Role" and "PermissionsBoundary" not in resource.get("Properties", {})
    ]


def export_problems(template: dict[str, Any]) -> list[str]:
    return [f"output {name} is not exported" for name, out in template.get("Outputs", {}).items() if "Export" not in out]


def log_group_problems(template: dict[str, Any]) -> list[str]:
    problems = []
    for name, resource in template["Resources"].items():
        if resource["Type"] == STATEFUL_LOGS:
            props = resource.get("Properties", {})
            problems += [f"log group {name} lacks {key}" for key in ("RetentionInDays", "KmsKeyId") if key not in props]
    return problems


def bucket_problems(template: dict[str, Any]) -> list[str]:
    problems = []
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::S3::Bucket":
            continue
        props = resource.get("Properties", {})
        for key in ("PublicAccessBlockConfiguration", "VersioningConfiguration", "BucketEncryption", "OwnershipControls"):
            if key not in props:
                problems.append(f"bucket {name} lacks {key}")
        if resource.get("DeletionPolicy") not in {"Retain", "RetainExceptOnCreate"}:
            problems.append(f"bucket {name} is not retained")
        policies = [
            r for r in template["Resources"].values()
            if r["Type"] == "AWS::S3::BucketPolicy" and r["Properties"]["Bucket"] == {"Ref": name}
        ]
        if not any("aws:SecureTransport" in str(p["Properties"]["PolicyDocument"]) for p in policies):
            problems.append(f"bucket {name} has no TLS-only policy")
    return problems


# An account inside an ARN, or a region code anywhere.
HARD_CODED = re.compile(
    r"arn:[\w-]*:[\w-]*:[\w-]*:(\d{12})|\b((?:us|eu|ap|sa|ca|me|af|il)-(?:north|south|east|west|central|northeast|southeast)-\d[a-z]?)\b"
)


def hard_coded_problems(text: str) -> list[str]:
    return [f"hard-coded {m.group(1) or m.group(2)}" for m in HARD_CODED.finditer(without_mappings(text))]


def without_mappings(text: str) -> str:
    """The template without its Mappings section: a Region-keyed mapping names Regions by design."""
    kept, inside = [], False
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            inside = line.startswith("Mappings:")
        if not inside:
            kept.append(line)
    return "\n".join(kept)


RULES = [interface_problems, boundary_problems, export_problems, log_group_problems, bucket_problems]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_follows_project_rules(path: Path):
    template = load(path)
    problems = [problem for rule in RULES for problem in rule(template)] + hard_coded_problems(path.read_text())
    assert not problems, problems


def test_project_rules_catch_violations():
    broken = {
        "Parameters": {"Orphan": {"Type": "String"}},
        "Resources": {
            "Role": {"Type": "AWS::IAM::Role", "Properties": {}},
            "Logs": {"Type": STATEFUL_LOGS, "Properties": {"RetentionInDays": 7}},
            "Bucket": {"Type": "AWS::S3::Bucket", "Properties": {}},
        },
        "Outputs": {"Id": {"Value": "x"}},
    }
    assert interface_problems(broken) == ["no AWS::CloudFormation::Interface parameter groups"]
    assert boundary_problems(broken) == ["role Role has no PermissionsBoundary"]
    assert export_problems(broken) == ["output Id is not exported"]
    assert log_group_problems(broken) == ["log group Logs lacks KmsKeyId"]
    assert "bucket Bucket has no TLS-only policy" in bucket_problems(broken)
    assert hard_coded_problems("Region: eu-west-1 Role: arn:aws:iam::123456789012:role/x") == ["hard-coded eu-west-1", "hard-coded 123456789012"]
    assert hard_coded_problems("Mappings:\n  Accounts:\n    eu-west-1: {Id: x}\nResources:\n  Zone: us-east-1a\n") == ["hard-coded us-east-1a"]


def test_launch_template_requires_imdsv2_and_encryption():
    data = load(CFN / "compute.yaml")["Resources"]["GatewayLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert all(m["Ebs"]["Encrypted"] is True for m in data["BlockDeviceMappings"])
    assert data["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False


def test_target_group_checks_readiness_and_drain_hook_exists():
    edge = load(CFN / "edge.yaml")["Resources"]
    assert edge["GatewayTargetGroup"]["Properties"]["HealthCheckPath"] == "/readyz"
    group = load(CFN / "compute.yaml")["Resources"]["GatewayGroup"]["Properties"]
    hooks = group["LifecycleHookSpecificationList"]
    assert [h["LifecycleTransition"] for h in hooks] == ["autoscaling:EC2_INSTANCE_TERMINATING"]
    # Readiness routes traffic; replacement goes by liveness (test_instance_replacement.py).
    assert group["HealthCheckType"] == "EC2"


def test_alarms_and_scaling_use_gateway_metric_names():
    from .conftest import GATEWAY_METRICS

    used = set()
    for name in ("analytics.yaml", "compute.yaml"):
        used |= set(re.findall(r"MetricName: (edge_gateway_[a-z_]+)", (CFN / name).read_text()))
    # Names inside the CloudWatch dashboard body.
    used |= set(re.findall(r'"(edge_gateway_[a-z_]+)"', (CFN / "analytics.yaml").read_text()))
    assert used, "no gateway metric referenced"
    assert used <= GATEWAY_METRICS, used - GATEWAY_METRICS
