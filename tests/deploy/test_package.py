"""`make package` (deploy/package.sh): the release bundle the hosts provision from, and the templates
packaged for `aws cloudformation deploy`, built offline and checked without an AWS account."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.decode import decode

from .conftest import ANSIBLE, CFN, DEPLOY, REPO, Release, output, run, tool

sys_path_package_templates = DEPLOY / "package_templates.py"


@pytest.fixture(scope="module")
def unpacked(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle, unpacked once (reading a 100+ MiB gzip member by member would unpack it each time)."""
    target = tmp_path_factory.mktemp("bundle")
    with tarfile.open(release.bundle) as bundle:
        bundle.extractall(target, filter="data")
    return target


def members(unpacked: Path) -> set[str]:
    return {p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()}


def read(unpacked: Path, name: str) -> bytes:
    return (unpacked / name).read_bytes()


def test_package_needs_a_bucket():
    result = run(["bash", str(DEPLOY / "package.sh")], cwd=REPO)
    assert result.returncode == 64, output(result)
    assert "--s3-bucket" in result.stderr


def test_make_package_runs_the_script():
    result = run(["make", "-n", "package", "ARTIFACT_BUCKET=releases-bucket"], cwd=REPO)
    assert result.returncode == 0, output(result)
    assert "deploy/package.sh --s3-bucket \"releases-bucket\"" in result.stdout, output(result)


# ---- the bundle --------------------------------------------------------------------------------------

def test_the_bundle_is_checksummed_and_lists_what_it_holds(release: Release, unpacked: Path):
    checksum = release.bundle.with_name(release.bundle.name + ".sha256").read_text().split()
    assert checksum == [hashlib.sha256(release.bundle.read_bytes()).hexdigest(), release.bundle.name]
    manifest = json.loads(read(unpacked, "MANIFEST.json"))
    assert manifest["version"] == release.version
    for name, digest in manifest["wheelhouse"].items():
        assert hashlib.sha256(read(unpacked, f"wheelhouse/{name}")).hexdigest() == digest, name
    assert {n.split("/")[1] for n in members(unpacked) if n.startswith("wheelhouse/")} == set(manifest["wheelhouse"])
    assert release.manifest["bundle"]["sha256"] == checksum[0]


def test_the_wheelhouse_holds_this_project_and_every_extra_the_fleet_installs(release: Release, unpacked: Path):
    wheels = json.loads(read(unpacked, "MANIFEST.json"))["wheelhouse"]
    assert f"edge_gateway-{release.version}-py3-none-any.whl" in wheels
    names = {re.split(r"-\d", name, maxsplit=1)[0].lower() for name in wheels}
    assert {"aiohttp", "msgspec", "pyarrow", "aiobotocore", "tritonclient"} <= names  # core, [s3], [triton]
    tasks = (ANSIBLE / "roles" / "edge_gateway" / "tasks" / "main.yml").read_text()
    (extras,) = re.findall(r'edge-gateway\[([a-z0-9,]+)\]==', tasks)
    assert set(extras.split(",")) <= {"s3", "triton"}, "the role installs an extra the wheelhouse does not carry"


