"""Engine overhead: the same MLP job on each engine at equal device counts (fake devices), side by side.

    .venv/bin/python -m benchmarks.engines --rows 4000000 --devices 2 --repeats 2

Every run is the real flow against one `prefect server start` (started first, its start-up not timed),
in a fresh process per run, round-robin over the engines. Per engine: the flow's time; its time outside
the shards (flow start to first shard start, last shard end to flow end, merge-and-validate included);
and its per-shard overhead, (flow time x devices - sum of shard seconds) / shards. Each engine's
overhead is reported against the local engine's flow time. Dask and Ray start their local cluster
inside the flow, so their start-up counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks import data
from benchmarks.run import MARKDOWN, ROOT, PrefectServer, measure, update_markdown

ENGINES = ("local", "processes", "dask", "ray")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_000_000, help="MLP rows, in 1,000,000-row shards")
    parser.add_argument("--devices", type=int, default=2, help="fake devices, the same for every engine")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--bench-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--no-markdown", dest="markdown", action="store_false")
    args = parser.parse_args()

    bench = Path(args.bench_dir)
    checkpoint = data.checkpoint(bench)
    paths = data.tabular(bench / "data", args.rows, array=False)
    work = Path(tempfile.mkdtemp(prefix="bench-engines-", dir=bench))
    server = PrefectServer(work / "prefect-home", work / "server.log")
    server.start()
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    try:
        env = {**__import__("os").environ, **server.env(), "PYTHONPATH": str(ROOT)}
        for _ in range(args.repeats):
            for engine in engines:
                params = {
                    "model": "mlp",
                    "checkpoint": str(checkpoint),
                    "input": str(paths["columns"]),
                    "output": str(work / f"out-{engine}"),
                    "batch_size": args.batch_size,
                    "threads": None,
                    "devices": f"fake:{args.devices}",
                    "engine": engine,
                }
                result = measure("flow", params, env, work / "runs.log")
                runs[engine].append(result)
                print(f"{engine}: flow {result['seconds']:.2f} s, {summary(result, args.devices)}", flush=True)
    finally:
        server.stop()
    rows = {e: summarize(r, args.devices) for e, r in runs.items()}
    base = rows.get("local", {}).get("flow_s")
    lines = [
        f"`python -m benchmarks.engines --rows {args.rows} --devices {args.devices} --repeats {args.repeats}` "
        f"({runs[engines[0]][0]['shards']} shards of 1,000,000 rows on {args.devices} fake devices, "
        f"medians of {args.repeats}):",
        "",
        "| engine | flow s | outside shards s | per-shard overhead ms | overhead vs local flow |",
        "| --- | --- | --- | --- | --- |",
    ]
    for engine, row in rows.items():
        versus = f"{(row['flow_s'] - base) / base:+.1%}" if base else ""
        lines.append(
            f"| {engine} | {row['flow_s']:.2f} | {row['outside_s']:.2f} | {row['per_shard_ms']:.0f} | {versus} |"
        )
    body = "\n".join(lines)
    print(body)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "engines.json").write_text(json.dumps(runs, indent=2) + "\n")
    if args.markdown and MARKDOWN.exists():
        update_markdown("Engines", body)


def summary(result: dict, devices: int) -> str:
    row = summarize([result], devices)
    return f"outside shards {row['outside_s']:.2f} s, per-shard overhead {row['per_shard_ms']:.0f} ms"


def summarize(results: list[dict], devices: int) -> dict[str, float]:
    flow = statistics.median(r["seconds"] for r in results)
    outside = statistics.median(
        (r["first_shard_started_at"] - r["flow_started_at"]) + (r["ended_at"] - r["last_shard_finished_at"])
        for r in results
    )
    per_shard = statistics.median((r["seconds"] * devices - r["shard_seconds_sum"]) / r["shards"] for r in results)
    return {"flow_s": flow, "outside_s": outside, "per_shard_ms": per_shard * 1000}


if __name__ == "__main__":
    main()
