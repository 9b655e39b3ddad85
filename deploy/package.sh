#!/usr/bin/env bash
# Build what a release deploys, without calling AWS:
#
#   deploy/package.sh --s3-bucket BUCKET [--s3-prefix releases] [--out build/package]
#
# OUT/s3/                mirrors the artifact bucket: `aws s3 sync OUT/s3/ s3://BUCKET/`
#   PREFIX/VERSION/edge-gateway-VERSION.tar.gz(.sha256)   the release bundle the hosts provision from:
#       wheelhouse/            `pip wheel` of this project and its dependencies (the gateway)
#       provisioning/          the pinned ansible-core (requirements.txt) and its wheels
#       ansible/               deploy/ansible, with collections/ holding the pinned collections
#                              of deploy/ansible/requirements.yml
#       MANIFEST.json          what is inside, with versions and checksums
#   PREFIX/VERSION/cloudformation/<sha256>.{template,zip,json}   nested templates, Lambda code, ASL
# OUT/cloudformation/main.yaml   the root template with every local path replaced by its S3 location,
#                                for `aws cloudformation deploy --template-file`
# OUT/manifest.json              every artifact, its checksum and its key; the commands to deploy
#
# Collections come from galaxy when it answers (ansible-galaxy collection install -r requirements.yml);
# otherwise, or with COLLECTIONS_SOURCE=installed, from the collections installed beside the Ansible
# that runs this script (the `ansible` package), provided their versions are exactly the pinned ones.
#
# Wheels are built for the machine running this script: build on Linux x86_64 with Python 3.11, as the
# fleet runs (Amazon Linux 2023, python3.11).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
python=${PYTHON:-python3}
bucket=${ARTIFACT_BUCKET:-}
prefix=${ARTIFACT_PREFIX:-releases}
out=${PACKAGE_DIR:-$repo/build/package}
collections_source=${COLLECTIONS_SOURCE:-auto}

usage() {
    echo "usage: $0 --s3-bucket BUCKET [--s3-prefix PREFIX] [--out DIR]" >&2
    exit 64
}
while (($#)); do
    case $1 in
        --s3-bucket) bucket=${2:-}; shift 2 ;;
        --s3-prefix) prefix=${2:-}; shift 2 ;;
        --out) out=${2:-}; shift 2 ;;
        *) usage ;;
    esac
done
[[ -n $bucket ]] || { echo "$0: name the artifact bucket (--s3-bucket or ARTIFACT_BUCKET)" >&2; usage; }
[[ $bucket =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || { echo "$0: '$bucket' is not a bucket name" >&2; exit 64; }
[[ $prefix =~ ^[A-Za-z0-9._/-]+$ && $prefix != /* && $prefix != */ ]] || { echo "$0: bad prefix '$prefix'" >&2; exit 64; }

say() { echo "package: $*" >&2; }

copy_tree() {  # copy_tree FROM TO PATH...: the files git sees under PATHs of FROM (tracked or unignored), no collections/
    "$python" - "$@" <<'PY'
import shutil, subprocess, sys
from pathlib import Path

source, target, paths = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *paths],
                        cwd=source, capture_output=True, check=True).stdout.decode().split("\0")
for name in filter(None, listed):
    path = source / name
    if not path.is_file() or "__pycache__" in path.parts or Path(name).parts[0] == "collections":
        continue
    (target / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target / name)
PY
}

tools=$(dirname "$(command -v "$python")")
galaxy=$tools/ansible-galaxy
[[ -x $galaxy ]] || galaxy=$(command -v ansible-galaxy) || { echo "$0: ansible-galaxy not found beside $python" >&2; exit 69; }

read -r version platform <<<"$("$python" - "$repo/pyproject.toml" <<'PY'
import platform, sys, sysconfig, tomllib
with open(sys.argv[1], "rb") as handle:
    print(tomllib.load(handle)["project"]["version"], f"{sys.version_info.major}.{sys.version_info.minor}-{sysconfig.get_platform()}")
