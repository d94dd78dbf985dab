"""Many small shards through the real flow: what each shard costs Prefect, the engine and the storage.

    .venv/bin/python -m benchmarks.many_shards --shards 1000 --storage local
    .venv/bin/python -m benchmarks.many_shards --shards 1000 --storage s3   # moto's S3 server over HTTP
    .venv/bin/python -m benchmarks.many_shards --shards 1000 --database postgres

Shards of 10 rows each (one partition file per shard), scored by the MLP on `fake:2`, against one
`prefect server start` started first, on SQLite or a throwaway PostgreSQL. The model's work is negligible, so the flow's time is
the per-shard cost of the task runs, their events, the device locks and the commits. Reported: the flow's
time and its time per shard; the server's CPU seconds during the run (from /proc); the task runs and
events the server stored; the bytes of markers and of the manifest; and on S3 the requests by method,
from the S3 server's access log. Results go to
benchmarks/results/many-shards-<storage>-<engine>-<database>-<shards>.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import ROOT, add_database_argument, measure, running_server

ROWS_PER_SHARD = 10


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its children that it has waited for, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks


def tree_cpu_seconds(pid: int) -> float:
    from benchmarks.run import _children

    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            total += cpu_seconds(p)
        except OSError:
            continue
    return total


def database_cpu_seconds() -> float:
    """CPU seconds of every process named postgres on this machine (a PostgreSQL server's backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            total += cpu_seconds(int(stat.parent.name))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--storage", choices=["local", "s3"], default="local")
    parser.add_argument("--engine", default="local")
    parser.add_argument("--devices", default="fake:2")
    add_database_argument(parser)
    args = parser.parse_args()

    from batchinfer import demo

    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=ROOT / ".bench"))
    # One partition file per shard: a file of many row groups would make every shard parse a large footer.
    rows = args.shards * ROWS_PER_SHARD
    demo.write_tabular(work / "data", rows=rows, partitions=args.shards, row_group_rows=ROWS_PER_SHARD)
    checkpoint = demo.train_mlp(work / "mlp.safetensors", rows=2_000, steps=10)
    stack = contextlib.ExitStack()
    server = stack.enter_context(running_server(work / "prefect-home", work / "server.log", args.database))
    env = {**os.environ, **server.env(), "PYTHONPATH": str(ROOT)}
    s3 = None
    params = {
        "model": "mlp",
        "checkpoint": str(checkpoint),
        "input": str(work / "data"),
        "output": str(work / "out"),
        "batch_size": 1024,
        "threads": 1,
        "devices": args.devices,
        "engine": args.engine,
        "shard_rows": ROWS_PER_SHARD,
    }
    try:
        if args.storage == "s3":
            s3 = start_s3(work, params, env)
        before = tree_cpu_seconds(server.proc.pid)
        database_before = database_cpu_seconds()
        started = time.perf_counter()
        result = measure("flow", params, env, work / "runs.log")
        wall = time.perf_counter() - started
        server_cpu = tree_cpu_seconds(server.proc.pid) - before
        time.sleep(5)  # events still being written when the flow returned
        server_cpu_settled = tree_cpu_seconds(server.proc.pid) - before
        database_cpu = database_cpu_seconds() - database_before
    finally:
        stack.close()
        if s3 is not None:
            s3.terminate()
            s3.wait()
    database = work / "prefect-home" / "prefect.db"
    if args.database == "postgres":
        task_runs = events = -1  # counted by the server's own API in SQLite runs; PostgreSQL's CPU is shown instead
    else:
        with sqlite3.connect(database) as db:
            task_runs = db.execute("select count(*) from task_run").fetchone()[0]
            events = db.execute("select count(*) from events").fetchone()[0]
    out = {
        "shards": result["shards"],
        "rows": result["rows"],
        "storage": args.storage,
        "engine": args.engine,
        "devices": args.devices,
        "flow_s": round(result["seconds"], 2),
        "process_wall_s": round(wall, 2),
        "ms_per_shard": round(1000 * result["seconds"] / result["shards"], 1),
        "shard_seconds_sum": round(result["shard_seconds_sum"], 2),
        "merge_s": result.get("merge_seconds"),
        "server_cpu_s_during_flow": round(server_cpu, 1),
        "server_cpu_s_5s_after": round(server_cpu_settled, 1),
        "server_cpu_ms_per_shard": round(1000 * server_cpu_settled / result["shards"], 1),
        "task_runs": task_runs,
        "events": events,
        "database": "postgresql" if args.database == "postgres" else "sqlite",
        "database_mb": round(database.stat().st_size / 2**20, 1) if database.exists() else None,
        "postgres_cpu_s": round(database_cpu, 1) if args.database == "postgres" else None,
    }
    if args.storage == "local":
        markers = list((work / "out" / "markers").glob("*.json"))
        out["marker_bytes_mean"] = round(sum(p.stat().st_size for p in markers) / len(markers))
        out["manifest_bytes"] = (work / "out" / "manifest.json").stat().st_size
    else:
        out["s3_requests"] = s3_requests(work / "moto.log")
        out["s3_requests_per_shard"] = {k: round(v / result["shards"], 2) for k, v in out["s3_requests"].items()}
    print(json.dumps(out, indent=2))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    name = f"many-shards-{args.storage}-{args.engine}-{out['database']}-{args.shards}.json"
    (results / name).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def start_s3(work: Path, params: dict, env: dict) -> subprocess.Popen:
    """moto's S3 server with the input copied into a bucket; `params` then point at the bucket."""
    import s3fs

    from benchmarks.run import free_port

    port = free_port()
    log = open(work / "moto.log", "w")  # noqa: SIM115 - kept open for the server's life
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    for _ in range(100):
        try:
            fs = s3fs.S3FileSystem(**options)
            fs.mkdir("bench")
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    fs.put(params["input"] + "/", "bench/data/", recursive=True)
    fs.put(params["checkpoint"], "bench/mlp.safetensors")
    log.truncate(0)
    params.update(
        input="s3://bench/data",
        output="s3://bench/out",
        checkpoint="s3://bench/mlp.safetensors",
        storage_options=options,
    )
    return proc


def s3_requests(log: Path) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for line in log.read_text().splitlines():
        match = re.search(r'"(GET|PUT|POST|HEAD|DELETE) ([^ ?]*)(\?[^ ]*)? HTTP', line)
        if match:
            method, query = match.group(1), match.group(3) or ""
            kind = (
                "LIST"
                if method == "GET" and ("list-type" in query or query.startswith("?prefix") or "delimiter" in query)
                else method
            )
            counts[kind] += 1
    return dict(counts)


if __name__ == "__main__":
    main()
