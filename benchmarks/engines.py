"""Engine overhead: the same MLP job on each engine at equal device counts (fake devices), side by side.

    .venv/bin/python -m benchmarks.engines --rows 4000000 --devices 2 --repeats 2
    .venv/bin/python -m benchmarks.engines --rows 4000000 --devices 2 --repeats 2 --clusters running
    .venv/bin/python -m benchmarks.engines --rows 4000000,12000000 --devices 2 --repeats 2 --clusters running
    .venv/bin/python -m benchmarks.engines --rows 4000000,12000000 --devices 2 --repeats 2 --clusters running \
        --database postgres

Every run is the real flow against one `prefect server start` (started first, its start-up not timed),
in a fresh process per run, round-robin over the engines. Per engine: the flow's time; its time outside
the shards (flow start to first shard start, last shard end to flow end, merge-and-validate included);
and its per-shard overhead, (flow time x devices - sum of shard seconds) / shards. That overhead has two
parts, shown apart: the time between two shards on one device (the median, from the markers' start and
end), and a slower shard (the median shard's seconds). Each engine's overhead is reported against the
local engine's flow time.

With two job sizes (`--rows A,B`, run in turn within each repeat), each engine's flow time is split into a
fixed part per run (worker processes, cluster connection) and a part per shard (the slope between the
two sizes), and the table gives the shards from which the engine is within 5% of the local engine.

`--clusters started` (the default): Dask and Ray start their local cluster inside the flow, so their
start-up counts. `--clusters running`: a Dask cluster (one worker process per device, each offering
GPU=1) and a Ray head (`ray start --head --num-gpus N`) are started first, outside the timing, and the
runs reach them by address (`--engine-address`, with `file://` paths), as a user's existing cluster is;
one untimed run per engine comes first.

`--database postgres`: the server keeps its database in a throwaway PostgreSQL (tests/postgres.py) instead
of SQLite, as deployments/README.md sets one up for a shared server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks import data
from benchmarks.run import (
    MARKDOWN,
    ROOT,
    add_database_argument,
    free_port,
    measure,
    running_server,
    update_markdown,
)

ENGINES = ("local", "processes", "dask", "ray")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows",
        default="4000000",
        help="MLP rows, in 1,000,000-row shards; two sizes (A,B) split fixed and per-shard costs",
    )
    parser.add_argument("--devices", type=int, default=2, help="fake devices, the same for every engine")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per device (default: the cores split between them)"
    )
    parser.add_argument("--bench-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--clusters", choices=("started", "running"), default="started")
    add_database_argument(parser)
    parser.add_argument("--no-markdown", dest="markdown", action="store_false")
    args = parser.parse_args()
    running = args.clusters == "running"
    sizes = [int(value) for value in args.rows.split(",")]

    bench = Path(args.bench_dir)
    checkpoint = data.checkpoint(bench)
    inputs = {rows: data.tabular(bench / "data", rows, array=False)["columns"] for rows in sizes}
    work = Path(tempfile.mkdtemp(prefix="bench-engines-", dir=bench))
    postgres = args.database == "postgres"
    engines = args.engines.split(",")
    runs: dict[int, dict[str, list[dict]]] = {rows: {e: [] for e in engines} for rows in sizes}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_server(work / "prefect-home", work / "server.log", args.database))
        extra = {**server.env(), "PYTHONPATH": str(ROOT)}  # what the runs and the clusters' workers need
        if running and "ray" in engines:
            # The head from `ray start` and every driver share a token of this benchmark's own (Ray >= 2.59
            # authenticates with a token; `ray start` does not make one), so no file of the user's is used.
            extra.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        env = {**os.environ, **extra}
        addresses = stack.enter_context(clusters(engines, args.devices, extra)) if running else {}
        for repeat in range(args.repeats + (1 if running else 0)):
            for rows in sizes if repeat or not running else sizes[:1]:
                for engine in engines:
                    output = work / f"out-{engine}"
                    params = {
                        "model": "mlp",
                        "checkpoint": str(checkpoint),
                        "input": str(inputs[rows]),
                        "output": str(output),
                        "batch_size": args.batch_size,
                        "threads": args.threads,
                        "devices": f"fake:{args.devices}",
                        "engine": engine,
                    }
                    if engine in addresses:  # every worker reaches these paths: the same machine
                        shutil.rmtree(output, ignore_errors=True)
                        params.update(
                            engine_address=addresses[engine],
                            checkpoint=f"file://{checkpoint}",
                            input=f"file://{inputs[rows]}",
                            output=f"file://{output}",
                        )
                    result = measure("flow", params, env, work / "runs.log")
                    if running and repeat == 0:
                        print(f"{engine}: warm-up {result['seconds']:.2f} s (not counted)", flush=True)
                        continue
                    runs[rows][engine].append(result)
                    print(
                        f"{engine}, {rows:,} rows: flow {result['seconds']:.2f} s, {summary(result, args.devices)}",
                        flush=True,
                    )
    flag = " --clusters running" if running else ""
    flag += " --database postgres" if postgres else ""
    where = "clusters running before the runs, reached by address" if running else "clusters started by each run"
    where += ", the server on PostgreSQL" if postgres else ""
    flag += f" --threads {args.threads}" if args.threads else ""
    command = (
        f"`python -m benchmarks.engines --rows {args.rows} --devices {args.devices} --repeats {args.repeats}{flag}`"
    )
    lines = []
    for rows in sizes:
        table = {e: summarize(r, args.devices) for e, r in runs[rows].items()}
        base = table.get("local", {}).get("flow_s")
        shards = runs[rows][engines[0]][0]["shards"]
        lines += [
            f"{command} ({shards} shards of 1,000,000 rows on {args.devices} fake devices, {where}, "
            f"medians of {args.repeats}):",
            "",
            "| engine | flow s | outside shards s | per-shard overhead ms | between shards on a device ms "
            "| a shard s | overhead vs local flow |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for engine, row in table.items():
            versus = f"{(row['flow_s'] - base) / base:+.1%}" if base else ""
            lines.append(
                f"| {engine} | {row['flow_s']:.2f} | {row['outside_s']:.2f} | {row['per_shard_ms']:.0f} "
                f"| {row['gap_ms']:.0f} | {row['shard_s']:.2f} | {versus} |"
            )
        lines.append("")
    if len(sizes) == 2 and "local" in engines:
        lines += split_costs(runs, sizes, engines, args.devices)
    body = "\n".join(lines).rstrip()
    print(body)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    name = "engines-running" if running else "engines"
    if len(sizes) > 1:
        name += "-sizes"
    if postgres:
        name += "-postgres"
    if args.devices != 2 or args.threads:
        name += f"-{args.devices}-devices" + (f"-{args.threads}-threads" if args.threads else "")
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(runs, indent=2) + "\n")
    if args.markdown and MARKDOWN.exists():
        key = "EnginesRunning" if running else "Engines"
        update_markdown(key + ("Sizes" if len(sizes) > 1 else "") + ("Postgres" if postgres else ""), body)


def split_costs(
    runs: dict[int, dict[str, list[dict]]], sizes: list[int], engines: list[str], devices: int
) -> list[str]:
    """Each engine's flow time as fixed + per shard x shards, from the medians at the two sizes."""
    small, large = sizes
    shards = {rows: runs[rows][engines[0]][0]["shards"] for rows in sizes}
    fits = {}
    for engine in engines:
        flows = {rows: summarize(runs[rows][engine], devices)["flow_s"] for rows in sizes}
        slope = (flows[large] - flows[small]) / (shards[large] - shards[small])
        fits[engine] = (flows[small] - slope * shards[small], slope)
    fixed_local, slope_local = fits["local"]
    lines = [
        f"Split between the two sizes ({shards[small]} and {shards[large]} shards): flow s = fixed + per shard x "
        "shards.",
        "",
        "| engine | fixed s | per shard s | per shard vs local | within 5% of local from |",
        "| --- | --- | --- | --- | --- |",
    ]
    for engine, (fixed, slope) in fits.items():
        if engine == "local":
            within = "-"
        elif fixed <= 1.05 * fixed_local and slope <= 1.05 * slope_local:
            within = "any size"
        elif slope >= 1.05 * slope_local:
            within = "never (per shard above 5%)"
        else:
            within = f"{(fixed - 1.05 * fixed_local) / (1.05 * slope_local - slope):.0f} shards"
        lines.append(f"| {engine} | {fixed:.2f} | {slope:.3f} | {slope / slope_local - 1:+.1%} | {within} |")
    return lines


