"""The launch template's user data, run for real on a booted host, installing the real release.

A copy of the Debian root that deploy/install-lint-tools.sh builds stands in for the gateway AMI. It
boots under systemd-nspawn on a network namespace of its own, with a loop device as its WAL volume
(/dev/xvdb), and runs the exact user-data script of compute.yaml (Fn::Sub rendered with test
parameters), which installs the release bundle that deploy/package.sh built from this checkout: the
real gateway wheel and its dependencies, the pinned ansible-core and collections, the roles.

What cannot run here is replaced by recording stand-ins (tests/deploy/standins), each named as one:
cfn-signal, the AWS CLI (its `s3 cp` serves the packaged release), dnf (the root is Debian), the
CloudWatch agent, and, in the namespace, the instance metadata service and moto's server for the
gateway's own AWS calls. Nothing leaves the machine. Needs root.

It must: signal failure for a play that targets no host and for a failing play, and success exactly
once, only after /readyz answers 200; leave a gateway that restarts cleanly, drains on stop and lands
what it acknowledged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import Release, output, render_sub, run
from .test_cloudformation import load
from .conftest import CFN

pytestmark = pytest.mark.slow

ROOTFS = Path(os.environ.get("EDGE_GATEWAY_TEST_ROOTFS", Path(sys.prefix) / "share" / "rootfs-bookworm"))
STANDINS = Path(__file__).parent / "standins"
STATE = "var/lib/aws-standin"
MOTO_PORT = 4566
REGION = "eu-west-1"
ZONE = "eu-west-1b"
INSTANCE = "i-0b00751e57a5d1e00"
GROUP = "edge-gateway-test-gateway"
STACK = "edge-gateway-test-Compute-1B00T"
DEVICE, DEVICE_KEY = "boot-device-1", "k" * 32
WAL = "/var/lib/edge-gateway/wal"


def user_data_template() -> str:
    data = load(CFN / "compute.yaml")["Resources"]["GatewayLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    return data["UserData"]["Fn::Base64"]["Fn::Sub"]


def user_data(version: str, release: Release, aws: dict[str, str]) -> str:
    """The launch template's user data as CloudFormation would hand it to this instance."""
    return render_sub(user_data_template(), {
        "AWS::StackName": STACK, "AWS::Region": REGION, "ArtifactBucketName": release.bucket,
        "ArtifactPrefix": release.prefix, "GatewayVersion": version, "Environment": "dev",
        "ProjectName": "edge-gateway", "LakeBucketName": "edge-gateway-test-lake", "DataKeyArn": aws["data_key_arn"],
        "LakeDatabaseName": "edge_gateway_test_lake", "EventBusName": "edge-gateway-test",
        "DeviceKeysSecretArn": aws["secret_arn"], "DrainDeadlineSeconds": 30,
    })


def stand_in_bucket(release: Release, target: Path) -> Path:
    """The artifact bucket: the packaged release, and two broken ones next to it.

    VERSION-nohost: a bundle whose playbook targets a host group no inventory of the bundle fills.
    9.9.9: the real bundle uploaded under a version it holds no wheel of, so the play fails at pip.
    """

    def publish(version: str, data_from: Path | bytes) -> None:
        directory = target / release.prefix / version
        directory.mkdir(parents=True, exist_ok=True)
        name = f"edge-gateway-{version}.tar.gz"
        if isinstance(data_from, Path):
            os.link(data_from, directory / name)
            digest = hashlib.sha256(data_from.read_bytes()).hexdigest()
        else:
            (directory / name).write_bytes(data_from)
            digest = hashlib.sha256(data_from).hexdigest()
        (directory / f"{name}.sha256").write_text(f"{digest}  {name}\n")

    publish(release.version, release.bundle)
    publish("9.9.9", release.bundle)
    buffer = io.BytesIO()
    with tarfile.open(release.bundle) as source, tarfile.open(fileobj=buffer, mode="w:gz") as variant:
        for member in source:
            if member.name.startswith("./wheelhouse/"):
                continue
            data = source.extractfile(member) if member.isfile() else None
            if member.name == "./ansible/playbooks/site.yml" and data is not None:
                text = data.read().decode().replace("hosts: edge_gateways", "hosts: edge_gateway_hosts")
                assert "edge_gateway_hosts" in text
                member.size = len(text.encode())
                data = io.BytesIO(text.encode())
            variant.addfile(member, data)
    publish(f"{release.version}-nohost", buffer.getvalue())
    return target


