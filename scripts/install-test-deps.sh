#!/usr/bin/env bash
# Installs everything `cargo test --workspace` talks to: real peers and real clients.
# Idempotent; safe to run on a developer machine. Debian packages via apt-get, Python tools into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(openssl dnsutils curl iproute2 iptables procps iputils-ping util-linux docker-compose prometheus
  protobuf-compiler libprotobuf-dev etcd-server etcd-client)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-test-deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# aws CLI (v1, from PyPI), boto3 and pytest in a project venv, so tests use the real AWS clients.
if [ ! -x .venv/bin/aws ] || ! .venv/bin/python -c 'import boto3, pytest' 2>/dev/null; then
  echo "install-test-deps: python venv with awscli, boto3, pytest"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check awscli boto3 pytest
fi
echo "install-test-deps: ok ($(.venv/bin/aws --version 2>&1 | cut -d' ' -f1), $(openssl version | cut -d' ' -f1-2))"
