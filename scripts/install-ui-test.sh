#!/usr/bin/env bash
# Install what the UI test (tests/test_browser.py) needs from Debian, unless it is already there: Chromium,
# which the test drives through playwright's Python package (a pinned test dependency; playwright's own
# browser download is never used), and PostgreSQL, whose binaries start the throwaway database behind the
# test's Prefect server (tests/postgres.py; the package's own cluster is not used).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root=()
  if [ "$(id -u)" != 0 ]; then
    as_root=(sudo -n)  # fails at once instead of asking for a password nobody sees
  fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
chromium --version 2>/dev/null || true