def test_the_bundle_pins_the_ansible_the_hosts_run(unpacked: Path):
    manifest = json.loads(read(unpacked, "MANIFEST.json"))
    pins = [line for line in (ANSIBLE / "requirements-ansible.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins == manifest["provisioning"]["requirements"] and all("==" in pin for pin in pins)
    name, version = pins[0].split("==")
    assert f"{name.replace('-', '_')}-{version}-py3-none-any.whl" in manifest["provisioning"]["wheels"]


def test_the_bundle_carries_the_pinned_collections(unpacked: Path):
    wanted = yaml.safe_load((ANSIBLE / "requirements.yml").read_text())["collections"]
    assert all(c["version"].startswith("==") for c in wanted), "collections are pinned to one version"
    manifest = json.loads(read(unpacked, "MANIFEST.json"))["collections"]
    assert manifest["versions"] == {c["name"]: c["version"].removeprefix("==") for c in wanted}
    assert manifest["source"] in {"galaxy", "installed"}
    for collection in wanted:
        namespace, name = collection["name"].split(".")
        info = json.loads(read(unpacked, f"ansible/collections/ansible_collections/{namespace}/{name}/MANIFEST.json"))
        assert info["collection_info"]["version"] == collection["version"].removeprefix("==")


def fqcn_plugins() -> set[tuple[str, str]]:
    """(collection, plugin) for every non-builtin module, inventory or connection the tree names."""
    found = set()
    for path in ANSIBLE.rglob("*.yml"):
        if "collections" in path.relative_to(ANSIBLE).parts:
            continue
        for match in re.finditer(r"\b((?!ansible\.builtin)(?:amazon|ansible|community)\.[a-z_]+)\.([a-z0-9_]+)\b", path.read_text()):
            found.add((match.group(1), match.group(2)))
    return found


def test_every_collection_plugin_the_roles_and_inventories_use_is_in_the_bundle(unpacked: Path):
    names = members(unpacked)
    used = fqcn_plugins()
    assert ("community.general", "filesystem") in used and ("ansible.posix", "mount") in used
    for collection, plugin in used:
        namespace, name = collection.split(".")
        base = f"ansible/collections/ansible_collections/{namespace}/{name}/plugins"
        assert any(f"{base}/{kind}/{plugin}.py" in names for kind in ("modules", "inventory", "connection")), (collection, plugin)


def syntax_check(ansible_dir: Path, collections: str) -> Any:
    # Only the collections given: neither the ones installed beside this Ansible nor a user's own.
    return run([tool("ansible-playbook"), "-i", "inventories/local/hosts.yml", "playbooks/site.yml", "--syntax-check"],
               cwd=ansible_dir, env={"ANSIBLE_COLLECTIONS_PATH": collections, "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "false",
                                     "ANSIBLE_CONFIG": str(ansible_dir / "ansible.cfg"), "HOME": str(ansible_dir)})


def test_the_playbook_resolves_with_the_bundle_alone(unpacked: Path, tmp_path: Path):
    ansible = unpacked / "ansible"
    result = syntax_check(ansible, str(ansible / "collections"))
    assert result.returncode == 0, output(result)
    # Without them (the old `tar -C deploy/ansible .` bundle) the modules of the WAL volume do not resolve.
    bare = syntax_check(ansible, str(tmp_path))
    assert bare.returncode != 0 and "community.general.filesystem" in bare.stdout + bare.stderr, output(bare)


def test_the_bundle_holds_the_ansible_tree_as_it_is(unpacked: Path):
    names = {n.removeprefix("ansible/") for n in members(unpacked)
             if n.startswith("ansible/") and not n.startswith("ansible/collections/")}
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "."], cwd=ANSIBLE).stdout.split()
    expected = {n for n in listed if (ANSIBLE / n).is_file() and "__pycache__" not in n and not n.startswith("collections/")}
    assert names == expected
    assert read(unpacked, "ansible/playbooks/site.yml") == (ANSIBLE / "playbooks" / "site.yml").read_bytes()


# ---- the templates -------------------------------------------------------------------------------------

def packaged(release: Release) -> dict[str, Any]:
    template, matches = decode(str(release.out / "cloudformation" / "main.yaml"))
    assert not matches, matches
    return json.loads(json.dumps(template))


def artifact(release: Release, key: str) -> Path:
    path = release.bucket_dir / key
    assert path.is_file(), key
    return path


def key_of_url(url: Any, release: Release) -> str:
    match = re.fullmatch(rf"https://{release.bucket}\.s3\.\$\{{AWS::Region\}}\.\$\{{AWS::URLSuffix\}}/(.+)", url["Fn::Sub"])
    assert match, url
    return match.group(1)


def source_of(release: Release, key: str) -> str:
    (entry,) = [e for e in release.manifest["cloudformation"]["artifacts"] if e["key"] == key]
    assert hashlib.sha256(artifact(release, key).read_bytes()).hexdigest() == entry["sha256"]
    return entry["source"]


def unpackage(template: dict[str, Any], release: Release, base: Path) -> dict[str, Any]:
    """Put the local paths back where the packager put S3 locations."""
    for resource in template.get("Resources", {}).values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::CloudFormation::Stack":
            props["TemplateURL"] = "./" + Path(source_of(release, key_of_url(props["TemplateURL"], release))).relative_to(base).as_posix()
        elif resource["Type"] == "AWS::Lambda::Function" and isinstance(props.get("Code"), dict) and "S3Key" in props["Code"]:
            assert props["Code"]["S3Bucket"] == release.bucket
            props["Code"] = "./" + Path(source_of(release, props["Code"]["S3Key"])).relative_to(base).as_posix()
        elif resource["Type"] == "AWS::StepFunctions::StateMachine" and isinstance(props.get("DefinitionS3Location"), dict):
            assert props["DefinitionS3Location"]["Bucket"] == release.bucket
            props["DefinitionS3Location"] = "./" + Path(source_of(release, props["DefinitionS3Location"]["Key"])).relative_to(base).as_posix()
    return template


