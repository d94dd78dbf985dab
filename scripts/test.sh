#!/usr/bin/env bash
# Quick start, part 2: install with test extras, then run the whole test suite.
# Services the tests need (a local S3 server, a Prefect server) are started and stopped by the tests;
# Debian's Chromium and PostgreSQL (for the Prefect UI test) are installed with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test,dask,ray
# Debian's Chromium and PostgreSQL for the UI test, if missing; without them only that test fails, saying so.
scripts/install-ui-test.sh >/dev/null || echo "scripts/install-ui-test.sh failed; tests/test_browser.py will fail" >&2
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d -t batchinfer-prefect-XXXXXX)}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1
# Two workers (pytest-xdist), each test file whole on one: most tests wait on servers and subprocesses, so two
# keep 2 cores busy (BENCHMARKS.md, "The test suite"). Each worker has its own device locks and Prefect home.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
