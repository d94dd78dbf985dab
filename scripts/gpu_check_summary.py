"""Part of scripts/gpu-check.sh: summary.md and summary.json from the steps' exit codes, logs and results.

Environment: OUT_DIR (where the check writes), TMP_DIR (its scratch folder: torch.json, environment.txt,
problems.txt, notes.txt, and STEP.rc / STEP.s per step), CUDA (1 or 0), ROWS, SENTENCES, TOTAL_S.
Exits 0 when every step passed, else 1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
from pathlib import Path
from typing import Any

out, tmp = Path(os.environ["OUT_DIR"]), Path(os.environ["TMP_DIR"])
cuda = os.environ.get("CUDA") == "1"


def read(path: Path, default: str = "") -> str:
    return path.read_text(errors="replace") if path.exists() else default


torch_info: dict[str, Any] = json.loads(read(tmp / "torch.json", "{}"))
problems = [line for line in read(tmp / "problems.txt").splitlines() if line.strip()]
notes = [line for line in read(tmp / "notes.txt").splitlines() if line.strip()]


def last_line(path: Path, starts: str = "") -> str:
    lines = [line.strip() for line in read(path).splitlines()]
    lines = [line for line in lines if line and line.startswith(starts)]
    return lines[-1] if lines else ""


def outcome(key: str) -> dict[str, Any]:
    rc = read(tmp / f"{key}.rc", "skipped").strip()
    status = {"0": "passed", "124": "timed out", "137": "timed out", "skipped": "skipped"}.get(
        rc, f"failed (exit {rc})"
    )
    return {"status": status, "seconds": int(read(tmp / f"{key}.s", "0").strip() or 0)}


if "error" in torch_info:
    problems.insert(0, "environment: " + torch_info["error"])
install = {**outcome("install"), "line": last_line(out / "install.log", "installed ") or last_line(out / "install.log")}

# GPU tests: they skip without CUDA; with it they must pass.
tests = {**outcome("tests"), "pytest": last_line(out / "tests.log")}
if tests["status"] == "passed" and "passed" not in tests["pytest"]:
    tests["status"] = "skipped (no CUDA)" if not cuda else "failed (nothing passed)"
if tests["status"].startswith("failed") or tests["status"] == "timed out":
    problems.append(f"GPU tests: {tests['status']}: {tests['pytest']}")

# Demo: where its shards ran (markers): every GPU with devices auto.
demo: dict[str, Any] = {**outcome("demo"), "devices": {}}
for job in ("tabular", "text"):
    markers = list((tmp / "demo" / "output" / job / "markers").glob("*.json"))
    found = sorted({json.loads(p.read_text()).get("device", "?") for p in markers})
    demo["devices"][job] = found
    if demo["status"] == "passed" and cuda:
        wanted = min(torch_info.get("device_count", 1), len(markers)) if job == "tabular" else 1
        if not all(d.startswith("cuda:") for d in found) or len(found) < wanted:
            demo["status"] = f"failed ({job} ran on {', '.join(found) or 'nothing'}, not on {wanted} GPU(s))"
demo["lines"] = [last_line(out / "demo.log", "tabular (mlp):"), last_line(out / "demo.log", "text (minilm):")]
if demo["status"] not in ("passed", "skipped"):
    problems.append(f"demo: {demo['status']}")


def predictions(folder: Path) -> dict[str, Any] | None:
    """A job's merged predictions, part after part (parts are named after their partitions), or None."""
    import polars as pl  # here, not at the top: the summary must be written even where the install failed

    files = sorted((folder / "predictions").glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]) if files else None


# Engines: the demo's tabular job on Dask and Ray, on the devices the engine handed out, against the demo.
engines: dict[str, Any] = {}
for engine in ("dask", "ray"):
    result = outcome(f"engine-{engine}")
    if result["status"] == "skipped":
        engines[engine] = {**result, "note": last_line(out / "demo.log", f"engine {engine}: skipped")}
        continue
    folder = tmp / "engines" / engine
    markers = [json.loads(p.read_text()) for p in (folder / "markers").glob("*.json")]
    result["devices"] = sorted({m.get("device", "?") for m in markers})
    result["workers"] = len({(m.get("host"), m.get("pid")) for m in markers})
    if result["status"] == "passed":
        mine, demos = predictions(folder), predictions(tmp / "demo" / "output" / "tabular")
        same = mine is not None and demos is not None and mine.columns == demos.columns and mine.height == demos.height
        if same:
            floats = [c for c, t in mine.schema.items() if t.is_float()]
            diff = max((float((mine[c] - demos[c]).abs().max() or 0.0) for c in floats), default=0.0)
            result["max_abs_diff_vs_local"] = diff
            result["identical_to_local"] = mine.equals(demos)
            same = diff <= 1e-6 and all(mine[c].equals(demos[c]) for c in mine.columns if c not in floats)
        if not same:
            result["status"] = "failed (predictions differ from the local engine's)"
        elif cuda and not all(d.startswith("cuda:") for d in result["devices"]):
            result["status"] = f"failed (shards ran on {', '.join(result['devices'])}, not on GPUs)"
    if result["status"] != "passed":
        problems.append(f"engine {engine}: {result['status']} (see demo.log)")
    engines[engine] = result


