#!/usr/bin/env bash
# Quick start, part 1: install, then run the demo (sample data, a trained checkpoint, the flow on both models).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/batchinfer demo "$@"
