#!/usr/bin/env bash
# The long kill campaign: SIGKILL `batchinfer run` 50 times at random moments, rerun the same command after
# each kill, and check that nothing is lost, left behind or wrongly marked as succeeded (tests/test_kills.py).
# Usage: scripts/kill-campaign.sh [KILLS] [SEED]   (the summary is also written to test-artifacts/kill-campaign.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
export BATCHINFER_KILLS="${1:-50}"
if [ -n "${2:-}" ]; then export BATCHINFER_KILL_SEED="$2"; fi
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d -t batchinfer-prefect-XXXXXX)}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -s -p no:cacheprovider tests/test_kills.py
