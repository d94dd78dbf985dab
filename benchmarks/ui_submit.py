"""How often the UI's "Submit" on a deployment's form is refused, by the database behind the Prefect server.

    .venv/bin/python -m benchmarks.ui_submit --requests 200 --poll 1 --database sqlite --busy-core
    .venv/bin/python -m benchmarks.ui_submit --requests 200 --poll 1 --database postgres --busy-core

A real `prefect server start` (SQLite in its home, or a throwaway PostgreSQL from tests/postgres.py) and a
`batchinfer serve` process whose runner polls every `--poll` seconds, as a served deployment does. Then
`--requests` POSTs to /deployments/{id}/create_flow_run, the request the form sends, one at a time and
without retries, as the browser sends it (Prefect's Python client would retry a 503). The runs are
scheduled far ahead, so none of them starts. `--busy-core` keeps one core busy, as the other half of the
test suite does on a 2-core CI machine. Prints the count of each HTTP status.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from batchinfer import demo
from tests.postgres import PostgresServer
from tests.prefect_stack import BATCHINFER, PrefectStack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--poll", default="1", help="PREFECT_RUNNER_POLL_FREQUENCY of the serve process (s)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--gap", type=float, default=0.37, help="seconds between requests")
    parser.add_argument("--busy-core", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ui-submit-"))
    demo.write_tabular(work / "data", rows=2_000, partitions=2, row_group_rows=1_000)
    checkpoint = demo.train_mlp(work / "mlp.safetensors", rows=1_000, steps=5)
    database = PostgresServer() if args.database == "postgres" else None
    stack, busy = None, None
    try:
        if database is not None:
            database.start()
        stack = PrefectStack(work, label=f"ui-submit-{args.database}", database=database and database.prefect_settings)
        if args.busy_core:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        stack.start_server()
        argv = [BATCHINFER, "serve", "--name", "ui-submit", "--input", str(work / "data"), "--model", "mlp",
                "--checkpoint", str(checkpoint), "--output", str(work / "out")]  # fmt: skip
        stack.start("serve", argv, extra_env={"PREFECT_RUNNER_POLL_FREQUENCY": args.poll})
        with stack.client() as client:
            deployment = stack.wait_for_deployment(client, "batch-inference/ui-submit", "serve")
        time.sleep(3)  # the runner is polling by now
        later = {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}}
        body = json.dumps({"state": later, "parameters": {"compute": {"batch_size": 128}}}).encode()
        codes: dict[int, int] = {}
        for _ in range(args.requests):
            request = urllib.request.Request(
                f"{stack.api_url}/deployments/{deployment.id}/create_flow_run",
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    code = response.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            codes[code] = codes.get(code, 0) + 1
            time.sleep(args.gap)
        print(f"database {args.database}, runner poll {args.poll} s, busy core {args.busy_core}: {codes}")
    finally:
        if busy is not None:
            busy.kill()
        if stack is not None:
            stack.stop_all()
        if database is not None:
            database.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
