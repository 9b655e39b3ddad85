"""Policies that work in a real, fresh account: every principal exists, every grant is usable.

Parsed from the templates (short-form tags included) and evaluated here, offline:

- the permission boundary allows every action each workload role is granted, by its own policies and
  by the AWS managed policies it attaches (tests/deploy/data/aws-managed-policies.json), on the
  resources and under the conditions granted; and no wider than needed where it matters (no
  iam:PassRole, no service-wide s3/secretsmanager/sagemaker/iam/kms/ec2);
- key policies name only principals that exist when the key is created (the account, "*" under
  conditions, or roles of the same template), and the key of an encrypted topic lets every service
  that publishes to it use it, as the topic's policy lets them publish;
- the burst inference fleet and the gateways share no instance role; Lake Formation grants can be
  made by the stack and cover the data locations the gateway creates tables in; ALB access logs
  reach their bucket in every Region; groups that something else scales declare no DesiredCapacity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest

from .conftest import CFN
from .test_cloudformation import load

ACCOUNT = "123456789012"
REGION = "eu-west-1"
UNRESOLVED = "UNRESOLVED"  # a value only known at deploy time: only a "*" in the boundary covers it
PSEUDO = {"AWS::AccountId": ACCOUNT, "AWS::Region": REGION, "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com",
          "AWS::StackName": "edge-gateway-test-Child-1ABC",
          "AWS::StackId": f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/edge-gateway-test-Child-1ABC/guid"}
WORKLOAD = sorted(CFN.glob("*.yaml"))
MANAGED = {name: doc for name, doc in json.loads((Path(__file__).parent / "data" / "aws-managed-policies.json").read_text()).items()
           if not name.startswith("_")}
# Conditions a boundary may put on a statement that every grant of the workload meets: its resources
# and callers are in this account.
OWN_ACCOUNT_KEYS = {"aws:ResourceAccount", "s3:ResourceAccount", "kms:CallerAccount", "aws:PrincipalAccount"}


# ---- rendering template values into policy strings ------------------------------------------------

def render(node: Any, template: dict[str, Any]) -> list[str]:
    """Every string a policy element may become (Fn::If gives both branches)."""
    params = template.get("Parameters", {})

    def value(name: str) -> str:
        if name in PSEUDO:
            return PSEUDO[name]
        if name in params and "Default" in params[name] and str(params[name]["Default"]):
            return str(params[name]["Default"])
        return UNRESOLVED

    def sub(text: str, extra: dict[str, list[str]]) -> list[str]:
        results = [""]
        for literal, bang, name in re.findall(r"([^$]*(?:\$(?!\{)[^$]*)*)(?:\$\{(!?)([^}]*)\})?", text):
            choices = [""]
            if name and bang:
                choices = ["${" + name + "}"]
            elif name:
                choices = extra.get(name) or [UNRESOLVED if "." in name else value(name)]
            results = [r + literal + c for r in results for c in choices]
        return results

    if isinstance(node, str):
        return [node]
    if isinstance(node, (int, float, bool)):
        return [str(node).lower() if isinstance(node, bool) else str(node)]
    if isinstance(node, list):
        return [item for element in node for item in render(element, template)]
    if isinstance(node, dict) and len(node) == 1:
        (key, arg), = node.items()
        if key == "Ref":
            return [value(arg)]
        if key == "Fn::Sub":
            text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
            return sub(text, {k: render(v, template) for k, v in variables.items()})
        if key == "Fn::If":
            return render(arg[1], template) + render(arg[2], template)
        if key == "Fn::Join":
            parts = [render(p, template) for p in arg[1]]
            return [arg[0].join(p[0] for p in parts)] if all(len(p) == 1 for p in parts) else [UNRESOLVED]
        return [UNRESOLVED]
    raise AssertionError(f"cannot render {node!r}")


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statement(raw: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    assert "NotAction" not in raw and "NotResource" not in raw, raw
    condition = {op: {key: sorted(set(render(v, template))) for key, v in entries.items()}
                 for op, entries in (raw.get("Condition") or {}).items()}
    return {"Effect": raw["Effect"], "Action": [a for a in as_list(raw["Action"])],
            "Resource": render(raw.get("Resource", "*"), template), "Condition": condition, "Sid": raw.get("Sid", "")}


# ---- the roles and what they are granted ------------------------------------------------------------

def boundary() -> list[dict[str, Any]]:
    template = load(CFN / "foundation.yaml")
    document = template["Resources"]["PermissionsBoundary"]["Properties"]["PolicyDocument"]
    return [statement(s, template) for s in document["Statement"]]


def managed_name(arn: Any, template: dict[str, Any]) -> str:
    (rendered,) = render(arn, template)
    match = re.fullmatch(r"arn:aws:iam::aws:policy/(.+)", rendered)
    assert match, f"only AWS managed policies are attached by ARN, not {rendered}"
    return match.group(1)


def roles() -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """(template, role, every statement it is granted) for each role that carries the boundary."""
    for path in WORKLOAD:
        template = load(path)
        resources = template["Resources"]
        for name, resource in resources.items():
            if resource["Type"] != "AWS::IAM::Role":
                continue
            props = resource["Properties"]
            assert props.get("PermissionsBoundary") == {"Ref": "PermissionsBoundaryArn"}, (path.name, name)
            granted = [statement(s, template) for policy in props.get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]
            for arn in props.get("ManagedPolicyArns", []):
                policy = managed_name(arn, template)
                if policy not in MANAGED:  # the test fails on it: its document belongs in the data file
                    granted.append({"Effect": "Unknown", "Sid": policy, "Action": [], "Resource": [], "Condition": {}})
                    continue
                granted += [statement(s, template) for s in MANAGED[policy]["Statement"]]
            for other in resources.values():  # AWS::IAM::Policy / ManagedPolicy resources attached to the role
                if other["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"} and {"Ref": name} in other["Properties"].get("Roles", []):
                    granted += [statement(s, template) for s in other["Properties"]["PolicyDocument"]["Statement"]]
            yield path.name, name, granted


ROLES = list(roles())


def covers(ceiling: dict[str, Any], action: str, resource: str, condition: dict[str, Any]) -> bool:
    if not any(fnmatchcase(action.lower(), pattern.lower()) for pattern in ceiling["Action"]):
        return False
    if not any(fnmatchcase(resource, pattern) for pattern in ceiling["Resource"]):
        return False
    for operator, entries in ceiling["Condition"].items():
        for key, values in entries.items():
            if key in OWN_ACCOUNT_KEYS and values == [ACCOUNT]:
                continue
            if condition.get(operator, {}).get(key) != values:
                return False
    return True


def uncovered(granted: list[dict[str, Any]], ceiling: list[dict[str, Any]]) -> list[str]:
    allows = [s for s in ceiling if s["Effect"] == "Allow"]
    denies = [s for s in ceiling if s["Effect"] == "Deny"]
    problems = []
    for grant in (g for g in granted if g["Effect"] == "Allow"):
        for action in grant["Action"]:
            for resource in grant["Resource"]:
                if any(fnmatchcase(action.lower(), p.lower()) for d in denies for p in d["Action"]):
                    problems.append(f"{action} is denied by the boundary")
                elif not any(covers(c, action, resource, grant["Condition"]) for c in allows):
                    problems.append(f"{action} on {resource}" + (f" when {grant['Condition']}" if grant["Condition"] else ""))
    return problems


@pytest.mark.parametrize(("template", "role", "granted"), ROLES, ids=[f"{t}:{r}" for t, r, _ in ROLES])
def test_the_boundary_allows_everything_a_role_is_granted(template: str, role: str, granted: list[dict[str, Any]]):
    assert granted, f"{role} is granted nothing"
    unknown = [g["Sid"] for g in granted if g["Effect"] == "Unknown"]
    assert not unknown, f"add the documents of {unknown} to data/aws-managed-policies.json"
    assert not uncovered(granted, boundary()), uncovered(granted, boundary())


def test_the_coverage_check_notices_what_the_boundary_cuts_off():
    ceiling = boundary()
    missing = [
        {"Effect": "Allow", "Action": ["ecr:PutImage"], "Resource": ["*"], "Condition": {}},  # no pushes
        {"Effect": "Allow", "Action": ["ec2:CreateTags"], "Resource": [f"arn:aws:ec2:{REGION}:{ACCOUNT}:vpc/vpc-1"], "Condition": {}},
        {"Effect": "Allow", "Action": ["kms:CreateGrant"], "Resource": ["*"], "Condition": {}},  # only for AWS resources
        {"Effect": "Allow", "Action": ["iam:CreateUser"], "Resource": ["*"], "Condition": {}},  # denied outright
    ]
    assert len(uncovered(missing, ceiling)) == 4, uncovered(missing, ceiling)
    granted = {"Effect": "Allow", "Action": ["kms:CreateGrant"], "Resource": ["*"],
               "Condition": {"Bool": {"kms:GrantIsForAWSResource": ["true"]}}}
    assert uncovered([granted], ceiling) == []


def test_the_boundary_grants_no_role_passing_and_no_service_wide_wildcards():
    wide = {"*", "iam:*", "s3:*", "secretsmanager:*", "sagemaker:*", "kms:*", "ec2:*", "sts:*", "lambda:*", "sqs:*", "states:*"}
    for ceiling in boundary():
        if ceiling["Effect"] != "Allow":
            continue
        actions = {a.lower() for a in ceiling["Action"]}
        assert not actions & wide, (ceiling["Sid"], actions & wide)
        assert not any(fnmatchcase("iam:passrole", a) or fnmatchcase("sts:assumerole", a) for a in actions), ceiling["Sid"]


def test_the_boundary_fits_iam_s_size_limit():
    template = load(CFN / "foundation.yaml")
    document = template["Resources"]["PermissionsBoundary"]["Properties"]["PolicyDocument"]
    rendered = json.dumps({"Version": document["Version"], "Statement": [
        {k: (render(v, template) if k in {"Resource"} else v) for k, v in s.items()} for s in document["Statement"]]})
    assert len(re.sub(r"\s", "", rendered)) <= 6144  # managed policy documents, whitespace excluded


def test_no_role_may_pass_roles_to_anything():
    for template, role, granted in ROLES:
        for grant in granted:
            if any(fnmatchcase("iam:passrole", a.lower()) for a in grant["Action"]):
                assert "*" not in grant["Resource"], (template, role)


# ---- the two fleets ------------------------------------------------------------------------------

def compute() -> dict[str, Any]:
    return load(CFN / "compute.yaml")


def role_of_profile(resources: dict[str, Any], profile_arn: Any) -> str:
    profile = profile_arn["Fn::GetAtt"][0]
    assert resources[profile]["Type"] == "AWS::IAM::InstanceProfile"
    (role,) = resources[profile]["Properties"]["Roles"]
    return role["Ref"]


def test_each_fleet_has_its_own_instance_role():
    resources = compute()["Resources"]
    templates = {name: r["Properties"]["LaunchTemplateData"]["IamInstanceProfile"]["Arn"]
                 for name, r in resources.items() if r["Type"] == "AWS::EC2::LaunchTemplate"}
    assert len({json.dumps(arn) for arn in templates.values()}) == len(templates), templates
    assert role_of_profile(resources, templates["BurstLaunchTemplate"]) == "BurstRole"
    assert role_of_profile(resources, templates["GatewayLaunchTemplate"]) == "GatewayRole"


def test_the_burst_fleet_only_reads_models_and_pulls_its_image():
    (granted,) = [g for t, r, g in ROLES if t == "compute.yaml" and r == "BurstRole"]
    allowed = set()
    for grant in granted:
        for action in grant["Action"]:
            allowed.add(action.lower())
            if action.startswith("s3:"):
                assert action in {"s3:GetObject", "s3:ListBucket"}, action
                assert all(r.endswith(("/models/*", f":::{UNRESOLVED}")) or r == "arn:aws:s3:::" + UNRESOLVED
                           for r in grant["Resource"]), grant
    for forbidden in ("s3:putobject", "secretsmanager:getsecretvalue", "glue:createtable", "events:putevents",
                      "lakeformation:getdataaccess", "kms:generatedatakey", "autoscaling:setinstancehealth",
                      "ec2:createtags", "cloudformation:signalresource"):
        assert not any(fnmatchcase(forbidden, a) for a in allowed), forbidden


# ---- keys --------------------------------------------------------------------------------------------

def key_policies() -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    for path in WORKLOAD + sorted((CFN / "org").glob("*.yaml")):
        template = load(path)
        for name, resource in template["Resources"].items():
            if resource["Type"] == "AWS::KMS::Key":
                for raw in resource["Properties"]["KeyPolicy"]["Statement"]:
                    yield path.name, name, raw, template


def missing_principals(raw: dict[str, Any], template: dict[str, Any]) -> list[str]:
    """AWS principals that may not exist when the key is created."""
    resources = template["Resources"]
    problems = []
    for principal in as_list((raw.get("Principal") or {}).get("AWS", [])):
        if principal == "*" or (isinstance(principal, dict) and "Fn::GetAtt" in principal
                                and resources.get(principal["Fn::GetAtt"][0], {}).get("Type") == "AWS::IAM::Role"):
            continue
        rendered = render(principal, template)
        if rendered == [f"arn:aws:iam::{ACCOUNT}:root"]:
            continue
        linked = [r for r in resources.values() if r["Type"] == "AWS::IAM::ServiceLinkedRole"]
        if any("aws-service-role/" in r for r in rendered) and linked:
            continue  # the template creates the service-linked role itself
        problems.append(f"{raw.get('Sid')}: {rendered}")
    return problems


KEY_STATEMENTS = list(key_policies())


@pytest.mark.parametrize(("template", "key", "raw", "parsed"), KEY_STATEMENTS,
                         ids=[f"{t}:{k}:{r.get('Sid')}" for t, k, r, _ in KEY_STATEMENTS])
def test_key_policies_name_only_principals_that_exist(template: str, key: str, raw: dict[str, Any], parsed: dict[str, Any]):
    assert not missing_principals(raw, parsed)


def test_the_principal_check_refuses_a_service_linked_role_nobody_created():
    template = {"Resources": {}, "Parameters": {}}
    raw = {"Sid": "Asg", "Principal": {"AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/aws-service-role/"
                                                          "autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"}}}
    assert missing_principals(raw, template)
    template["Resources"]["Slr"] = {"Type": "AWS::IAM::ServiceLinkedRole", "Properties": {"AWSServiceName": "autoscaling.amazonaws.com"}}
    assert not missing_principals(raw, template)


# Which service sends what a resource of this type delivers to an SNS topic.
PUBLISHERS = {
    "AWS::CloudWatch::Alarm": "cloudwatch.amazonaws.com",
    "AWS::CloudWatch::CompositeAlarm": "cloudwatch.amazonaws.com",
    "AWS::Events::Rule": "events.amazonaws.com",
    "AWS::Budgets::Budget": "budgets.amazonaws.com",
    "AWS::CE::AnomalySubscription": "costalerts.amazonaws.com",
    "AWS::Backup::BackupVault": "backup.amazonaws.com",
}
ALERT_TOPIC_REFERENCES = ({"Ref": "AlertTopicArn"}, {"Ref": "AlertTopic"})


def mentions(node: Any, targets: tuple[dict[str, str], ...]) -> bool:
    if node in targets:
        return True
    if isinstance(node, dict):
        return any(mentions(v, targets) for v in node.values())
    if isinstance(node, list):
        return any(mentions(v, targets) for v in node)
    return False


def alert_publishers() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in WORKLOAD:
        for name, resource in load(path)["Resources"].items():
            if mentions(resource.get("Properties", {}), ALERT_TOPIC_REFERENCES):
                if resource["Type"] in PUBLISHERS:
                    found.setdefault(PUBLISHERS[resource["Type"]], set()).add(f"{path.name}:{name}")
    return found


def service_statements(statements: list[dict[str, Any]], action: str) -> set[str]:
    services = set()
    for raw in statements:
        actions = [a.lower() for a in as_list(raw["Action"])]
        if raw["Effect"] == "Allow" and any(fnmatchcase(action, a) for a in actions):
            services |= {s for s in as_list((raw.get("Principal") or {}).get("Service", [])) if isinstance(s, str)}
    return services


def test_every_service_that_alerts_can_use_the_topic_and_its_key():
    foundation = load(CFN / "foundation.yaml")["Resources"]
    assert foundation["AlertTopic"]["Properties"]["KmsMasterKeyId"] == {"Ref": "OpsKey"}
    key = foundation["OpsKey"]["Properties"]["KeyPolicy"]["Statement"]
    topic = foundation["AlertTopicPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    publishers = alert_publishers()
    assert {"cloudwatch.amazonaws.com", "budgets.amazonaws.com", "backup.amazonaws.com", "costalerts.amazonaws.com"} <= set(publishers)
    for service, senders in publishers.items():
        assert service in service_statements(key, "kms:generatedatakey"), (service, senders)
        assert service in service_statements(key, "kms:decrypt"), (service, senders)
        assert service in service_statements(topic, "sns:publish"), (service, senders)


# ---- Lake Formation ----------------------------------------------------------------------------------

def depends_on(resources: dict[str, Any], name: str, target: str, seen: frozenset[str] = frozenset()) -> bool:
    direct = as_list(resources[name].get("DependsOn", []))
    refs = set(re.findall(r"'(?:Ref|Fn::GetAtt)': \['?([A-Za-z0-9]+)", str(resources[name].get("Properties", {}))))
    nexts = (set(direct) | refs) & set(resources)
    return target in nexts or any(depends_on(resources, n, target, seen | {name}) for n in nexts - seen - {name})


def test_lake_formation_grants_are_made_by_an_administrator():
    datalake = load(CFN / "datalake.yaml")
    resources = datalake["Resources"]
    admins = resources["DataLakeSettings"]["Properties"]["Admins"]
    assert {"DataLakePrincipalIdentifier": {"Ref": "DeployRoleArn"}} in admins
    assert {"DataLakePrincipalIdentifier": {"Ref": "LakeAdminArn"}} in admins
    main = load(CFN / "main.yaml")
    assert main["Resources"]["DataLake"]["Properties"]["Parameters"]["DeployRoleArn"] == {"Ref": "DeployRoleArn"}
    for name, resource in resources.items():
        if resource["Type"] in {"AWS::LakeFormation::Permissions", "AWS::LakeFormation::Resource"}:
            assert depends_on(resources, name, "DataLakeSettings"), f"{name} may be created before the administrators are set"
    # The compute stack's grants come after the data lake stack, whose outputs it takes.
    compute_inputs = main["Resources"]["Compute"]["Properties"]["Parameters"].values()
    assert any(isinstance(v, dict) and v.get("Fn::GetAtt", [""])[0] == "DataLake" for v in compute_inputs)


def test_the_gateway_may_create_tables_in_every_zone_it_lands():
    resources = compute()["Resources"]
    writes = [s for s in resources["GatewayRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
              if "s3:PutObject" in as_list(s["Action"])]
    zones = {re.search(r"\}/([a-z]+)/\*$", r["Fn::Sub"]).group(1) for s in writes for r in as_list(s["Resource"])}
    assert zones == {"raw", "curated", "quarantine"}
    locations = set()
    for resource in resources.values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::LakeFormation::Permissions" and props["DataLakePrincipal"] == {
                "DataLakePrincipalIdentifier": {"Fn::GetAtt": ["GatewayRole", "Arn"]}}:
            if "DataLocationResource" in props["Resource"]:
                assert props["Permissions"] == ["DATA_LOCATION_ACCESS"]
                locations.add(props["Resource"]["DataLocationResource"]["S3Resource"]["Fn::Sub"].rsplit("/", 1)[1])
            if "DatabaseResource" in props["Resource"]:
                assert "CREATE_TABLE" in props["Permissions"]
    assert locations == zones


def test_the_glue_connection_reaches_s3_through_the_gateway_endpoint():
    group = load(CFN / "datalake.yaml")["Resources"]["GlueConnectionSecurityGroup"]["Properties"]
    https = [rule for rule in group["SecurityGroupEgress"] if rule["IpProtocol"] == "tcp" and rule["FromPort"] <= 443 <= rule["ToPort"]]
    # S3's gateway endpoint is reached at S3's public addresses (its prefix list), never inside the VPC's CIDR.
    assert any(rule.get("CidrIp") == "0.0.0.0/0" or "DestinationPrefixListId" in rule for rule in https), https


# ---- the edge ------------------------------------------------------------------------------------------

# Regions opened before August 2022 and their Elastic Load Balancing account (AWS documentation).
ELB_ACCOUNTS = {
    "us-east-1": "127311923021", "us-east-2": "033677994240", "us-west-1": "027434742980", "us-west-2": "797873946194",
    "af-south-1": "098369216593", "ap-east-1": "754344448648", "ap-southeast-3": "589379963580",
    "ap-south-1": "718504428378", "ap-northeast-3": "383597477331", "ap-northeast-2": "600734575887",
    "ap-southeast-1": "114774131450", "ap-southeast-2": "783225319266", "ap-northeast-1": "582318560864",
    "ca-central-1": "985666609251", "eu-central-1": "054676820928", "eu-west-1": "156460612806",
    "eu-west-2": "652711504416", "eu-south-1": "635631232127", "eu-west-3": "009996457667",
    "eu-north-1": "897822967062", "me-south-1": "076674570225", "sa-east-1": "507241528517",
    "us-gov-west-1": "048591011584", "us-gov-east-1": "190560391635", "cn-north-1": "638102146993",
    "cn-northwest-1": "037604701340",
}


def log_delivery_principals(region: str) -> list[Any]:
    """The principals the ALB log bucket policy allows to write, as CloudFormation resolves it in REGION."""
    edge = load(CFN / "edge.yaml")
    mapping = edge["Mappings"]["ElbLogDelivery"]

    def find_in_map(arg: list[Any]) -> str:
        table, key, attribute = arg[0], arg[1], arg[2]
        assert table == "ElbLogDelivery" and key == {"Ref": "AWS::Region"}
        return mapping.get(region, {}).get(attribute, arg[3]["DefaultValue"] if len(arg) > 3 else None)

    condition = edge["Conditions"]["ElbLogsFromRegionalAccount"]["Fn::Equals"]
    regional = find_in_map(condition[0]["Fn::FindInMap"]) == condition[1]
    principals = []
    for raw in edge["Resources"]["AccessLogBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]:
        if "Fn::If" in raw:
            name, chosen, other = raw["Fn::If"]
            assert name == "ElbLogsFromRegionalAccount"
            raw = chosen if regional else other
            if raw == {"Ref": "AWS::NoValue"}:
                continue
        if raw["Effect"] != "Allow" or raw["Action"] != "s3:PutObject":
            continue
        principal = raw["Principal"]
        if "AWS" in principal:
            text, variables = principal["AWS"]["Fn::Sub"]
            account = find_in_map(variables["ElbAccount"]["Fn::FindInMap"])
            principals.append(text.replace("${AWS::Partition}", "aws").replace("${ElbAccount}", account))
        else:
            principals.append(principal["Service"])
    return principals


@pytest.mark.parametrize("region", sorted(ELB_ACCOUNTS))
def test_alb_access_logs_reach_their_bucket_in_a_region_opened_before_august_2022(region: str):
    assert f"arn:aws:iam::{ELB_ACCOUNTS[region]}:root" in log_delivery_principals(region)


@pytest.mark.parametrize("region", ["ap-south-2", "eu-central-2", "il-central-1", "ca-west-1", "mx-central-1"])
def test_alb_access_logs_reach_their_bucket_in_a_newer_region(region: str):
    assert log_delivery_principals(region) == ["logdelivery.elasticloadbalancing.amazonaws.com"]


def test_log_delivery_needs_no_parameter_and_resolves_its_default():
    edge = load(CFN / "edge.yaml")
    assert edge.get("Transform") == "AWS::LanguageExtensions"  # Fn::FindInMap's DefaultValue
    assert {r: v["AccountId"] for r, v in edge["Mappings"]["ElbLogDelivery"].items()} == ELB_ACCOUNTS
    for name in ("edge.yaml", "main.yaml"):
        assert "ElbLogDeliveryAccountId" not in load(CFN / name)["Parameters"]


# ---- the groups ----------------------------------------------------------------------------------------

def test_groups_that_something_else_scales_declare_no_desired_capacity():
    resources = compute()["Resources"]
    tracked = {r["Properties"]["AutoScalingGroupName"]["Ref"] for r in resources.values() if r["Type"] == "AWS::AutoScaling::ScalingPolicy"}
    assert {"GatewayGroup", "BurstGroup"} <= tracked
    scaled_by_the_drill = {"StandbyGroup"}
    groups = {n for n, r in resources.items() if r["Type"] == "AWS::AutoScaling::AutoScalingGroup"}
    assert tracked | scaled_by_the_drill == groups
    for name in groups:
        assert "DesiredCapacity" not in resources[name]["Properties"], f"{name}: a stack update would reset its capacity"
    assert "GatewayDesiredCapacity" not in load(CFN / "main.yaml")["Parameters"]


def test_the_gateway_group_sits_out_zonal_impairments():
    group = compute()["Resources"]["GatewayGroup"]["Properties"]
    assert group["AvailabilityZoneImpairmentPolicy"] == {"ZonalShiftEnabled": True, "ImpairedZoneHealthCheckBehavior": "IgnoreUnhealthy"}
