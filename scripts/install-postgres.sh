#!/usr/bin/env bash
# Install Debian's PostgreSQL for the UI test's Prefect server (tests/postgres.py) unless it is already there.
# The test starts its own throwaway cluster on loopback; the package's own cluster is not used.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q postgresql
