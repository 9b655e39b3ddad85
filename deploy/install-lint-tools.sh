#!/usr/bin/env bash
# Install the offline provisioning check tools.
#
#   deploy/install-lint-tools.sh VENV_DIR
#
# Creates VENV_DIR (a Python >= 3.11 virtualenv) if needed, installs deploy/requirements-lint.txt into
# it, and installs the system packages the checks call (promtool from Debian's prometheus package,
# debootstrap and systemd-container for the role boot test). Runs as root, non-interactively.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 64
fi
venv=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}

if [[ $(id -u) -ne 0 ]]; then
    echo "$0: run as root (apt-get installs system packages)" >&2
    exit 77
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    prometheus debootstrap systemd-container python3-venv ca-certificates
# Only promtool is needed; the packaged server must not keep running on the machine.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus || true
fi

if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$here/requirements-lint.txt"

"$venv/bin/python" - <<'PY'
import shutil, subprocess, sys
for tool in ("cfn-lint", "checkov", "statelint", "ansible-lint", "ansible-playbook", "hadolint"):
    print(f"{tool}: {'ok' if shutil.which(tool, path=sys.prefix + '/bin') else 'MISSING'}")
print("promtool:", subprocess.run(["promtool", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
PY