def decoded(path: Path) -> dict[str, Any]:
    template, matches = decode(str(path))
    assert not matches, matches
    return json.loads(json.dumps(template))


def test_the_packaged_root_and_children_are_the_sources_with_s3_locations(release: Release):
    base = Path("deploy/cloudformation")
    root = packaged(release)
    assert unpackage(root, release, base) == decoded(CFN / "main.yaml")
    children = [e for e in release.manifest["cloudformation"]["artifacts"] if e["kind"] == "template"]
    nested = {r["Properties"]["TemplateURL"] for r in decoded(CFN / "main.yaml")["Resources"].values()
              if r["Type"] == "AWS::CloudFormation::Stack"}
    assert {"./" + Path(e["source"]).relative_to(base).as_posix() for e in children} == nested
    for entry in children:
        template, matches = decode(str(artifact(release, entry["key"])))
        assert not matches, matches
        child = unpackage(json.loads(json.dumps(template)), release, base)
        assert child == decoded(REPO / entry["source"]), entry["source"]


def test_lambda_code_and_state_machines_are_uploaded_as_they_are(release: Release):
    entries = release.manifest["cloudformation"]["artifacts"]
    for entry in (e for e in entries if e["kind"] == "lambda"):
        with zipfile.ZipFile(artifact(release, entry["key"])) as archive:
            for info in archive.infolist():
                assert info.date_time == (1980, 1, 1, 0, 0, 0)
                assert archive.read(info) == (REPO / entry["source"] / info.filename).read_bytes()
            assert "handler.py" in archive.namelist()
    machines = [e for e in entries if e["kind"] == "state-machine"]
    assert {e["source"] for e in machines} == {f"deploy/cloudformation/statemachines/{p.name}" for p in (CFN / "statemachines").glob("*.asl.json")}
    for entry in machines:
        assert artifact(release, entry["key"]).read_bytes() == (REPO / entry["source"]).read_bytes()


def test_the_packaged_templates_pass_cfn_lint(release: Release):
    children = [str(artifact(release, e["key"])) for e in release.manifest["cloudformation"]["artifacts"] if e["kind"] == "template"]
    result = run([tool("cfn-lint"), "--ignore-checks", "I4010", "W8003", "--", str(release.out / "cloudformation" / "main.yaml"), *children])
    assert result.returncode == 0, output(result)
    text = (release.out / "cloudformation" / "main.yaml").read_text()
    assert "./" not in re.sub(r"https://\S+", "", text)


def test_packaging_is_reproducible(tmp_path: Path):
    def package(out: Path) -> dict[str, str]:
        result = run([os.environ.get("PYTHON", tool("python")), str(sys_path_package_templates), "--template", str(CFN / "main.yaml"),
                      "--s3-bucket", "b", "--s3-prefix", "p/1/cloudformation", "--artifacts", str(out / "s3"),
                      "--output", str(out / "main.yaml")])
        assert result.returncode == 0, output(result)
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}

    assert package(tmp_path / "one") == package(tmp_path / "two")


def test_the_packager_refuses_a_local_path_it_cannot_upload(tmp_path: Path):
    template = tmp_path / "t.yaml"
    template.write_text("Resources:\n  Thing:\n    Type: AWS::Glue::Job\n    Properties:\n      Command: {ScriptLocation: ./job.py}\n")
    result = run([tool("python"), str(sys_path_package_templates), "--template", str(template), "--s3-bucket", "b",
                  "--s3-prefix", "p", "--artifacts", str(tmp_path / "s3"), "--output", str(tmp_path / "out.yaml")])
    assert result.returncode != 0 and "./job.py" in result.stderr, output(result)


@pytest.mark.parametrize("script", [DEPLOY / "package.sh", DEPLOY / "install-lint-tools.sh",
                                    *sorted(p for p in (Path(__file__).parent / "standins").iterdir() if p.is_file() and p.suffix != ".py")],
                         ids=lambda p: p.name)
def test_the_scripts_pass_shellcheck(script: Path):
    result = run([tool("shellcheck"), "--shell=bash", "--severity=style", str(script)])
    assert result.returncode == 0, output(result)
