"""A nightly run over a growing prefix: N partitions already scored plus 1 new, against the new one alone.

    .venv/bin/python -m benchmarks.incremental --partitions 100,1000 --rows 1000 --repeats 3

For each N, N partitions of `--rows` rows (64 float32 features, `day=NNNNN/part-0.parquet`) are scored
once through the core, untimed. Then, `--repeats` times, one new partition arrives and two runs of the
flow are timed side by side against the same Prefect server (started beforehand, as in benchmarks.run):
(a) over the whole prefix into the scored output, which scores the new partition only, and (b) over the
new partition alone into a fresh output. A run is `batchinfer run`'s work: the checks before Prefect
starts (listing, footers, keys, the output) and the flow (planning, the shard, merge-and-validate). Each
run is its own process; import time is not counted. The ratio (a)/(b) is the cost of the prefix.

`--compare DIR` runs the same steps with the code of another checkout (e.g. the last release) in the same
invocation, so both are measured on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# -- in a child process, with the code under test first on the path -------------------------------------


def _config(params: dict[str, Any]) -> Any:
    from batchinfer.config import make_config

    return make_config(
        input_uri=params["input"],
        output_uri=params["output"],
        model="mlp",
        checkpoint=params["checkpoint"],
        devices="cpu",
        cpu_threads=params["threads"],
        batch_size=1024,
    )


def child_setup(params: dict[str, Any]) -> dict[str, Any]:
    """Score every partition through the core (no Prefect): the output a run of N nights leaves."""
    from batchinfer.merge import merge_and_validate
    from batchinfer.pipeline import prepare, run_shard, start_run

    started = time.perf_counter()
    plan = prepare(_config(params))
    start_run(plan)
    results = {s.shard_id: run_shard(plan.config, plan.settings, s).to_dict() for s in plan.pending}
    report = merge_and_validate(plan, results)
    if not report.ok:
        raise SystemExit(f"setup failed: {report.first_failure}")
    return {"seconds": time.perf_counter() - started, "shards": len(plan.shards)}


def child_run(params: dict[str, Any]) -> dict[str, Any]:
    """One `batchinfer run`, timed from the call to the summary."""
    from cli.main import quiet_prefect, run_flow

    quiet_prefect(verbose=False)
    import batchinfer.merge  # noqa: F401 - imported before the clock starts, as in a long-lived worker
    import flows.batch_inference  # noqa: F401

    config = _config(params)
    started = time.perf_counter()
    report = run_flow(config, show_progress=False)
    seconds = time.perf_counter() - started
    if not report.get("ok"):
        raise SystemExit(f"run failed: {report}")
    return {
        "seconds": seconds,
        "checks_seconds": seconds - report["wall_seconds"],  # before Prefect: listing, footers, keys, output
        "prefect_seconds": report["wall_seconds"],  # the flow call, Prefect's engine included
        "flow_seconds": report["flow_seconds"],
        "merge_seconds": report["seconds"],
        "shards": report["shards"],
        "shards_run": report["shards_run"],
        "rows": report["rows"],
    }


# -- the driver --------------------------------------------------------------------------------------------


def write_partition(folder: Path, index: int, rows: int) -> Path:
    from batchinfer import demo

    path = folder / f"day={index:05d}" / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    demo.tabular_frame(rows, seed=index, start_id=index * rows).write_parquet(path, row_group_size=rows)
    return path


def call(code: Path, kind: str, params: dict[str, Any], env: dict[str, str], log: Path) -> dict[str, Any]:
    child_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH", "")) if p)}
    command = [sys.executable, str(Path(__file__).resolve()), kind, json.dumps(params)]
    with open(log, "a") as err:
        done = subprocess.run(command, cwd=code, env=child_env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} with {code} failed (exit {done.returncode}); see {log}\n{done.stdout[-2000:]}")
    return json.loads(lines[-1].removeprefix("BENCH-RESULT "))


def measure(
    n: int, code: Path, label: str, args: argparse.Namespace, work: Path, env: dict[str, str], checkpoint: Path
) -> dict[str, Any]:
    log = work / "bench.log"
    folder = work / f"{label.replace(' ', '-')}-{n}"
    data, output = folder / "data", folder / "out"
    if data.parent.exists():
        shutil.rmtree(data.parent)
    for index in range(n):
        write_partition(data, index, args.rows)
    common = {"checkpoint": str(checkpoint), "threads": args.threads}
    print(f"  {label}, N={n}: scoring {n} partitions (untimed) ...", end=" ", flush=True)
    setup = call(code, "setup", {**common, "input": str(data), "output": str(output)}, env, log)
    print(f"{setup['seconds']:.1f} s", flush=True)
    runs = []
    for repeat in range(args.repeats):
        index = n + repeat
        new = write_partition(data, index, args.rows)
        alone = folder / f"alone-{repeat}"
        shutil.copytree(new.parent, alone / new.parent.name)
        prefix = call(code, "run", {**common, "input": str(data), "output": str(output)}, env, log)
        single = call(
            code, "run", {**common, "input": str(alone), "output": str(alone.parent / f"out-{repeat}")}, env, log
        )
        assert prefix["shards_run"] == 1 and single["shards_run"] == 1, (prefix, single)
        runs.append({"prefix": prefix, "alone": single, "ratio": prefix["seconds"] / single["seconds"]})
        print(
            f"    [{repeat + 1}/{args.repeats}] {n + repeat + 1} partitions: {prefix['seconds']:.2f} s "
            f"(checks {prefix['checks_seconds']:.2f} s, flow {prefix['flow_seconds']:.2f} s, merge "
            f"{prefix['merge_seconds']:.3f} s); new alone: {single['seconds']:.2f} s (checks "
            f"{single['checks_seconds']:.2f} s, flow {single['flow_seconds']:.2f} s); ratio {runs[-1]['ratio']:.2f}",
            flush=True,
        )
    return {
        "label": label,
        "code": str(code),
        "partitions": n,
        "rows_per_partition": args.rows,
        "setup_seconds": setup["seconds"],
        "runs": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "median_prefix_seconds": statistics.median(r["prefix"]["seconds"] for r in runs),
        "median_alone_seconds": statistics.median(r["alone"]["seconds"] for r in runs),
        "median_prefix_merge_seconds": statistics.median(r["prefix"]["merge_seconds"] for r in runs),
        "median_alone_merge_seconds": statistics.median(r["alone"]["merge_seconds"] for r in runs),
        "median_flow_ratio": statistics.median(r["prefix"]["flow_seconds"] / r["alone"]["flow_seconds"] for r in runs),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| code | partitions scored | new alone (s) | prefix + 1 new (s) | ratio | flow-only ratio | merge-and-validate, prefix (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['partitions']:,} | {r['median_alone_seconds']:.2f} | {r['median_prefix_seconds']:.2f} "
            f"| {r['median_ratio']:.2f} | {r['median_flow_ratio']:.2f} | {r['median_prefix_merge_seconds']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", default="100,1000", help="comma-separated N: partitions already scored")
    parser.add_argument("--rows", type=int, default=1_000, help="rows per partition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compare", default=None, help="another checkout to measure side by side (label: its name)")
    parser.add_argument("--bench-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--json", default=str(RESULTS / "incremental.json"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from benchmarks import data
    from benchmarks.run import PrefectServer

    bench = Path(args.bench_dir).resolve()
    work = bench / "incremental"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = data.checkpoint(bench)
    codes = [(ROOT, "this checkout")]
    if args.compare:
        codes.append((Path(args.compare).resolve(), Path(args.compare).name))
    server = PrefectServer(home=Path(tempfile.mkdtemp(prefix="prefect-home-", dir=bench)), log=bench / "prefect.log")
    print("starting prefect server ...", end=" ", flush=True)
    server.start()
    print(f"healthy after {server.startup_seconds:.1f} s", flush=True)
    env = {
        **os.environ,
        **server.env(),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "BATCHINFER_LOCK_DIR": os.environ.get("BATCHINFER_LOCK_DIR", str(work / "locks")),
    }
    results = []
    try:
        for n in (int(x) for x in args.partitions.split(",")):
            for code, label in codes:
                results.append(measure(n, code, label, args, work, env, checkpoint))
    finally:
        server.stop()
    body = table(results)
    print(f"\n{body}")
    command = " ".join([".venv/bin/python -m benchmarks.incremental", *sys.argv[1:]])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] in ("setup", "run"):
        kind, params = sys.argv[1], json.loads(sys.argv[2])
        result = child_setup(params) if kind == "setup" else child_run(params)
        print("BENCH-RESULT " + json.dumps(result), flush=True)
    else:
        main()