PY
)"
if [[ $platform != 3.11-linux-x86_64 ]]; then
    echo "$0: wheels built here ($platform) would not install on the fleet (3.11-linux-x86_64)" >&2
    exit 69
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
release_dir=$out/s3/$prefix/$version
bundle_name=edge-gateway-$version.tar.gz
rm -rf "$out"
mkdir -p "$release_dir" "$out/cloudformation"
bundle=$work/bundle
mkdir -p "$bundle/wheelhouse" "$bundle/provisioning/wheels" "$bundle/ansible"

# 1. The gateway's wheelhouse, from this checkout as git sees it (tracked and unignored files), built
#    in a copy so that parallel builds never share a build/ directory. With every extra the fleet may
#    install (the edge_gateway role installs edge-gateway[s3]; Triton scoring needs [triton]), at the
#    versions CI tested (requirements.lock).
say "building the wheelhouse of edge-gateway $version"
src=$work/src
copy_tree "$repo" "$src" pyproject.toml README.md gateway batching connectors
constraints=()
[[ -f $repo/requirements.lock ]] && constraints=(-c "$repo/requirements.lock")
"$python" -m pip wheel --quiet --disable-pip-version-check "${constraints[@]}" -w "$bundle/wheelhouse" "${src}[s3,triton]" >&2
[[ -f $bundle/wheelhouse/edge_gateway-$version-py3-none-any.whl ]] \
    || { echo "$0: no edge_gateway-$version wheel was built" >&2; exit 70; }

# 2. The Ansible the hosts run the playbook with.
say "building the provisioning wheels ($(grep -v '^#' "$here/ansible/requirements-ansible.txt" | xargs))"
cp "$here/ansible/requirements-ansible.txt" "$bundle/provisioning/requirements.txt"
"$python" -m pip wheel --quiet --disable-pip-version-check -w "$bundle/provisioning/wheels" \
    -r "$bundle/provisioning/requirements.txt" >&2

# 3. The Ansible tree and its pinned collections.
copy_tree "$here/ansible" "$bundle/ansible" .
collections=$bundle/ansible/collections
install_collections() {  # install_collections REQUIREMENTS: into the bundle, offline or not
    "$galaxy" collection install --force --no-deps -r "$1" -p "$collections" >&2
}
source_used=
if [[ $collections_source == auto || $collections_source == galaxy ]]; then
    say "installing the pinned collections from galaxy"
    if install_collections "$here/ansible/requirements.yml"; then
        source_used=galaxy
    elif [[ $collections_source == galaxy ]]; then
        echo "$0: galaxy did not deliver the collections" >&2
        exit 69
    else
        say "galaxy is unreachable: vendoring the installed collections of the pinned versions instead"
        rm -rf "$collections"
    fi
fi
if [[ -z $source_used ]]; then
    "$python" - "$here/ansible/requirements.yml" "$work/vendored.yml" <<'PY'
import json, sys
from pathlib import Path
import yaml
import ansible_collections

wanted = yaml.safe_load(Path(sys.argv[1]).read_text())["collections"]
roots = [Path(p) for p in ansible_collections.__path__]
entries = []
for item in wanted:
    namespace, name = item["name"].split(".")
    pin = item["version"].removeprefix("==")
    for root in roots:
        manifest = root / namespace / name / "MANIFEST.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())["collection_info"]["version"]
            if found != pin:
                sys.exit(f"{item['name']} {found} is installed, but requirements.yml pins {pin}")
            entries.append({"name": str(manifest.parent), "type": "dir"})
            break
    else:
        sys.exit(f"{item['name']} is not installed beside this Ansible; install the `ansible` package of deploy/requirements-lint.txt")
Path(sys.argv[2]).write_text(yaml.safe_dump({"collections": entries}))
PY
    install_collections "$work/vendored.yml"
    source_used=installed
fi

