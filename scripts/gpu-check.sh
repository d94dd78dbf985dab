#!/usr/bin/env bash
# GPU check, end to end, for a machine with CUDA (install first with `scripts/bootstrap.sh test`):
#   1. environment: nvidia-smi, torch version, CUDA availability, device count
#   2. the GPU tests (tests/test_gpu.py; they skip without CUDA)
#   3. the demo with devices auto (every GPU)
#   4. throughput of the flow against a bare PyTorch loop on the same device and batch size, for the MLP
#      and for MiniLM (benchmarks.run --device auto --only bare,flow), with nvidia-smi's GPU busy % while
#      each ran
# Without CUDA it runs all the same on the CPU (device cpu, fewer rows) and says so.
# Writes summary.md, summary.json, throughput.json, the logs of steps 2-4 and, with nvidia-smi,
# gpu-busy.csv into ${OUT:-gpu-check}/. Exit status 0 when every step passed.
# Usage: [OUT=folder] scripts/gpu-check.sh [ROWS]   (MLP rows of the throughput run; default 10,000,000
#        with CUDA, 500,000 without). SENTENCES (default 200,000 with CUDA, 2,000 without) and TEXT_BATCH
#        (default 256 with CUDA, 64 without) size the MiniLM run. BUDGET_S (default 450) bounds the whole
#        run; BENCH_DIR keeps the data.
set -uo pipefail
if [ -n "${OUT:-}" ]; then # relative to where the script was started
  mkdir -p "$OUT" && out="$(cd "$OUT" && pwd)" || exit 2
fi
cd "$(dirname "$0")/.."
root="$(pwd)"
out="${out:-$root/gpu-check}"
mkdir -p "$out"
for name in summary.md summary.json throughput.json gpu-busy.csv tests.log demo.log throughput.log; do
  rm -f "$out/$name"
