"""Start-up: from typing `batchinfer run` to the first shard scoring, and the run's time outside its shards.

    .venv/bin/python -m benchmarks.startup --repeats 3

Each case is the real command in a fresh process on the same small MLP job (4 partitions of 50,000 rows,
one shard each): Prefect's embedded server with a fresh PREFECT_HOME (cold), the embedded server with that
home again (warm), and a running `prefect server start` (PREFECT_API_URL set), started as the README
shows; the warm and running cases also with Prefect's own task-run recorder settings, side by side. From
the shards' markers: command start to the first shard's start, the last shard's end to the command's
end, and the sum in between that is not scoring.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import ROOT, PrefectServer

# Prefect 3.9's own values of what cli.main.SERVER_SETTINGS changes, set explicitly to compare.
RECORDER_DEFAULTS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "1",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "5",
}


def run_once(work: Path, env: dict[str, str], label: str) -> dict[str, float]:
    out = work / f"out-{label}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "cli", "run", "--input", str(work / "data"), "--output", str(out)]
    command += ["--model", "mlp", "--checkpoint", str(work / "mlp.safetensors"), "--shard-rows", "50000"]
    command += ["--devices", "cpu"]
    started = time.time()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{label}: exit {done.returncode}: {done.stderr[-1000:]}")
    markers = [json.loads(p.read_text()) for p in (out / "markers").glob("*.json")]
    first = min(dt.datetime.fromisoformat(m["started_at"]).timestamp() for m in markers)
    last = max(dt.datetime.fromisoformat(m["finished_at"]).timestamp() for m in markers)
    return {"to_first_shard_s": first - started, "after_last_shard_s": ended - last, "total_s": ended - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from batchinfer import demo

    work = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=ROOT / ".bench"))
    demo.write_tabular(work / "data", rows=200_000, partitions=4)
    demo.train_mlp(work / "mlp.safetensors", rows=2_000, steps=10)
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    results: dict[str, list[dict[str, float]]] = {
        "embedded, cold": [],
        "embedded, warm": [],
        "embedded, warm, Prefect's recorder settings": [],
        "running server": [],
        "running server, Prefect's recorder settings": [],
    }
    server = PrefectServer(work / "server-home", work / "server.log")
    plain = PrefectServer(work / "plain-home", work / "plain.log", settings=RECORDER_DEFAULTS)
    server.start()
    plain.start()
    try:
        for repeat in range(args.repeats):
            home = work / f"home-{repeat}"
            results["embedded, cold"].append(run_once(work, {**base, "PREFECT_HOME": str(home)}, "cold"))
            results["embedded, warm"].append(run_once(work, {**base, "PREFECT_HOME": str(home)}, "warm"))
            results["embedded, warm, Prefect's recorder settings"].append(
                run_once(work, {**base, "PREFECT_HOME": str(home), **RECORDER_DEFAULTS}, "warm-plain")
            )
            results["running server"].append(run_once(work, {**base, **server.env()}, "server"))
            results["running server, Prefect's recorder settings"].append(
                run_once(work, {**base, **plain.env()}, "server-plain")
            )
    finally:
        server.stop()
        plain.stop()
    lines = [
        f"`python -m benchmarks.startup --repeats {args.repeats}` (medians; 4 shards of 50,000 rows, one CPU device):",
        "",
        "| case | command start to first shard s | last shard to command end s | command total s |",
        "| --- | --- | --- | --- |",
    ]
    for case, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lines.append(
            f"| {case} | {med['to_first_shard_s']:.2f} | {med['after_last_shard_s']:.2f} | {med['total_s']:.2f} |"
        )
    print("\n".join(lines))
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "startup.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
