#!/usr/bin/env bash
# Create (or reuse) .venv and install batchinfer with pinned versions.
# Usage: scripts/bootstrap.sh [extra]   e.g. "test" or "test,bench"
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${extra:-base}"
if [ ! -f "$stamp" ]; then
  echo "installing batchinfer${extra:+ [$extra]} into .venv (pinned by constraints.txt) ..." >&2
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e "$spec" \
      > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
  touch "$stamp"
fi
