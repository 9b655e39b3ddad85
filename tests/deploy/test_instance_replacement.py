"""Acknowledged data survives instance replacement.

Auto Scaling replaces gateways on liveness only (EC2 status plus the host's /healthz watchdog), never
on the load balancer's readiness check; the WAL volume outlives its instance unless the drain hook
saw the WAL land; the termination hook waits longer than the longest drain; and each worker's WAL
budget fits the volume. The hook scripts run for real against stand-ins for curl, aws, systemctl and
lsblk that record what the scripts asked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from .conftest import ANSIBLE, CFN, output, run, tool
from .test_ansible import check_config, render, unit_settings
from .test_cloudformation import load

GIB = 1024**3
MIB = 1024**2
SEGMENT = 64 * MIB
ROLES = ANSIBLE / "roles"
GROUPS = ("GatewayGroup", "StandbyGroup")
WAL_DEVICE = "/dev/xvdb"
INSTANCE = "i-0123456789abcdef0"


def defaults(role: str) -> dict[str, Any]:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())


def compute() -> dict[str, Any]:
    return load(CFN / "compute.yaml")


def user_data(template: dict[str, Any]) -> str:
    return template["Resources"]["GatewayLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]


def as_set(value: str | list[str]) -> set[str]:
    return {value} if isinstance(value, str) else set(value)


# ---- CloudFormation -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", GROUPS)
def test_groups_replace_instances_on_liveness_not_readiness(name: str):
    group = compute()["Resources"][name]["Properties"]
    assert group["HealthCheckType"] == "EC2"
    assert group["HealthCheckGracePeriod"] >= 60
    # The load balancer still routes on readiness: a full WAL takes an instance out of rotation only.
    target_group = load(CFN / "edge.yaml")["Resources"]["GatewayTargetGroup"]["Properties"]
    assert target_group["HealthCheckPath"] == "/readyz"


def test_wal_volume_outlives_its_instance():
    template = compute()
    data = template["Resources"]["GatewayLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    volumes = {m["DeviceName"]: m["Ebs"] for m in data["BlockDeviceMappings"]}
    assert volumes[WAL_DEVICE]["DeleteOnTermination"] is False
    assert volumes["/dev/xvda"]["DeleteOnTermination"] is True  # only the WAL is worth keeping
    assert volumes[WAL_DEVICE]["VolumeSize"] == {"Ref": "WalVolumeSizeGiB"}
    # The role formats and mounts that volume, and the drain hook tags and releases the same one.
    assert f'"edge_gateway_wal_device": "{WAL_DEVICE}"' in user_data(template)
    assert defaults("drain_hook")["drain_hook_wal_device"] == WAL_DEVICE


@pytest.mark.parametrize("name", GROUPS)
def test_termination_hook_outlasts_the_longest_drain(name: str):
    template = compute()
    hooks = template["Resources"][name]["Properties"]["LifecycleHookSpecificationList"]
    (hook,) = [h for h in hooks if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"]
    hook_role = defaults("drain_hook")
    longest_drain = template["Parameters"]["DrainDeadlineSeconds"]["MaxValue"]
    stop_grace = defaults("edge_gateway")["edge_gateway_stop_grace_secs"]
    # Even without a single heartbeat the hook does not time out while the gateway may still be landing.
    assert hook["HeartbeatTimeout"] >= longest_drain + stop_grace + hook_role["drain_hook_poll_secs"]
    assert hook_role["drain_hook_heartbeat_secs"] * 3 <= hook["HeartbeatTimeout"]
    assert hook["LifecycleHookName"] == hook_role["drain_hook_hook_name"]


def test_drain_deadline_is_raised_everywhere_alike():
    main, child = load(CFN / "main.yaml"), compute()
    role = defaults("edge_gateway")["edge_gateway_drain_deadline_secs"]
    for key in ("Default", "MaxValue"):
        assert main["Parameters"]["DrainDeadlineSeconds"][key] == child["Parameters"]["DrainDeadlineSeconds"][key], key
    assert child["Parameters"]["DrainDeadlineSeconds"]["Default"] == role
    assert role >= 120, "landing a WAL after an S3 hiccup takes minutes, not the old 30 s"
    assert '"edge_gateway_drain_deadline_secs": ${DrainDeadlineSeconds}' in user_data(child)
    prod = yaml.safe_load((ANSIBLE / "inventories" / "prod" / "group_vars" / "edge_gateways.yml").read_text())
    assert prod.get("edge_gateway_drain_deadline_secs", role) >= role


def test_instance_role_may_report_health_and_keep_only_its_own_volume():
    template = compute()
    policy = template["Resources"]["GatewayRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    statements = {s["Sid"]: s for s in policy}
    assert "autoscaling:SetInstanceHealth" in as_set(statements["TalkToOwnAutoScalingGroups"]["Action"])

    tagging = statements["LabelOwnWalVolumes"]
    assert as_set(tagging["Action"]) == {"ec2:CreateTags"}
    assert ":volume/*" in tagging["Resource"]["Fn::Sub"]
    allowed_keys = set(tagging["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])
    script = (ROLES / "drain_hook" / "templates" / "edge-gateway-drain-hook.j2").read_text()
    assert set(re.findall(r"Key=(edge-gateway:[a-z-]+)", script)) == allowed_keys

    release = statements["ReleaseOwnLandedWalVolume"]
    assert as_set(release["Action"]) == {"ec2:ModifyInstanceAttribute"}
    assert release["Condition"] == {"StringEquals": {"aws:ARN": "${ec2:SourceInstanceARN}"}}

    # The permission boundary is the ceiling: without these the grants above would do nothing.
    boundary = load(CFN / "foundation.yaml")["Resources"]["PermissionsBoundary"]["Properties"]["PolicyDocument"]["Statement"]
    granted = set().union(*(as_set(s["Action"]) for s in boundary if s["Effect"] == "Allow"))
    assert {"ec2:CreateTags", "ec2:ModifyInstanceAttribute"} <= granted
    assert any(action in granted for action in ("autoscaling:*", "autoscaling:SetInstanceHealth"))


# ---- the WAL budget ------------------------------------------------------------------------------

def wal_budget() -> Callable[..., int]:
    path = ROLES / "edge_gateway" / "filter_plugins" / "wal_budget.py"
    spec = importlib.util.spec_from_file_location("edge_gateway_wal_budget", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wal_budget


@pytest.mark.parametrize(("volume_gib", "workers"), [(100, 1), (100, 2), (100, 4), (100, 8), (500, 16), (20, 16)])
def test_budget_splits_the_volume_between_the_workers(volume_gib: int, workers: int):
    volume = volume_gib * GIB
    budget = wal_budget()(volume, workers, SEGMENT, 0.85)
    assert budget >= SEGMENT and budget % MIB == 0
    assert workers * (budget + SEGMENT) <= 0.85 * volume  # with one segment of slack each, they all fit
    assert workers * (budget + SEGMENT + MIB) > 0.85 * volume  # and nothing is left over beyond rounding


def test_budget_refuses_what_cannot_fit():
    budget = wal_budget()
    assert budget(100 * GIB, 4, SEGMENT, 0.85) == 21696 * MIB
    # The old production setting, 64 GiB per worker on 4 vCPUs, asked for 2.5 times the volume.
    assert 64 * GIB > budget(100 * GIB, 4, SEGMENT, 0.85)
    assert budget(1 * GIB, 16, SEGMENT, 0.85) == 0  # not one segment each: the role stops the play
    for bad in ((100 * GIB, 0, SEGMENT, 0.85), (100 * GIB, 4, SEGMENT, 1.5), (100 * GIB, "many", SEGMENT, 0.85)):
        with pytest.raises(AnsibleFilterError):
            budget(*bad)


@pytest.mark.parametrize(("volume_gib", "workers"), [(100, 4), (100, 16), (30, 2)])
def test_rendered_config_carries_the_budget(volume_gib: int, workers: int, tmp_path: Path):
    budget = wal_budget()(volume_gib * GIB, workers, SEGMENT, 0.85)
    text = render("config.toml.j2", {"edge_gateway_workers": workers, "edge_gateway_wal_worker_bytes": budget})
    config = tomllib.loads(text)
    assert config["listen"]["workers"] == workers
    assert config["wal"]["max_total_bytes"] == budget and config["wal"]["segment_bytes"] == SEGMENT
    result = check_config(tmp_path, text)
    assert result.returncode == 0, output(result) + text


def apply_wal_budget(tmp_path: Path, **variables: Any) -> subprocess.CompletedProcess[str]:
    """The role's own WAL budget tasks, run by Ansible against a directory on this machine."""
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir(exist_ok=True)
    playbook = tmp_path / "budget.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Size the WAL",
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [
            {"name": "Run the role's WAL budget tasks",
             "ansible.builtin.include_role": {"name": "edge_gateway", "tasks_from": "wal_budget"}},
            {"name": "Show the capacity", "ansible.builtin.debug": {"var": "edge_gateway_wal_worker_bytes"}},
        ],
    }]))
    extra = {"edge_gateway_wal_dir": str(wal_dir), "edge_gateway_wal_volume_share": 0.85,
             "ansible_python_interpreter": sys.executable} | variables
    return run([tool("ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook), "-e", json.dumps(extra)],
               cwd=ANSIBLE, timeout=120, env={"ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_NOCOLOR": "1"})


def settled_capacity(result: subprocess.CompletedProcess[str]) -> int:
    tasks = json.loads(result.stdout)["plays"][0]["tasks"]
    return int(tasks[-1]["hosts"]["localhost"]["edge_gateway_wal_worker_bytes"])


def filesystem_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_frsize * stat.f_blocks


def test_role_derives_each_workers_wal_from_its_file_system(tmp_path: Path):
    result = apply_wal_budget(tmp_path, edge_gateway_workers=4, edge_gateway_wal_max_total_bytes=0)
    assert result.returncode == 0, output(result)
    assert settled_capacity(result) == wal_budget()(filesystem_bytes(tmp_path), 4, SEGMENT, 0.85)


def test_role_keeps_a_configured_wal_that_fits(tmp_path: Path):
    fits = wal_budget()(filesystem_bytes(tmp_path), 2, SEGMENT, 0.85) // 2 // MIB * MIB
    result = apply_wal_budget(tmp_path, edge_gateway_workers=2, edge_gateway_wal_max_total_bytes=fits)
    assert result.returncode == 0, output(result)
    assert settled_capacity(result) == fits


def test_role_refuses_a_configured_wal_that_overruns_the_volume(tmp_path: Path):
    size = filesystem_bytes(tmp_path)
    result = apply_wal_budget(tmp_path, edge_gateway_workers=2, edge_gateway_wal_max_total_bytes=size // 2)
    assert result.returncode != 0, output(result)
    assert "times 2 workers does not fit the file system" in result.stdout, output(result)
    assert "set it to 0 to derive it from the volume" in result.stdout, output(result)


def test_role_refuses_a_volume_too_small_for_its_workers(tmp_path: Path):
    size = filesystem_bytes(tmp_path)
    result = apply_wal_budget(tmp_path, edge_gateway_workers=8, edge_gateway_wal_segment_bytes=size // 8)
    assert result.returncode != 0, output(result)
    assert "is too small for 8 workers" in result.stdout, output(result)


def test_gateway_never_writes_its_wal_to_a_missing_volume():
    settings = unit_settings(render("edge-gateway.service.j2", {"edge_gateway_wal_dir": "/srv/wal"}))
    assert settings["RequiresMountsFor"] == ["/srv/wal"]
    assert "/srv/wal" in settings["ReadWritePaths"][0].split()
    tasks = {t["name"]: t for t in yaml.safe_load((ROLES / "edge_gateway" / "tasks" / "main.yml").read_text())}
    mount = tasks["Mount the WAL volume"]["ansible.posix.mount"]
    assert mount["path"] == "{{ edge_gateway_wal_dir }}"
    assert mount["src"] == "UUID={{ edge_gateway_wal_uuid.stdout }}"
    assert "nofail" in mount["opts"].split(",")


# ---- the hosts' scripts, run against recording stand-ins -----------------------------------------

STUBS = {
    # Instance metadata and the gateway's /healthz; the lifecycle state comes from a file the test sets.
    "curl": """#!/bin/bash
for url; do :; done
case $url in
    */api/token) echo token ;;
    */meta-data/instance-id) echo INSTANCE ;;
    */meta-data/placement/region) echo eu-west-1 ;;
    */meta-data/autoscaling/target-lifecycle-state) [[ -f $HOOK_STATE/lifecycle ]] || exit 22; cat "$HOOK_STATE/lifecycle" ;;
    */healthz) exit "$(cat "$HOOK_STATE/healthz_rc")" ;;
    *) exit 22 ;;
esac
""".replace("INSTANCE", INSTANCE),
    "aws": """#!/bin/bash
echo "$AWS_DEFAULT_REGION $*" >>"$HOOK_STATE/aws.log"
""",
    # The gateway unit: stopping it takes a moment, then writes its drain report to its log.
    "systemctl": """#!/bin/bash
echo "$*" >>"$HOOK_STATE/systemctl.log"
state=$(cat "$HOOK_STATE/unit")
case $1 in
    is-active) [[ $2 == --quiet ]] || echo "$state"; [[ $state == active ]] ;;
    start) echo active >"$HOOK_STATE/unit" ;;
    stop)
        echo deactivating >"$HOOK_STATE/unit"
        (sleep 2; cat "$HOOK_STATE/report" >>"$HOOK_STATE/gateway.log"; echo inactive >"$HOOK_STATE/unit") >/dev/null 2>&1 &
        ;;
    show) cat "$HOOK_STATE/result" ;;
esac
""",
    "lsblk": """#!/bin/bash
echo ' vol0123456789abcdef0'
""",
}


def line(msg: str, **fields: Any) -> str:
    """One line of the gateway's JSON log, as orjson writes it."""
    entry = {"ts": "2025-01-01T00:00:00.000Z", "level": "INFO", "logger": "gateway", "msg": msg} | fields
    return json.dumps(entry, separators=(",", ":")) + "\n"


def supervisor(workers: int) -> str:
    return line("draining workers", workers=workers)


def drained(landed: bool) -> str:
    return line("drained", landed_everything=landed)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A directory of stand-ins, and the state they share with the test."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "aws.log").write_text("")
    (state / "systemctl.log").write_text("")
    (state / "wal-device").write_text("")
    # A report from an earlier stop: the hook must read only what this drain writes.
    (state / "gateway.log").write_text(supervisor(2) + drained(False))
    return tmp_path


def environment(host: Path) -> dict[str, str]:
    return os.environ | {"PATH": f"{host / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOOK_STATE": str(host / "state")}


def drain_hook(host: Path) -> Path:
    script = host / "drain-hook"
    state = host / "state"
    script.write_text(render("edge-gateway-drain-hook.j2", {
        "drain_hook_group_name": "edge-gateway-prod-gateway",
        "drain_hook_poll_secs": 1,
        "drain_hook_heartbeat_secs": 1,
        "drain_hook_gateway_log_file": str(state / "gateway.log"),
        "drain_hook_wal_device": str(state / "wal-device"),
        "drain_hook_gateway_id": "gw-7",
    }, role="drain_hook"))
    return script


def terminate(host: Path, report: str, *, unit: str = "active", result: str = "success",
              in_service_first: bool = True) -> tuple[list[str], list[str]]:
    """Run the drain hook through one termination; return the aws and systemctl calls it made."""
    state = host / "state"
    (state / "report").write_text(report)
    (state / "unit").write_text(unit)
    (state / "result").write_text(result)
    (state / "lifecycle").write_text("InService" if in_service_first else "Terminated")
    hook = subprocess.Popen(["bash", str(drain_hook(host))], env=environment(host),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if in_service_first:
            deadline = time.monotonic() + 15
            while "Value=in-use" not in (state / "aws.log").read_text():
                assert time.monotonic() < deadline and hook.poll() is None, "the hook never labelled its volume"
                time.sleep(0.1)
            (state / "lifecycle").write_text("Terminated")
        log, _ = hook.communicate(timeout=30)
    finally:
        if hook.poll() is None:
            hook.kill()
    assert hook.returncode == 0, log
    calls = (state / "aws.log").read_text().splitlines()
    assert calls and all(call.startswith("eu-west-1 ") for call in calls), calls
    return [call.removeprefix("eu-west-1 ") for call in calls], (state / "systemctl.log").read_text().splitlines()


def wal_label(call: str) -> str | None:
    match = re.search(r"Key=edge-gateway:wal,Value=(\S+)", call)
    return match.group(1) if match and call.startswith("ec2 create-tags --resources vol-0123456789abcdef0 ") else None


def test_drain_hook_releases_the_volume_once_the_wal_has_landed(host: Path):
    calls, units = terminate(host, supervisor(2) + drained(True) + drained(True))
    assert wal_label(calls[0]) == "in-use"
    assert "Key=edge-gateway:gateway-id,Value=gw-7" in calls[0]
    assert "Key=edge-gateway:group,Value=edge-gateway-prod-gateway" in calls[0]
    assert "stop --no-block edge-gateway.service" in units
    heartbeats = [c for c in calls if c.startswith("autoscaling record-lifecycle-action-heartbeat ")]
    assert heartbeats and all(f"--instance-id {INSTANCE}" in c and "--lifecycle-hook-name drain" in c for c in heartbeats)
    labels = [wal_label(c) for c in calls if wal_label(c)]
    assert labels == ["in-use", "landed"]
    (release,) = [c for c in calls if c.startswith("ec2 modify-instance-attribute ")]
    assert f"--instance-id {INSTANCE}" in release
    mapping = json.loads(release.split("--block-device-mappings ", 1)[1])
    assert mapping == [{"DeviceName": str(host / "state" / "wal-device"), "Ebs": {"DeleteOnTermination": True}}]
    assert calls.index(heartbeats[0]) < calls.index(release)  # heartbeats while the gateway lands
    assert calls[-1] == (
        "autoscaling complete-lifecycle-action --auto-scaling-group-name edge-gateway-prod-gateway "
        f"--lifecycle-hook-name drain --instance-id {INSTANCE} --lifecycle-action-result CONTINUE"
    )


@pytest.mark.parametrize(("report", "result"), [
    (supervisor(2) + drained(True) + drained(False), "success"),  # one worker hit its deadline
    (supervisor(2) + drained(True), "success"),  # one worker never reported (killed)
    (supervisor(2) + drained(True) + drained(True), "timeout"),  # systemd had to kill the gateway
    ("", "success"),  # no report at all
    # A WAL directory of an earlier worker count was still being landed when the stop came.
    (supervisor(2) + line("orphaned WAL drain stopped; it continues at the next start", wal="/var/lib/edge-gateway/wal/w2")
     + drained(True) + drained(True), "success"),
], ids=["a-worker-did-not-land", "a-worker-never-reported", "the-unit-timed-out", "no-report", "an-orphaned-wal-was-cut-short"])
def test_drain_hook_keeps_an_unlanded_wal(host: Path, report: str, result: str):
    calls, _ = terminate(host, report, result=result)
    labels = [wal_label(c) for c in calls if wal_label(c)]
    assert labels == ["in-use", "unlanded"]
    assert not [c for c in calls if c.startswith("ec2 modify-instance-attribute")], calls  # the volume stays
    assert calls[-1].startswith("autoscaling complete-lifecycle-action ") and calls[-1].endswith("CONTINUE")


def test_drain_hook_starts_a_dead_gateway_so_it_lands_its_wal(host: Path):
    # The hook restarted during termination: it must not relabel the volume it is judging.
    calls, units = terminate(host, drained(True), unit="failed", in_service_first=False)
    assert [wal_label(c) for c in calls if wal_label(c)] == ["landed"]
    assert units.index("start edge-gateway.service") < units.index("stop --no-block edge-gateway.service")
    assert any(c.startswith("ec2 modify-instance-attribute ") for c in calls)


def watchdog(host: Path, failures: int = 3) -> Callable[[], list[str]]:
    script = host / "watchdog"
    script.write_text(render("edge-gateway-health-watchdog.j2", {"health_watchdog_failures": failures}, role="health_watchdog"))
    runtime = host / "run"
    runtime.mkdir(exist_ok=True)

    def tick() -> list[str]:
        result = subprocess.run(["bash", str(script)], env=environment(host) | {"RUNTIME_DIRECTORY": str(runtime)},
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, output(result)
        return (host / "state" / "aws.log").read_text().splitlines()

    return tick


def probe(host: Path, *, healthy: bool, lifecycle: str | None = "InService", unit: str = "active") -> None:
    state = host / "state"
    (state / "healthz_rc").write_text("0" if healthy else "7")
    (state / "unit").write_text(unit)
    if lifecycle is None:
        (state / "lifecycle").unlink(missing_ok=True)
    else:
        (state / "lifecycle").write_text(lifecycle)


UNHEALTHY = f"eu-west-1 autoscaling set-instance-health --instance-id {INSTANCE} --health-status Unhealthy --should-respect-grace-period"


def test_watchdog_marks_a_dead_gateway_unhealthy_after_consecutive_failures(host: Path):
    tick = watchdog(host, failures=3)
    probe(host, healthy=False)
    assert tick() == [] and tick() == []
    assert tick() == [UNHEALTHY]


def test_watchdog_forgives_a_failure_that_recovers(host: Path):
    tick = watchdog(host, failures=3)
    for healthy in (False, False, True, False, False):
        probe(host, healthy=healthy)
        assert tick() == []


@pytest.mark.parametrize(("lifecycle", "unit"), [
    ("Terminated", "inactive"),  # the drain hook is stopping it
    ("Standby", "active"),
    (None, "active"),  # not in an Auto Scaling group at all
    ("InService", "deactivating"),  # a deploy restarts it: it drains first
])
def test_watchdog_leaves_deliberate_stops_alone(host: Path, lifecycle: str | None, unit: str):
    tick = watchdog(host, failures=2)
    probe(host, healthy=False, lifecycle=lifecycle, unit=unit)
    for _ in range(4):
        assert tick() == []


def test_watchdog_catches_a_crash_loop(host: Path):
    # Restart=on-failure keeps a crashing gateway "activating"; that is not a deliberate stop.
    tick = watchdog(host, failures=2)
    probe(host, healthy=False, unit="activating")
    assert tick() == []
    assert tick() == [UNHEALTHY]


def test_watchdog_never_probes_readiness():
    assert defaults("health_watchdog")["health_watchdog_url"].endswith("/healthz")
    tasks = yaml.safe_load((ROLES / "health_watchdog" / "tasks" / "main.yml").read_text())
    assert "'/readyz' not in health_watchdog_url" in tasks[0]["ansible.builtin.assert"]["that"]


@pytest.mark.parametrize(("role", "template"), [
    ("drain_hook", "edge-gateway-drain-hook.j2"),
    ("health_watchdog", "edge-gateway-health-watchdog.j2"),
])
def test_host_scripts_pass_shellcheck(role: str, template: str, tmp_path: Path):
    script = tmp_path / "script"
    script.write_text(render(template, {"drain_hook_group_name": "edge-gateway-prod-gateway"}, role=role))
    result = run([tool("shellcheck"), "--shell=bash", "--severity=style", str(script)])
    assert result.returncode == 0, output(result)