def cloudwatch_agent_standin(directory: Path) -> Path:
    """A Debian package standing in for the Amazon CloudWatch agent (nothing here reaches CloudWatch)."""
    package = directory / "amazon-cloudwatch-agent-standin"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: amazon-cloudwatch-agent\nVersion: 0.0.0~standin\nArchitecture: all\nMaintainer: tests <tests@localhost>\n"
        "Description: stand-in for the Amazon CloudWatch agent in the boot test\n"
    )
    tool = package / "opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl"
    tool.parent.mkdir(parents=True)
    tool.write_bytes((STANDINS / "amazon-cloudwatch-agent-ctl").read_bytes())
    tool.chmod(0o755)
    (package / "opt/aws/amazon-cloudwatch-agent/etc").mkdir(parents=True)
    unit = package / "lib/systemd/system/amazon-cloudwatch-agent.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\nDescription=Amazon CloudWatch agent (stand-in)\n\n[Service]\nExecStart=/bin/sleep infinity\n")
    built = subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(package), str(directory / "cwagent.deb")],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    return directory / "cwagent.deb"


def systemd_pid(nspawn: subprocess.Popen[bytes], deadline: float) -> int:
    while time.monotonic() < deadline:
        assert nspawn.poll() is None, "systemd-nspawn exited"
        for task in Path(f"/proc/{nspawn.pid}/task").glob("*/children"):
            for child in task.read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        time.sleep(0.1)
    raise AssertionError("systemd did not start in the container")


@dataclass
class Host:
    root: Path
    pid: int
    netns: str
    release: Release
    aws: dict[str, str]

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-a", *cmd], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def boot_with_user_data(self, version: str) -> subprocess.CompletedProcess[str]:
        """Run the user data as cloud-init does: once, as root, with a clean environment."""
        script = self.root / "var/lib/cloud/instance/scripts" / f"part-001-{version}"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(user_data(version, self.release, self.aws))
        script.chmod(0o700)
        return self.run("env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                        "LANG=C.UTF-8", f"/{script.relative_to(self.root)}", timeout=420)

    def log(self, name: str) -> list[str]:
        path = self.root / STATE / name
        return path.read_text().splitlines() if path.exists() else []

    def readyz(self) -> str:
        return self.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8080/readyz").stdout

    def wait_ready(self, seconds: float = 60) -> str:
        deadline = time.monotonic() + seconds
        code = self.readyz()
        while code != "200" and time.monotonic() < deadline:
            time.sleep(0.5)
            code = self.readyz()
        return code

    def moto(self, service: str, method: str, **kwargs: Any) -> Any:
        """A call to the stand-in AWS services, from inside the host's network namespace."""
        code = (
            "import boto3, json, sys\n"
            f"c = boto3.client({service!r}, region_name={REGION!r}, endpoint_url='http://127.0.0.1:{MOTO_PORT}',"
            " aws_access_key_id='x', aws_secret_access_key='x')\n"
            f"print(json.dumps(getattr(c, {method!r})(**json.loads(sys.argv[1])), default=str))\n"
        )
        result = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code, json.dumps(kwargs)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, output(result)
        return json.loads(result.stdout)


@pytest.fixture
def host(tmp_path: Path, release: Release) -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.fail("the boot test needs root (loop devices, network namespaces, systemd-nspawn)")
    if not (ROOTFS / "usr/sbin/mkfs.xfs").exists():
        pytest.fail(f"no Debian root with xfsprogs at {ROOTFS}: run deploy/install-lint-tools.sh <venv>")
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(ROOTFS), str(root)], check=True, timeout=120)
    cleanup: list[list[str]] = [["rm", "-rf", "--one-file-system", str(root)]]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # The stand-ins where the AMI would have the real tools.
        state = root / STATE
        (state / "s3" / release.bucket).mkdir(parents=True)
        for name, where in (("cfn-signal", "opt/aws/bin"), ("aws", "usr/local/bin"), ("dnf", "usr/local/bin")):
            (root / where).mkdir(parents=True, exist_ok=True)
            (root / where / name).write_bytes((STANDINS / name).read_bytes())
            (root / where / name).chmod(0o755)
        deb = cloudwatch_agent_standin(tmp_path)
        (root / "tmp" / deb.name).write_bytes(deb.read_bytes())
        installed = subprocess.run(["chroot", str(root), "dpkg", "-i", f"/tmp/{deb.name}"], capture_output=True, text=True, check=False)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        dropin = root / "etc/systemd/system/edge-gateway.service.d/aws-endpoint-standin.conf"
        dropin.parent.mkdir(parents=True)
        dropin.write_text(
            "# STAND-IN: the gateway's AWS calls go to the boot test's moto server (tests/deploy/standins).\n"
            f"[Service]\nEnvironment=AWS_ENDPOINT_URL=http://127.0.0.1:{MOTO_PORT}\n"
        )
        bucket = stand_in_bucket(release, tmp_path / "bucket")

        # The WAL volume.
        image = tmp_path / "wal.img"
        with image.open("wb") as handle:
            handle.truncate(1024**3)
        loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True).stdout.strip()
        cleanup.insert(0, ["losetup", "--detach", loop])

        # The instance's network: loopback, the metadata address, and what answers there.
        netns = f"egboot{os.getpid()}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        cleanup.insert(0, ["ip", "netns", "delete", netns])
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", netns, *cmd], check=True)
        ready = tmp_path / "aws-ready.json"
        standin_log = (tmp_path / "aws-standin.log").open("w")
        standin = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(STANDINS / "aws_standin.py"), "--state", str(state),
             "--ready", str(ready), "--moto-port", str(MOTO_PORT), "--region", REGION, "--zone", ZONE,
             "--instance-id", INSTANCE, "--tag", "edge-gateway:resource", "GatewayGroup", "--tag", "edge-gateway:group", GROUP,
             "--bucket", "edge-gateway-test-lake", "--secret-name", "edge-gateway/test/device-keys", "--device-id", DEVICE,
             "--device-key", DEVICE_KEY, "--database", "edge_gateway_test_lake", "--bus", "edge-gateway-test"],
            stdout=subprocess.DEVNULL, stderr=standin_log,
        )
        standin_log.close()
        processes.append(standin)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert standin.poll() is None and time.monotonic() < deadline, (tmp_path / "aws-standin.log").read_text()
            time.sleep(0.2)

        nspawn = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{netns}",
             f"--bind={loop}", f"--bind={loop}:/dev/xvdb", f"--bind-ro={bucket}:/{STATE}/s3/{release.bucket}", "-b"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        processes.insert(0, nspawn)
        host = Host(root, systemd_pid(nspawn, time.monotonic() + 30), netns, release, json.loads(ready.read_text()))
        deadline = time.monotonic() + 60
        while host.run("systemctl", "is-system-running").stdout.strip() not in {"running", "degraded"}:
            assert time.monotonic() < deadline, host.run("systemctl", "--failed", "--no-pager").stdout
            time.sleep(0.3)
        yield host
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for cmd in cleanup:
            subprocess.run(cmd, check=False, timeout=120, capture_output=True)