@contextlib.contextmanager
def clusters(engines: list[str], devices: int, extra: dict[str, str]) -> Iterator[dict[str, str]]:
    """A Dask cluster and a Ray head on this machine, started before the runs: engine -> address. Their
    worker processes run Prefect's task engine, so they get `extra` (the API's address, the path)."""
    addresses: dict[str, str] = {}
    env = {**os.environ, **extra}
    with contextlib.ExitStack() as stack:
        if "dask" in engines:
            from distributed import LocalCluster

            from flows.engines import worker_threads

            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=devices,
                    threads_per_worker=1,
                    resources={"GPU": 1},
                    dashboard_address=None,
                    env={**extra, **worker_threads(devices)},
                )
            )
            addresses["dask"] = cluster.scheduler_address
        if "ray" in engines:
            port = free_port()
            ray = str(Path(sys.executable).with_name("ray"))
            start = [ray, "start", "--head", f"--port={port}", f"--num-gpus={devices}", "--include-dashboard=false"]
            subprocess.run(start, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(subprocess.run, [ray, "stop", "--force"], env=env, stdout=subprocess.DEVNULL, check=False)
            addresses["ray"] = f"127.0.0.1:{port}"
        yield addresses


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
    # The per-shard overhead's two parts: time between two shards on a device, and a slower shard.
    gaps = [statistics.median(r["gaps_on_device"]) for r in results if r.get("gaps_on_device")]
    shard = [r["shard_seconds_median"] for r in results if r.get("shard_seconds_median")]
    return {
        "flow_s": flow,
        "outside_s": outside,
        "per_shard_ms": per_shard * 1000,
        "gap_ms": statistics.median(gaps) * 1000 if gaps else float("nan"),
        "shard_s": statistics.median(shard) if shard else float("nan"),
    }


if __name__ == "__main__":
    main()
