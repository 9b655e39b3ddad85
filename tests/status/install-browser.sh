#!/bin/sh
# The browser the status-page test drives through Playwright: Debian's Chromium (no browser download).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium fonts-dejavu-core
