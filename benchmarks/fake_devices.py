"""Scaling with devices: N fake devices, M shards of fixed work, wall time against the ideal M/N x work.

Runs the real flow (Prefect's embedded server, or PREFECT_API_URL if set) with a model that
sleeps a fixed time per batch, so each shard costs the same known work on any machine.

    .venv/bin/python -m benchmarks.fake_devices --shards 8 --work 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from batchinfer import demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--work", type=float, default=1.0, help="seconds of work per shard")
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--out", default="benchmarks/results/fake_devices.json")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    root = Path(tempfile.mkdtemp(prefix="bench-devices-"))
    # A fresh embedded server unless one is named: limits left in ~/.prefect (a `gpu` tag limit, say) apply.
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect-home"))
    control = root / "control"
    control.mkdir()
    os.environ["BATCHINFER_TEST_CONTROL"] = str(control)
    batches = 4
    rows = 1_000
    demo.write_tabular(root / "data", rows=rows * args.shards, partitions=args.shards, row_group_rows=rows)
    (control / "sleep").write_text(str(args.work / batches))

    from batchinfer.config import make_config
    from cli.main import quiet_prefect, run_flow

    quiet_prefect(verbose=False)
    results = []
    warm = False
    for n in (int(x) for x in args.devices.split(",")):
        config = make_config(
            input_uri=str(root / "data"),
            output_uri=str(root / f"out-{n}"),
            model="tests.faulty_models:factory",
            features=["id", "f00", "f01", "f02", "f03"],
            devices=f"fake:{n}",
            shard_rows=rows,
            batch_size=rows // batches,
        )
        if not warm:  # start the embedded server once, outside the timings
            run_flow(config.replace(output_uri=str(root / "warmup")), show_progress=False)
            warm = True
        started = time.perf_counter()
        report = run_flow(config, show_progress=False)
        wall = time.perf_counter() - started
        flow = report["flow_seconds"]
        ideal = -(-args.shards // n) * args.work
        results.append(
            {
                "devices": n,
                "shards": args.shards,
                "work_s": args.work,
                "wall_s": round(wall, 2),
                "flow_s": round(flow, 2),
                "ideal_s": ideal,
                "ratio": round(flow / ideal, 3),
            }
        )
        print(f"N={n}: flow {flow:.2f} s (wall {wall:.2f} s), ideal {ideal:.2f} s, flow/ideal {flow / ideal:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
