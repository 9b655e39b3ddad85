"""cfn-guard: the project rules pass their own rule tests and hold on every template."""

from __future__ import annotations

from pathlib import Path

from .conftest import CFN, DEPLOY, output, run, tool

RULES = DEPLOY / "policy" / "project.guard"
RULE_TESTS = DEPLOY / "policy" / "project_tests.yaml"


def guard(*args: str):
    return run([tool("cfn-guard"), *args])


def test_rule_tests_pass():
    result = guard("test", "--rules-file", str(RULES), "--test-data", str(RULE_TESTS))
    assert result.returncode == 0, output(result)
    assert "FAIL Rules" not in result.stdout, output(result)


def test_rule_tests_notice_a_weakened_rule(tmp_path: Path):
    weakened = tmp_path / "project.guard"
    weakened.write_text(RULES.read_text().replace('HttpTokens == "required"', 'HttpTokens exists'))
    result = guard("test", "--rules-file", str(weakened), "--test-data", str(RULE_TESTS))
    assert result.returncode != 0, output(result)


def test_templates_follow_the_project_rules():
    templates = sorted(p for p in CFN.rglob("*.yaml") if "lambdas" not in p.parts)
    args = [arg for path in templates for arg in ("--data", str(path))]
    result = guard("validate", *args, "--rules", str(RULES), "--show-summary", "fail", "--output-format", "single-line-summary")
    assert result.returncode == 0, output(result)


def test_a_hard_coded_zone_breaks_the_rules(cfn_copy: Path):
    network = cfn_copy / "network.yaml"
    network.write_text(network.read_text().replace("AvailabilityZone: !Select [0, !Ref AvailabilityZones]", "AvailabilityZone: us-east-1a", 1))
    result = guard("validate", "--data", str(network), "--rules", str(RULES), "--show-summary", "fail",
                   "--output-format", "single-line-summary")
    assert result.returncode == 19, output(result)
    assert "NO_HARDCODED_AZ" in result.stdout, output(result)


def test_the_rules_catch_what_a_fresh_account_or_a_stack_update_would_break(cfn_copy: Path):
    compute = cfn_copy / "compute.yaml"
    compute.write_text(compute.read_text().replace(
        "      MinSize: !Ref GatewayMinSize\n", "      MinSize: !Ref GatewayMinSize\n      DesiredCapacity: !Ref GatewayMinSize\n", 1))
    foundation = cfn_copy / "foundation.yaml"
    foundation.write_text(foundation.read_text().replace(
        '            Principal: {AWS: "*"}\n            Action: [kms:Encrypt, kms:Decrypt, kms:ReEncrypt*, kms:GenerateDataKey*, kms:DescribeKey]\n',
        '            Principal:\n              AWS: !Sub "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/aws-service-role/'
        'autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"\n'
        '            Action: [kms:Encrypt, kms:Decrypt, kms:ReEncrypt*, kms:GenerateDataKey*, kms:DescribeKey]\n', 1))
    args = [arg for path in (compute, foundation) for arg in ("--data", str(path))]
    result = guard("validate", *args, "--rules", str(RULES), "--show-summary", "fail", "--output-format", "single-line-summary")
    assert result.returncode == 19, output(result)
    for rule in ("ASG_NO_DESIRED_CAPACITY", "KMS_KEY_POLICY_PRINCIPALS_EXIST"):
        assert rule in result.stdout, (rule, output(result))