def signed_telemetry(host: Host, records: int) -> subprocess.CompletedProcess[str]:
    """A device request, signed with the registry's key (HMAC v1), sent from inside the host."""
    code = f"""
import hashlib, hmac, json, time, urllib.request
body = "\\n".join(json.dumps({{"device_id": "{DEVICE}", "ts": int(time.time() * 1000), "seq": i,
                               "metrics": {{"temp": 20.5 + i}}}}) for i in range({records})).encode()
ts = str(int(time.time()))
message = f"{{ts}}\\nPOST\\n/v1/telemetry\\n{{hashlib.sha256(body).hexdigest()}}".encode()
request = urllib.request.Request("http://127.0.0.1:8080/v1/telemetry", data=body, method="POST", headers={{
    "Content-Type": "application/x-ndjson", "X-Device-Id": "{DEVICE}", "X-Timestamp": ts,
    "X-Signature": "v1=" + hmac.new(b"{DEVICE_KEY}", message, hashlib.sha256).hexdigest()}})
with urllib.request.urlopen(request, timeout=10) as response:
    print(response.status, response.read().decode())
"""
    return host.run("python3", "-c", code)


def test_user_data_provisions_the_release_and_signals_success_only_when_ready(host: Host, release: Release):
    failure = f"-e 1 --stack {STACK} --region {REGION} --resource GatewayGroup readyz=000"

    # A bundle whose play matches no host: ansible-playbook would exit 0 having done nothing.
    nohost = host.boot_with_user_data(f"{release.version}-nohost")
    assert nohost.returncode != 0, output(nohost)
    assert "does not target this host" in nohost.stderr, output(nohost)
    assert host.log("cfn-signal.log") == [failure]
    assert not (host.root / "etc/systemd/system/edge-gateway.service").exists()

    # A play that fails: the bundle under this version holds no wheel of it.
    failing = host.boot_with_user_data("9.9.9")
    assert failing.returncode != 0, output(failing)
    assert "No matching distribution found for edge-gateway" in failing.stdout + failing.stderr, output(failing)
    assert host.log("cfn-signal.log") == [failure] * 2

    # The release: success, signalled once, while /readyz answers 200.
    booted = host.boot_with_user_data(release.version)
    assert booted.returncode == 0, output(booted)
    assert host.log("cfn-signal.log")[2:] == [f"-e 0 --stack {STACK} --region {REGION} --resource GatewayGroup readyz=200"]

    # It is the real gateway, from the release's wheelhouse, under systemd as its own user.
    installed = host.run("/opt/edge-gateway/venv/bin/python", "-c",
                         "import importlib.metadata as m, gateway.service; print(m.version('edge-gateway'))")
    assert installed.stdout.strip() == release.version, output(installed)
    assert host.readyz() == "200"
    assert host.run("systemctl", "show", "-p", "User", "--value", "edge-gateway.service").stdout.strip() == "edge-gateway"

    # What the user data asked of the stand-ins: IMDSv2 only, the pinned release, Python 3.11.
    artifacts = f"s3://{release.bucket}/{release.prefix}/{release.version}/edge-gateway-{release.version}.tar.gz"
    assert f"s3 cp --only-show-errors {artifacts} edge-gateway-{release.version}.tar.gz" in host.log("aws.log")
    assert f"s3 cp --only-show-errors {artifacts}.sha256 edge-gateway-{release.version}.tar.gz.sha256" in host.log("aws.log")
    assert host.log("dnf.log")[-1] == "install -y -q python3.11 python3.11-pip aws-cfn-bootstrap"
    imds = host.log("imds.log")
    assert "GET /latest/meta-data/tags/instance/edge-gateway:group 200" in imds
    assert not [line for line in imds if line.endswith(" 401")], imds
    assert any(line.startswith("-a fetch-config -m ec2 -s -c file:") for line in host.log("cloudwatch-agent.log"))

    # The WAL lives on its own volume, mounted by UUID, nofail.
    mounted = host.run("findmnt", "-n", "-o", "FSTYPE", WAL)
    assert mounted.stdout.strip() == "xfs", output(mounted)
    fstab = [line.split() for line in (host.root / "etc/fstab").read_text().splitlines() if WAL in line]
    assert len(fstab) == 1 and fstab[0][0].startswith("UUID=") and "nofail" in fstab[0][3].split(","), fstab

    # The unit passes systemd's own checks; the health watchdog probes liveness and needs no AWS.
    verify = host.run("systemd-analyze", "verify", "--man=no", "/etc/systemd/system/edge-gateway.service")
    assert verify.returncode == 0, output(verify)
    security = host.run("systemd-analyze", "security", "--no-pager", "--threshold=50", "edge-gateway.service")
    assert security.returncode == 0, output(security)
    probe = host.run("systemctl", "start", "edge-gateway-health-watchdog.service")
    assert probe.returncode == 0, output(probe)
    assert host.run("cat", "/run/edge-gateway-health-watchdog/failures").stdout.strip() == "0"

    # A device's records are acknowledged...
    accepted = signed_telemetry(host, records=5)
    assert accepted.returncode == 0 and accepted.stdout.startswith("202 "), output(accepted)
    assert json.loads(accepted.stdout.split(" ", 1)[1])["accepted"] == 5

    # ...the unit restarts cleanly (it drains, then comes back ready)...
    restarted = host.run("systemctl", "restart", "edge-gateway.service", timeout=90)
    assert restarted.returncode == 0, output(restarted)
    assert host.wait_ready() == "200"
    assert host.run("systemctl", "show", "-p", "NRestarts", "--value", "edge-gateway.service").stdout.strip() == "0"

    # ...and stopping it lands what it acknowledged in the lake.
    stopped = host.run("systemctl", "stop", "edge-gateway.service", timeout=90)
    assert stopped.returncode == 0, output(stopped)
    assert host.run("systemctl", "show", "-p", "Result", "--value", "edge-gateway.service").stdout.strip() == "success"
    log = (host.root / "var/log/edge-gateway/gateway.log").read_text()
    drained = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"msg":"drained"' in line]
    assert drained and all(entry["landed_everything"] for entry in drained), log[-4000:]
    objects = host.moto("s3", "list_objects_v2", Bucket="edge-gateway-test-lake", Prefix="raw/")
    assert objects.get("KeyCount", 0) >= 1, objects
