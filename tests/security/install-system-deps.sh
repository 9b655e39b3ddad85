#!/bin/sh
# System packages the security tests need: HAProxy (terminates TLS with client certificates).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y haproxy
