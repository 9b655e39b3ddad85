"""ansible-lint (production profile, offline), the playbook syntax check, and the rendered unit and config."""

from __future__ import annotations

import shlex
import shutil
import tomllib
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from .conftest import ANSIBLE, output, run, tool

ROLES = ("edge_gateway", "cloudwatch_agent", "health_watchdog", "drain_hook")
# What the role's WAL budget gives each of 4 workers on the launch template's 100 GiB WAL volume.
WAL_WORKER_BYTES = 21696 * 1024 * 1024


def ansible_lint(cwd: Path, *paths: str):
    return run([tool("ansible-lint"), *paths], cwd=cwd, timeout=170)


def test_ansible_lint_production_profile_passes():
    result = ansible_lint(ANSIBLE)
    assert result.returncode == 0, output(result)
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr, output(result)


def test_ansible_lint_fails_an_unnamed_short_module_task(tmp_path: Path):
    copy = tmp_path / "ansible"
    shutil.copytree(ANSIBLE, copy)
    tasks = copy / "roles" / "drain_hook" / "tasks" / "main.yml"
    tasks.write_text(tasks.read_text() + "\n- shell: echo {{ drain_hook_poll_secs }}\n")
    result = ansible_lint(copy, "roles/drain_hook")
    assert result.returncode != 0, output(result)
    text = result.stdout + result.stderr
    assert "name[missing]" in text and "fqcn" in text, output(result)


def test_site_playbook_syntax():
    result = run([tool("ansible-playbook"), "-i", "inventories/local/hosts.yml", "playbooks/site.yml", "--syntax-check"], cwd=ANSIBLE)
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize("role", ROLES)
def test_role_variables_are_prefixed_documented_and_specified(role: str):
    base = ANSIBLE / "roles" / role
    defaults = yaml.safe_load((base / "defaults" / "main.yml").read_text())
    spec = yaml.safe_load((base / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    readme = (base / "README.md").read_text()
    assert all(name.startswith(f"{role}_") for name in defaults)
    assert set(defaults) <= set(spec), set(defaults) - set(spec)
    assert [name for name in defaults if f"`{name}`" not in readme] == []


def render(template: str, extra: dict[str, Any] | None = None, role: str = "edge_gateway") -> str:
    """A role's template rendered with the role's defaults (and the facts its tasks set), as Ansible would."""
    defaults = yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text())
    facts = {"edge_gateway_wal_worker_bytes": WAL_WORKER_BYTES} if role == "edge_gateway" else {}
    values = defaults | facts | {"ansible_managed": "managed", "ansible_facts": {"hostname": "gw-1"}} | (extra or {})
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["quote"] = lambda s: shlex.quote(str(s))
    # Resolve the defaults that refer to other defaults, as Ansible does lazily.
    for _ in range(4):
        values = {k: env.from_string(v).render(values) if isinstance(v, str) and "{{" in v else v for k, v in values.items()}
    return env.from_string((ANSIBLE / "roles" / role / "templates" / template).read_text()).render(values)


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_drains_on_sigterm_within_its_stop_timeout():
    settings = unit_settings(render("edge-gateway.service.j2", {"edge_gateway_drain_deadline_secs": 40}))
    assert settings["KillSignal"] == ["SIGTERM"]
    assert int(settings["TimeoutStopSec"][0]) > 40
    # A reload is held back until serve says it handles signals (gateway/service_manager.py).
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    # The supervisor's runtime directory (gateway/runtime_dir.py) where nothing ages it out.
    assert settings["RuntimeDirectory"] == ["edge-gateway"] and settings["RuntimeDirectoryMode"] == ["0700"]
    assert settings["User"] == ["edge-gateway"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                      "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces",
                      "LockPersonality", "RestrictAddressFamilies", "SystemCallFilter", "CapabilityBoundingSet"):
        assert hardening in settings, hardening
    assert settings["ProtectSystem"] == ["strict"] and settings["CapabilityBoundingSet"] == [""]
    assert "/var/lib/edge-gateway/wal" in settings["ReadWritePaths"][0]


S3_LAKE = {
    "edge_gateway_lake_kind": "s3",
    "edge_gateway_lake_bucket": "edge-gateway-prod-lake",
    "edge_gateway_s3_region": "eu-west-1",
    "edge_gateway_s3_kms_key_id": "alias/edge-gateway-prod-data",
    "edge_gateway_glue_database": "edge_gateway_prod_lake",
    "edge_gateway_eventbridge_bus_name": "edge-gateway-prod",
    "edge_gateway_registry_secret_id": "edge-gateway/devices",
}
VARIANTS = {"local": {}, "s3": S3_LAKE}


def check_config(tmp_path: Path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return run([tool("edge-gateway"), "check-config", str(path)])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_config_passes_the_gateways_own_check(variant: str, tmp_path: Path):
    text = render("config.toml.j2", VARIANTS[variant])
    result = check_config(tmp_path, text)
    assert result.returncode == 0, output(result) + text
    config = tomllib.loads(text)
    assert ("s3" in config) == (variant == "s3")
    if variant == "s3":
        assert config["s3"]["bucket"] == "edge-gateway-prod-lake"
        assert config["glue"]["database"] == "edge_gateway_prod_lake"
        assert config["auth"]["registry_source"] == "secretsmanager"
        assert config["secretsmanager"]["secret_ids"] == ["edge-gateway/devices"]


def test_gateway_check_refuses_what_the_role_must_not_write(tmp_path: Path):
    # Unauthenticated ingest on every interface: the role asserts against it, and so does the gateway.
    text = render("config.toml.j2", {"edge_gateway_auth_mode": "none"})
    result = check_config(tmp_path, text)
    assert result.returncode != 0, output(result)


def test_config_and_unit_are_validated_on_write():
    tasks = yaml.safe_load((ANSIBLE / "roles" / "edge_gateway" / "tasks" / "main.yml").read_text())
    by_name = {task["name"]: task for task in tasks}
    assert "check-config %s" in by_name["Write the gateway configuration"]["ansible.builtin.template"]["validate"]
    assert "systemd-analyze verify" in by_name["Install the hardened systemd unit"]["ansible.builtin.template"]["validate"]
    verify = yaml.safe_load((ANSIBLE / "roles" / "edge_gateway" / "tasks" / "verify.yml").read_text())
    assert verify[0]["ansible.builtin.uri"]["url"].endswith("/readyz")
