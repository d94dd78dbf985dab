#!/usr/bin/env bash
# GPU check, end to end, on a machine with CUDA: environment report, the GPU tests, the demo on the GPU,
# and flow-vs-bare-loop throughput on the same device. Writes a summary to ${OUT:-gpu-check}/.
# Usage: scripts/gpu-check.sh [ROWS]   (default 2,000,000 rows for the throughput run)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
rows="${1:-2000000}"
export PREFECT_HOME="$(mktemp -d)" PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=python3
if [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
summary="$out/summary.md"
echo "# GPU check $(date -u +%FT%TZ)" > "$summary"

echo "## environment" | tee -a "$summary"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not found"
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())"
} 2>&1 | tee -a "$summary"

echo "## GPU tests" | tee -a "$summary"
$py -m pytest -q -m gpu tests/test_gpu.py tests/test_devices.py 2>&1 | tail -5 | tee -a "$summary"

echo "## demo on the GPU" | tee -a "$summary"
$py -m batchinfer.cli demo --workdir "$(mktemp -d)/demo" 2>&1 | tail -4 | tee -a "$summary"

echo "## throughput: flow vs bare loop on the same device" | tee -a "$summary"
$py -m benchmarks.run --rows "$rows" --device auto --json "$out/throughput.json" 2>&1 | tail -30 | tee -a "$summary"
echo "summary: $summary"