def engine_line(engine: str, e: dict[str, Any]) -> str:
    if e["status"] != "passed":
        return f"  - {engine}: {e['status']}" + (f": {e['note']}" if e.get("note") else "")
    same = "identical to" if e.get("identical_to_local") else f"within {e.get('max_abs_diff_vs_local'):.1e} of"
    return (
        f"  - {engine}: passed in {e['seconds']} s, shards on {', '.join(e['devices'])} in {e['workers']} "
        f"worker process(es); predictions {same} the local engine's"
    )


def samples() -> list[tuple[float, float, float]]:
    """nvidia-smi's (time, busy %, memory MiB) samples."""
    found = []
    for line in read(out / "gpu-busy.csv").splitlines():
        parts = [part.strip() for part in line.split(",")]
        try:
            at = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as nvidia-smi
            found.append((at, float(parts[1]), float(parts[2])))
        except (ValueError, IndexError):
            continue
    return found


SAMPLES = samples()


def busy(run: dict[str, Any]) -> dict[str, Any]:
    """GPU busy % and the most memory in use (nvidia-smi) while one run of a variant ran."""
    if not SAMPLES:
        return {"mean_pct": None, "samples": 0, "note": "no nvidia-smi samples" if cuda else "no GPU"}
    start, end = run.get("started_at"), run.get("ended_at")
    inside = [s for s in SAMPLES if start is not None and end is not None and start <= s[0] <= end]
    if not inside:
        return {"mean_pct": None, "samples": 0, "note": "no samples in that time"}
    values = [s[1] for s in inside]
    return {
        "mean_pct": round(statistics.fmean(values), 1),
        "min_pct": min(values),
        "samples": len(values),
        "seconds": round(end - start, 2),
        "memory_used_max_mib": max(s[2] for s in inside),
    }


throughput: dict[str, Any] = {**outcome("bench"), "workloads": {}}
results = json.loads(read(out / "throughput.json", "{}") or "{}")
for name, size in (("mlp", int(os.environ.get("ROWS") or 0)), ("minilm", int(os.environ.get("SENTENCES") or 0))):
    if name not in results:
        if throughput["status"] != "skipped":
            throughput["workloads"][name] = {"rows": size, "status": "no result"}
        continue
    part = results[name]
    rows = part["rows"]
    flow = next((row for row in rows if row["variant"] == "flow"), None)
    bares = [row for row in rows if row["variant"].endswith("-bare")]
    # The limit: the MLP's one bare loop; for text, the loop over length-sorted batches (the faster one).
    bare = next((row for row in bares if row["params"].get("sorted")), bares[0] if bares else None)
    ratio = flow and bare and round(flow["rows_per_s"] / bare["rows_per_s"], 4)
    run = flow["runs"][0] if flow else {}
    entry: dict[str, Any] = {
        "rows": size,
        "device": part["environment"]["device"],
        "device_name": part["environment"]["device_name"],
        "bare": bare and bare["label"],
        "bare_batch_size": bare and bare["runs"][0].get("batch_size"),
        "bare_rows_per_s": bare and bare["rows_per_s"],
        "flow_rows_per_s": flow and flow["rows_per_s"],
        "flow_seconds": flow and flow["median_seconds"],
        "flow_vs_bare": ratio,
        "auto_batch_sizes": run.get("batch_sizes_used"),
        "peak_gpu_memory_mib": run.get("peak_gpu_memory_mb"),
        "status": "ok" if ratio else "no flow/bare ratio",
    }
    entry["gpu_busy_flow"] = busy(run)
    entry["gpu_busy_bare"] = busy(bare["runs"][0] if bare else {})
    precision = next((row for row in part.get("extra", []) if row["variant"].endswith("precision")), None)
    if precision and precision["runs"]:
        entry["precision"] = {
            key: {k: v for k, v in value.items() if k != "fingerprint"}
            for key, value in precision["runs"][0]["precisions"].items()
        }
        entry["precision_device"] = precision["runs"][0].get("device")
    if cuda and entry["device"] == "cpu":
        entry["status"] = "ran on the CPU"
    throughput["workloads"][name] = entry
    throughput.setdefault("device", entry["device"])
    throughput.setdefault("device_name", entry["device_name"])