done
py="${PYTHON:-python3}" # PYTHON: the interpreter to use; by default the project's .venv when there is one
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
tmp="$(mktemp -d -t gpu-check-XXXXXX)"
mkdir -p "$tmp/prefect"
export PREFECT_HOME="$tmp/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export CUDA_DEVICE_ORDER=PCI_BUS_ID # cuda:N is then nvidia-smi's GPU N
deadline=$((SECONDS + ${BUDGET_S:-450}))
started=$SECONDS
sampler=""
cleanup() {
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# What each step may still take: what is left of the budget (at least 30 s). SIGINT lets Python clean up.
left() { local s=$((deadline - SECONDS)); echo $((s > 30 ? s : 30)); }
step() { # NAME LOG COMMAND...: run, show and log it; sets step_rc and step_s
  local name="$1" log="$2"
  shift 2
  echo
  echo "== $name: $*"
  local t0=$SECONDS
  timeout -s INT -k 30 "$(left)" "$@" 2>&1 | tee "$log"
  step_rc=${PIPESTATUS[0]}
  step_s=$((SECONDS - t0))
  if [ "$step_rc" = 124 ] || [ "$step_rc" = 137 ]; then echo "$name: timed out after ${step_s} s (BUDGET_S=${BUDGET_S:-450})"; fi
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
json.dump(info, open(sys.argv[1], "w"))
if "error" in info:
    print(info["error"])
else:
    print(
        f"torch {info['torch']}, CUDA build {info['cuda_build']}, CUDA available: {info['cuda_available']}, "
        f"{info['device_count']} device(s){': ' + ', '.join(info['devices']) if info['devices'] else ''}"
    )
EOF
env_rc=${PIPESTATUS[0]}
cuda=$($py -c "import json, sys; print(int(json.load(open(sys.argv[1]))['cuda_available']))" "$tmp/torch.json" 2>/dev/null || echo 0)
if [ "$cuda" = 1 ]; then
  rows="${1:-10000000}" sentences="${SENTENCES:-200000}" text_batch="${TEXT_BATCH:-256}"
  note="CUDA: available; the demo uses every GPU, the throughput run cuda:0 with $rows rows"
  note="$note and $sentences sentences"
else
  rows="${1:-500000}" sentences="${SENTENCES:-2000}" text_batch="${TEXT_BATCH:-64}"
  note="CUDA: not available; falling back to device cpu (the GPU tests skip, the demo and the throughput run"
  note="$note on the CPU with $rows rows and $sentences sentences)"
fi
echo "$note" | tee -a "$tmp/environment.txt"

step "GPU tests" "$out/tests.log" $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
tests_rc=$step_rc tests_s=$step_s

step "demo (devices auto)" "$out/demo.log" $py -m cli demo --workdir "$tmp/demo"
demo_rc=$step_rc demo_s=$step_s

# GPU busy % of cuda:0 (the first visible GPU), sampled with nvidia-smi's own clock for the whole benchmark;
# the summary keeps the samples taken while the flow (and the bare loop) ran.
if [ "$cuda" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpu="${CUDA_VISIBLE_DEVICES:-0}"
  gpu="${gpu%%,*}"
  buffering=()
  if command -v stdbuf >/dev/null 2>&1; then buffering=(stdbuf -oL); fi
  ${buffering[@]+"${buffering[@]}"} nvidia-smi -i "$gpu" --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits \
    -lms 200 >"$out/gpu-busy.csv" 2>&1 &
  sampler=$!
fi
step "throughput: flow vs bare loop on the same device" "$out/throughput.log" \
  $py -m benchmarks.run --rows "$rows" --sentences "$sentences" --text-batch-size "$text_batch" --device auto \
  --workloads mlp,minilm --no-ray --only bare,flow --repeats 1 --text-repeats 1 \
  --no-markdown --json "$out/throughput.json" --bench-dir "${BENCH_DIR:-$root/.bench/gpu-check}"
bench_rc=$step_rc bench_s=$step_s
if [ -n "$sampler" ]; then
  kill -INT "$sampler" 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$sampler" 2>/dev/null || break; sleep 0.2; done
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  sampler=""
fi

echo
OUT_DIR="$out" TMP_DIR="$tmp" CUDA="$cuda" ROWS="$rows" SENTENCES="$sentences" TOTAL_S=$((SECONDS - started)) ENV_RC="$env_rc" \
  TESTS_RC="$tests_rc" TESTS_S="$tests_s" DEMO_RC="$demo_rc" DEMO_S="$demo_s" BENCH_RC="$bench_rc" \
  BENCH_S="$bench_s" $py - <<'EOF'
"""summary.md and summary.json from the steps' exit codes, logs and results."""

import datetime as dt
import json
import os
import statistics
from pathlib import Path

out, tmp = Path(os.environ["OUT_DIR"]), Path(os.environ["TMP_DIR"])
cuda = os.environ["CUDA"] == "1"
torch_info = json.loads((tmp / "torch.json").read_text()) if (tmp / "torch.json").exists() else {}


def last_line(path: Path, starts: str = "") -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()] if path.exists() else []
    lines = [line for line in lines if line and line.startswith(starts)]
    return lines[-1] if lines else ""


def outcome(rc: str) -> str:
    return {"0": "passed", "124": "timed out", "137": "timed out"}.get(rc, f"failed (exit {rc})")


problems = []
if os.environ["ENV_RC"] != "0" or "error" in torch_info:
    problems.append("environment: " + torch_info.get("error", "the torch probe failed"))

# GPU tests: they skip without CUDA; with it they must pass.
tests_line = last_line(out / "tests.log")
tests = {"status": outcome(os.environ["TESTS_RC"]), "seconds": int(os.environ["TESTS_S"]), "pytest": tests_line}
if tests["status"] == "passed" and "passed" not in tests_line:
    tests["status"] = "skipped (no CUDA)" if not cuda else "failed (nothing passed)"
if tests["status"].startswith("failed") or tests["status"] == "timed out":
    problems.append(f"GPU tests: {tests['status']}: {tests_line}")

# Demo: where its shards ran (markers), every GPU with devices auto.
demo = {"status": outcome(os.environ["DEMO_RC"]), "seconds": int(os.environ["DEMO_S"]), "devices": {}}
for job in ("tabular", "text"):
    found = sorted(
        {json.loads(p.read_text()).get("device", "?") for p in (tmp / "demo" / "output" / job / "markers").glob("*.json")}
    )
    shards = len(list((tmp / "demo" / "output" / job / "markers").glob("*.json")))
    demo["devices"][job] = found
    if demo["status"] == "passed" and cuda:
        wanted = min(torch_info.get("device_count", 1), shards) if job == "tabular" else 1  # tabular: 8 shards
        if not all(d.startswith("cuda:") for d in found) or len(found) < wanted:
            demo["status"] = f"failed ({job} ran on {', '.join(found) or 'nothing'}, not on {wanted} GPU(s))"
demo["lines"] = [
    last_line(out / "demo.log", "tabular (mlp):"),
    last_line(out / "demo.log", "text (minilm):"),
]
if demo["status"] != "passed":
    problems.append(f"demo: {demo['status']}")


# Throughput: flow against the bare loop, and the GPU busy % while each ran.
def busy(start: float | None, end: float | None) -> dict:
    path = out / "gpu-busy.csv"
    if not path.exists():
        return {"mean_pct": None, "samples": 0, "note": "no nvidia-smi" if cuda else "no GPU"}
    values = []
    for line in path.read_text(errors="replace").splitlines():
        parts = [part.strip() for part in line.split(",")]
        try:
            at = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as nvidia-smi
            value = float(parts[1])
        except (ValueError, IndexError):
            continue
        if start is not None and end is not None and start <= at <= end:
            values.append(value)
    if not values:
        return {"mean_pct": None, "samples": 0, "note": "no samples in that time"}
    return {"mean_pct": round(statistics.fmean(values), 1), "samples": len(values)}


throughput = {"status": outcome(os.environ["BENCH_RC"]), "seconds": int(os.environ["BENCH_S"]), "workloads": {}}
result_path = out / "throughput.json"
results = json.loads(result_path.read_text()) if result_path.exists() else {}
for name, size in (("mlp", int(os.environ["ROWS"])), ("minilm", int(os.environ["SENTENCES"]))):
    if name not in results:
        throughput["workloads"][name] = {"rows": size, "status": "no result"}
        continue
    part = results[name]
    flow = next((row for row in part["rows"] if row["variant"] == "flow"), None)
    bare = [row for row in part["rows"] if row["variant"].endswith("-bare")]
    # The limit: the MLP's one bare loop; for text, the loop over length-sorted batches (the faster one).
    bare = next((row for row in bare if row["params"].get("sorted")), bare[0] if bare else None)
    ratio = flow and bare and round(flow["rows_per_s"] / bare["rows_per_s"], 4)
    entry = {
        "rows": size,
        "batch_size": (flow or bare or {}).get("params", {}).get("batch_size"),
        "device": part["environment"]["device"],
        "device_name": part["environment"]["device_name"],
        "bare": bare and bare["label"],
        "bare_rows_per_s": bare and bare["rows_per_s"],
        "flow_rows_per_s": flow and flow["rows_per_s"],
        "flow_seconds": flow and flow["median_seconds"],
        "flow_vs_bare": ratio,
        "status": "ok" if ratio else "no flow/bare ratio",
    }
    for label, row in (("flow", flow), ("bare", bare)):
        run = row["runs"][0] if row else {}
        entry[f"gpu_busy_{label}"] = busy(run.get("started_at"), run.get("ended_at"))
    if cuda and entry["device"] == "cpu":
        entry["status"] = "ran on the CPU"
    throughput["workloads"][name] = entry
    throughput.setdefault("device", entry["device"])
    throughput.setdefault("device_name", entry["device_name"])
if throughput["status"] == "passed":
    wrong = [f"{name}: {w['status']}" for name, w in throughput["workloads"].items() if w["status"] != "ok"]
    if wrong:
        throughput["status"] = f"failed ({'; '.join(wrong)})"
if throughput["status"] != "passed":
    problems.append(f"throughput: {throughput['status']} (see throughput.log)")

ok = not problems
device = throughput.get("device") or ("cuda:0" if cuda else "cpu")
if cuda:
    where = f"{device} ({throughput.get('device_name') or ', '.join(torch_info.get('devices', []))})"
else:
    where = "cpu (CUDA not available: the check fell back to the CPU)"


def pct(info: dict) -> str:
    if not info or info.get("mean_pct") is None:
        return f"n/a ({(info or {}).get('note', 'not measured')})"
    return f"{info['mean_pct']:.0f}% ({info['samples']} samples)"


def rate(value) -> str:
    return f"{value:,.0f} rows/s" if isinstance(value, int | float) else "n/a"


def throughput_lines(name: str, w: dict) -> list[str]:
    unit = "rows" if name == "mlp" else "sentences"
    if w["status"] == "no result":
        return [f"- {name} ({w['rows']:,} {unit}): no result"]
    ratio = w.get("flow_vs_bare")
    return [
        f"- {name} ({w['rows']:,} {unit}, batch {w.get('batch_size')}, {w['device']}): "
        f"{w['bare']} {rate(w.get('bare_rows_per_s'))}, flow {rate(w.get('flow_rows_per_s'))}, "
        f"flow/bare {f'{ratio:.2f}' if ratio else 'n/a'}",
        f"  - GPU busy while the flow ran: {pct(w.get('gpu_busy_flow', {}))}; "
        f"while the bare loop ran: {pct(w.get('gpu_busy_bare', {}))}",
    ]


lines = [
    f"- result: {'PASSED' if ok else 'FAILED'} in {int(os.environ['TOTAL_S'])} s",
    f"- device: {where}",
    f"- GPU tests: {tests['status']}" + (f" ({tests_line})" if tests_line else ""),
    f"- demo (devices auto): {demo['status']}, shards ran on "
    + "; ".join(f"{job}: {', '.join(found) or 'nothing'}" for job, found in demo["devices"].items()),
    f"- throughput: {throughput['status']}",
    *(line for name, w in throughput["workloads"].items() for line in throughput_lines(name, w)),
    *(f"- problem: {problem}" for problem in problems),
]
summary = "\n".join(lines)
environment = (tmp / "environment.txt").read_text() if (tmp / "environment.txt").exists() else ""
table = ""
if (out / "throughput.log").exists():
    text = (out / "throughput.log").read_text(errors="replace")
    table = "\n".join(line for line in text.splitlines() if line.startswith("|"))
markdown = [
    f"# GPU check {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
    "## summary",
    summary,
    "## environment",
    f"```\n{environment.strip()}\n```",
    "## demo",
    "\n".join(f"- {line}" for line in demo["lines"] if line) or "(no summary lines; see demo.log)",
    "## throughput: flow vs bare loop on the same device",
    table or "(no table; see throughput.log)",
]
(out / "summary.md").write_text("\n\n".join(markdown) + "\n")
record = {
    "ok": ok,
    "seconds": int(os.environ["TOTAL_S"]),
    "cuda": cuda,
    "torch": torch_info,
    "tests": tests,
    "demo": demo,
    "throughput": throughput,
    "problems": problems,
}
(out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
print(f"== summary ({out}/summary.md, summary.json)\n{summary}")
raise SystemExit(0 if ok else 1)
EOF