# 4. The bundle's manifest, then the bundle.
"$python" - "$bundle" "$version" "$source_used" "$here/ansible/requirements.yml" "$repo" <<'PY'
import hashlib, json, subprocess, sys
from pathlib import Path
import yaml

bundle, version, source, requirements, repo = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]

def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

pins = {c["name"]: c["version"].removeprefix("==") for c in yaml.safe_load(requirements.read_text())["collections"]}
collections = {}
for manifest in sorted((bundle / "ansible" / "collections" / "ansible_collections").glob("*/*/MANIFEST.json")):
    info = json.loads(manifest.read_text())["collection_info"]
    collections[f"{info['namespace']}.{info['name']}"] = info["version"]
if collections != pins:
    sys.exit(f"the bundle's collections {collections} are not the pinned ones {pins}")
commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "gateway", "batching", "connectors",
                             "pyproject.toml", "deploy/ansible"], capture_output=True, text=True).stdout.strip())
manifest = {
    "name": "edge-gateway",
    "version": version,
    "source": {"commit": commit, "modified": dirty},
    "wheelhouse": {p.name: digest(p) for p in sorted((bundle / "wheelhouse").glob("*.whl"))},
    "provisioning": {
        "requirements": [line for line in (bundle / "provisioning" / "requirements.txt").read_text().splitlines()
                         if line and not line.startswith("#")],
        "wheels": {p.name: digest(p) for p in sorted((bundle / "provisioning" / "wheels").glob("*.whl"))},
    },
    "collections": {"versions": collections, "source": source},
    "playbook": "ansible/playbooks/site.yml",
    "inventory": "ansible/inventories/local/hosts.yml",
}
(bundle / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
PY
say "writing $bundle_name"
tar --sort=name --owner=0 --group=0 --numeric-owner -C "$bundle" -czf "$release_dir/$bundle_name" .
(cd "$release_dir" && sha256sum "$bundle_name" >"$bundle_name.sha256")

# 5. The templates, with nested templates, Lambda code and state machine definitions as S3 artifacts.
say "packaging the CloudFormation templates"
"$python" "$here/package_templates.py" --template "$here/cloudformation/main.yaml" --s3-bucket "$bucket" \
    --s3-prefix "$prefix/$version/cloudformation" --artifacts "$out/s3" --output "$out/cloudformation/main.yaml" \
    --manifest "$work/templates.json"

"$python" - "$out" "$bucket" "$prefix" "$version" "$bundle_name" "$work/templates.json" <<'PY'
import hashlib, json, sys
from pathlib import Path

out, bucket, prefix, version, bundle_name, templates = Path(sys.argv[1]), *sys.argv[2:6], Path(sys.argv[6])
bundle = out / "s3" / prefix / version / bundle_name
inner = json.loads(__import__("tarfile").open(bundle).extractfile("./MANIFEST.json").read())
manifest = {
    "version": version,
    "bucket": bucket,
    "bundle": {"key": f"{prefix}/{version}/{bundle_name}", "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
               "bytes": bundle.stat().st_size, "collections": inner["collections"], "source": inner["source"]},
    "cloudformation": json.loads(templates.read_text()),
    "deploy": [
        f"aws s3 sync {out / 's3'}/ s3://{bucket}/",
        f"aws cloudformation deploy --template-file {out / 'cloudformation' / 'main.yaml'} --s3-bucket {bucket} "
        f"--s3-prefix {prefix}/{version}/cloudformation --role-arn $DEPLOY_ROLE_ARN --capabilities CAPABILITY_IAM "
        f"CAPABILITY_NAMED_IAM CAPABILITY_AUTO_EXPAND --parameter-overrides ArtifactBucketName={bucket} "
        f"ArtifactPrefix={prefix} GatewayVersion={version} DeployRoleArn=$DEPLOY_ROLE_ARN ...",
    ],
}
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
PY
say "done: $out (collections from $source_used)"
echo "$out"