if throughput["status"] == "passed":
    wrong = [f"{name}: {w['status']}" for name, w in throughput["workloads"].items() if w["status"] != "ok"]
    if wrong:
        throughput["status"] = f"failed ({'; '.join(wrong)})"
if throughput["status"] not in ("passed", "skipped"):
    problems.append(f"throughput: {throughput['status']} (see throughput.log)")

ok = not problems
device = throughput.get("device") or ("cuda:0" if cuda else "cpu")
if cuda:
    where = f"{device} ({throughput.get('device_name') or ', '.join(torch_info.get('devices', []))})"
else:
    ran = any(outcome(key)["status"] != "skipped" for key in ("tests", "demo", "bench"))
    where = "cpu (CUDA not available" + (": the check fell back to the CPU)" if ran else ")")


def pct(info: dict[str, Any]) -> str:
    if not info or info.get("mean_pct") is None:
        return f"n/a ({(info or {}).get('note', 'not measured')})"
    return (
        f"{info['mean_pct']:.0f}% mean, {info['min_pct']:.0f}% lowest ({info['samples']} samples over "
        f"{info['seconds']} s), up to {info['memory_used_max_mib']:,.0f} MiB in use"
    )


def rate(value: Any) -> str:
    return f"{value:,.0f} rows/s" if isinstance(value, int | float) else "n/a"


def throughput_lines(name: str, w: dict[str, Any]) -> list[str]:
    unit = "rows" if name == "mlp" else "sentences"
    if w["status"] == "no result":
        return [f"- {name} ({w['rows']:,} {unit}): no result"]
    ratio = w.get("flow_vs_bare")
    lines = [
        f"- {name} ({w['rows']:,} {unit}, {w['device']}): {w['bare']} (batch {w.get('bare_batch_size')}) "
        f"{rate(w.get('bare_rows_per_s'))}, flow (batch auto: {w.get('auto_batch_sizes')}) "
        f"{rate(w.get('flow_rows_per_s'))}, flow/bare {f'{ratio:.2f}' if ratio else 'n/a'}",
        f"  - GPU while the flow ran: {pct(w.get('gpu_busy_flow', {}))}",
        f"  - GPU while the bare loop ran: {pct(w.get('gpu_busy_bare', {}))}",
        f"  - peak GPU memory of the flow (torch's allocator): {w.get('peak_gpu_memory_mib') or 'n/a'} MiB",
    ]
    for precision, values in (w.get("precision") or {}).items():
        base = (w["precision"].get("fp32") or {}).get("rows_per_s") or 0
        speed = f"{values['rows_per_s'] / base:.2f}x fp32" if base else ""
        quality = ", ".join(f"{k} {v:.6g}" for k, v in values.items() if k != "rows_per_s")
        lines.append(
            f"  - {precision} on {w.get('precision_device')}: {rate(values['rows_per_s'])} ({speed}); {quality}"
        )
    return lines


lines = [
    f"- result: {'PASSED' if ok else 'FAILED'} in {int(os.environ.get('TOTAL_S') or 0)} s",
    f"- device: {where}",
    f"- install: {install['status']}" + (f" ({install['line']})" if install["line"] else ""),
    f"- GPU tests: {tests['status']}" + (f" ({tests['pytest']})" if tests["pytest"] else ""),
    f"- demo (devices auto): {demo['status']}, shards ran on "
    + "; ".join(f"{job}: {', '.join(found) or 'nothing'}" for job, found in demo["devices"].items()),
    "- engines (the demo's tabular job):",
    *(engine_line(engine, e) for engine, e in engines.items()),
    f"- throughput: {throughput['status']}",
    *(line for name, w in throughput["workloads"].items() for line in throughput_lines(name, w)),
    *(f"- note: {note}" for note in notes),
    *(f"- problem: {problem}" for problem in problems),
]
summary = "\n".join(lines)
table = "\n".join(line for line in read(out / "throughput.log").splitlines() if line.startswith("|"))
markdown = [
    f"# GPU check {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
    "## summary",
    summary,
    "## environment",
    f"```\n{read(tmp / 'environment.txt').strip()}\n```",
    "## demo",
    "\n".join(f"- {line}" for line in demo["lines"] if line) or "(no summary lines; see demo.log)",
    "## throughput: flow vs bare loop on the same device",
    table or "(no table; see throughput.log)",
]
(out / "summary.md").write_text("\n\n".join(markdown) + "\n")
record = {
    "ok": ok,
    "seconds": int(os.environ.get("TOTAL_S") or 0),
    "cuda": cuda,
    "torch": torch_info,
    "install": install,
    "tests": tests,
    "demo": demo,
    "engines": engines,
    "throughput": throughput,
    "notes": notes,
    "problems": problems,
}
(out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
print(f"== summary ({out}/summary.md, summary.json)\n{summary}")
raise SystemExit(0 if ok else 1)
