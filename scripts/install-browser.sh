#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_browser.py) unless it is already there.
# The test drives this Chromium through playwright's Python package (a pinned test dependency);
# playwright's own browser download is never used.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  chromium --version 2>/dev/null || true
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q chromium
chromium --version 2>/dev/null || true
