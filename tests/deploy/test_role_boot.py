"""The edge_gateway role applied for real, then booted under systemd.

The role runs unchanged against a copy of the Debian root that deploy/install-lint-tools.sh builds
with debootstrap (through the community.general.chroot connection), installing a stand-in wheel of
the gateway (tests/deploy/stub) from a local wheelhouse. The root is then booted with systemd-nspawn
on a private network: the unit must start under systemd, answer /readyz, pass systemd-analyze, and
drain on stop; the health watchdog's timer must be enabled and its probe pass. Needs root; no traffic
leaves the container's loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ANSIBLE, output, run, tool
from .stub import VERSION, build_wheel

pytestmark = pytest.mark.slow

ROOTFS = Path(os.environ.get("EDGE_GATEWAY_TEST_ROOTFS", Path(sys.prefix) / "share" / "rootfs-bookworm"))


def container(pid: int, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-a", *cmd], capture_output=True, text=True, timeout=timeout, check=False)


def systemd_pid(nspawn: subprocess.Popen[bytes], deadline: float) -> int:
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{nspawn.pid}/task").glob("*/children"):
            for child in task.read_text().split():
                # nspawn forks once more before exec'ing systemd as the container's PID 1.
                for grandchild in Path(f"/proc/{child}/task").glob("*/children"):
                    for pid in grandchild.read_text().split():
                        if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                            return int(pid)
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        time.sleep(0.1)
    raise AssertionError("systemd did not start in the container")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the role boot test needs root (chroot and systemd-nspawn)")
    if not (ROOTFS / "usr" / "bin" / "python3").exists():
        pytest.fail(f"no Debian root at {ROOTFS}: run deploy/install-lint-tools.sh <venv>")
    target = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(ROOTFS), str(target)], check=True, timeout=120)
    wheelhouse = target / "opt" / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    build_wheel(wheelhouse)
    yield target
    subprocess.run(["rm", "-rf", "--one-file-system", str(target)], check=False, timeout=120)


def apply_role(root: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"edge_gateways": {"hosts": {"target": {
        "ansible_connection": "community.general.chroot", "ansible_host": str(root),
        "ansible_python_interpreter": "/usr/bin/python3"}}}}))
    extra = {
        "edge_gateway_version": VERSION,
        "edge_gateway_wheelhouse": "/opt/wheelhouse",
        "edge_gateway_update_package_cache": False,
        "edge_gateway_manage_service": False,  # nothing runs in a chroot; the boot below checks the service
        "edge_gateway_validate_unit": False,  # systemd-analyze runs in the booted container instead
        "edge_gateway_auth_mode": "none",
        "edge_gateway_listen_host": "127.0.0.1",
        "edge_gateway_log_file": "",
        "edge_gateway_drain_deadline_secs": 10,
        "cloudwatch_agent_enabled": False,
        "health_watchdog_manage_service": False,
        "drain_hook_enabled": False,
    }
    return run([tool("ansible-playbook"), "-i", str(inventory), "playbooks/site.yml", "-e", json.dumps(extra)],
               cwd=ANSIBLE, timeout=240, env={"ANSIBLE_NOCOLOR": "1"})


def test_role_installs_a_service_that_boots_and_answers_readyz(root: Path, tmp_path: Path):
    applied = apply_role(root, tmp_path)
    assert applied.returncode == 0, output(applied)
    assert (root / "opt/edge-gateway/venv/bin/edge-gateway").exists()
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-gateway.service").is_symlink()
    assert (root / "etc/systemd/system/timers.target.wants/edge-gateway-health-watchdog.timer").is_symlink()
    # The WAL shares this root's file system here: all workers' WALs together stay within half of it.
    config = tomllib.loads((root / "etc/edge-gateway/config.toml").read_text())
    wal, workers = config["wal"], config["listen"]["workers"]
    disk = os.statvfs(root)
    assert wal["segment_bytes"] <= wal["max_total_bytes"]
    assert workers * (wal["max_total_bytes"] + wal["segment_bytes"]) <= 0.5 * disk.f_frsize * disk.f_blocks
    unit = (root / "etc/systemd/system/edge-gateway.service").read_text()
    assert "RequiresMountsFor=/var/lib/edge-gateway/wal" in unit.splitlines()

    again = apply_role(root, tmp_path)
    assert again.returncode == 0, output(again)
    assert "changed=0" in again.stdout, output(again)  # idempotent

    nspawn = subprocess.Popen(
        ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit", "--private-network", "-b"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        pid = systemd_pid(nspawn, time.monotonic() + 30)
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            ready = container(pid, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8080/readyz")
            if ready.stdout == "200":
                break
            time.sleep(0.5)
        status = container(pid, "systemctl", "status", "--no-pager", "edge-gateway.service")
        assert ready is not None and ready.stdout == "200", output(status)
        assert container(pid, "systemctl", "is-active", "edge-gateway.service").stdout.strip() == "active"
        assert container(pid, "systemctl", "show", "-p", "User", "--value", "edge-gateway.service").stdout.strip() == "edge-gateway"

        verify = container(pid, "systemd-analyze", "verify", "--man=no", "/etc/systemd/system/edge-gateway.service")
        assert verify.returncode == 0, output(verify)
        security = container(pid, "systemd-analyze", "security", "--no-pager", "--threshold=50", "edge-gateway.service")
        assert security.returncode == 0, output(security)

        # One probe by hand: /healthz answers, so the watchdog succeeds (and needs no AWS to do so).
        assert container(pid, "systemctl", "is-enabled", "edge-gateway-health-watchdog.timer").stdout.strip() == "enabled"
        probe = container(pid, "systemctl", "start", "edge-gateway-health-watchdog.service")
        watchdog = container(pid, "journalctl", "-u", "edge-gateway-health-watchdog.service", "--no-pager")
        assert probe.returncode == 0, output(probe) + output(watchdog)
        failures = container(pid, "cat", "/run/edge-gateway-health-watchdog/failures")
        assert failures.stdout.strip() == "0", output(failures) + output(watchdog)

        stopped = container(pid, "systemctl", "stop", "edge-gateway.service", timeout=60)
        assert stopped.returncode == 0, output(stopped)
        result = container(pid, "systemctl", "show", "-p", "Result", "--value", "edge-gateway.service")
        assert result.stdout.strip() == "success", output(result)
        journal = container(pid, "journalctl", "-u", "edge-gateway.service", "--no-pager")
        assert "draining: readyz now 503" in journal.stdout, output(journal)
    finally:
        nspawn.send_signal(signal.SIGTERM)
        try:
            nspawn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(timeout=10)
