#!/usr/bin/env bash
# Install the offline provisioning check tools.
#
#   deploy/install-lint-tools.sh VENV_DIR
#
# Creates VENV_DIR (a Python >= 3.11 virtualenv) if needed, installs deploy/requirements-lint.txt into
# it, and installs the system packages the checks call (promtool from Debian's prometheus package,
# the shellcheck linter for the hosts' scripts, debootstrap and systemd-container for the boot test)
# and cfn-guard (the static binary shipped in the npm package @cdklabs/cdk-validator-cfnguard,
# linked as VENV_DIR/bin/cfn-guard). It also builds, once, the minimal Debian root that the boot test
# provisions with the launch template's user data (VENV_DIR/share/rootfs-bookworm), so the tests
# themselves never leave the machine. Set SKIP_ROOTFS=1 to skip that step.
# With UV set to a uv binary, uv installs the Python packages (pip otherwise: over a minute slower).
# Runs as root, non-interactively.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 64
fi
venv=$(realpath -m "$1")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CFN_GUARD_NPM_VERSION=0.0.62  # bundles cfn-guard 3.1.1
python=${PYTHON:-python3}

if [[ $(id -u) -ne 0 ]]; then
    echo "$0: run as root (apt-get installs system packages)" >&2
    exit 77
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    prometheus shellcheck debootstrap systemd-container python3-venv ca-certificates
# Only promtool is needed; the packaged server must not keep running on the machine.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus || true
fi

if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv "$venv"
fi
if [[ -n ${UV:-} ]]; then
    install=("$UV" pip install --quiet --python "$venv/bin/python")
else
    "$venv/bin/python" -m pip install -q --upgrade pip
    install=("$venv/bin/python" -m pip install -q)
fi
"${install[@]}" -r "$here/requirements-lint.txt"
# The gateway itself, so the checks can run its `edge-gateway check-config` on the rendered configs.
"${install[@]}" -e "$here/..[s3,triton]"

if ! command -v npm >/dev/null 2>&1; then
    apt-get install -y -q --no-install-recommends npm
fi
guard_dir=$venv/share/cfn-guard
npm install --silent --no-audit --no-fund --prefix "$guard_dir" "@cdklabs/cdk-validator-cfnguard@$CFN_GUARD_NPM_VERSION"
ln -sf "$guard_dir/node_modules/@cdklabs/cdk-validator-cfnguard/bin/ubuntu/x86_64/cfn-guard" "$venv/bin/cfn-guard"

# The root stands in for the gateway AMI: it already carries what the roles install (so the boot test
# provisions it offline) and Python 3.11, the fleet's interpreter.
rootfs=$venv/share/rootfs-bookworm
rootfs_packages=python3,python3-venv,python3-packaging,python3-apt,procps,systemd,systemd-sysv,dbus,curl,ca-certificates,xfsprogs
if [[ ${SKIP_ROOTFS:-0} != 1 ]]; then
    if [[ ! -x $rootfs/usr/bin/python3 ]]; then
        rm -rf "$rootfs.partial"
        mkdir -p "$(dirname "$rootfs")"
        debootstrap --variant=minbase --include="$rootfs_packages" \
            bookworm "$rootfs.partial" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
        mv "$rootfs.partial" "$rootfs"
    fi
    # A root built by an earlier version of this script may lack packages added to the list since.
    missing=()
    for package in ${rootfs_packages//,/ }; do
        # shellcheck disable=SC2016 # ${Status} is dpkg-query's format, not the shell's
        chroot "$rootfs" dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
    done
    if ((${#missing[@]})); then
        chroot "$rootfs" apt-get update -q
        chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
        chroot "$rootfs" apt-get clean
    fi
fi

"$venv/bin/python" - <<'PY'
import shutil, subprocess, sys
for tool in ("cfn-lint", "checkov", "statelint", "ansible-lint", "ansible-playbook", "hadolint", "cfn-guard"):
    print(f"{tool}: {'ok' if shutil.which(tool, path=sys.prefix + '/bin') else 'MISSING'}")
print("promtool:", subprocess.run(["promtool", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
print("shellcheck:", subprocess.run(["shellcheck", "--version"], capture_output=True, text=True).stdout.splitlines()[1])
PY
