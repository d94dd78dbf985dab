"""What a task tag costs in Prefect 3.9 when no limit exists for it: tagged and untagged tasks side by side.

    .venv/bin/python -m benchmarks.tag_cost --tasks 8 --work 1.0 --repeats 2

One embedded server; flows of `--tasks` sequential tasks that each sleep `--work` seconds, tagged `gpu`
(as `infer_shard` is) and untagged, alternating. For each task: its time beyond the sleep. A tagged
task run asks the server for the tag's concurrency slots unless Prefect's client remembered, less than
5 s ago, that the tag has no limit; the untagged ones never ask.
"""

from __future__ import annotations

import argparse
import os
import time

from prefect import flow, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--work", type=float, default=1.0, help="seconds each task sleeps")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    @task(tags=["gpu"])
    def tagged() -> None:
        time.sleep(args.work)

    @task
    def untagged() -> None:
        time.sleep(args.work)

    @flow
    def sequence(use_tag: bool) -> list[float]:
        extra = []
        for _ in range(args.tasks):
            started = time.perf_counter()
            (tagged if use_tag else untagged)()
            extra.append(time.perf_counter() - started - args.work)
        return extra

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    totals: dict[str, list[float]] = {"tagged": [], "untagged": []}
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            for _ in range(args.repeats):
                for use_tag in (True, False):
                    extra = sequence(use_tag)
                    name = "tagged" if use_tag else "untagged"
                    totals[name].append(sum(extra))
                    print(f"{name:8} per task s: {' '.join(f'{x:.2f}' for x in extra)}; total {sum(extra):.2f}")
    finally:
        server.stop()
    print(
        f"`python -m benchmarks.tag_cost --tasks {args.tasks} --work {args.work} --repeats {args.repeats}`: "
        f"time beyond the work over {args.tasks} tasks, tagged {', '.join(f'{t:.2f}' for t in totals['tagged'])} s, "
        f"untagged {', '.join(f'{t:.2f}' for t in totals['untagged'])} s"
    )


if __name__ == "__main__":
    main()
