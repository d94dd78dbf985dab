"""A real Prefect server on loopback, with its own home, plus the workers and `serve` processes tests start.

The deployment tests share one server per test session (a fresh server takes about 11 s to start):
`shared_stack()` starts it on first use and stops it when the session ends. The browser test starts its
own, on PostgreSQL (tests/postgres.py). Every process gets exactly the environment it needs (API URL,
home, no telemetry, offline models); none of the caller's PREFECT_* settings leak in. Logs go to
test-artifacts/prefect/LABEL/ so a failure can be read after the fact.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, python_path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
PREFECT = shutil.which("prefect", path=os.path.dirname(sys.executable)) or "prefect"
BATCHINFER = shutil.which("batchinfer", path=os.path.dirname(sys.executable)) or "batchinfer"


class PrefectStack:
    """`prefect server start` on a free loopback port, and the processes that talk to it."""

    def __init__(self, workdir: Path, label: str = "sqlite", database: Mapping[str, str] | None = None):
        self.workdir = workdir
        self.home = workdir / "prefect-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = ARTIFACTS / "prefect" / label
        self.database = dict(database or {})  # the server's PREFECT_SERVER_DATABASE_*; none: SQLite in its home
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="INFO",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            # flow runs import `tests.flaky_model` whatever their working directory
            PYTHONPATH=python_path(),
        )
        env.update(extra or {})
        return env

    # -- processes -------------------------------------------------------------

    def start(self, name: str, argv: list[str], extra_env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running process in its own process group, logging to test-artifacts/prefect/LABEL/NAME.log."""
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env(extra_env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        proc.log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def start_server(self, timeout: float = 120.0) -> None:
        from cli.main import SERVER_SETTINGS  # started as the README shows

        argv = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        proc = self.start("server", argv, extra_env={**SERVER_SETTINGS, **self.database})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{self.tail('server')}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"prefect server not healthy within {timeout} s:\n{self.tail('server')}")

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        """Signal the process group NAME started; SIGKILL it if it outlives the grace period."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            else:
                os.killpg(proc.pid, signal.SIGKILL)  # children it left behind, if any
        except ProcessLookupError:
            pass
        finally:
            proc.log.close()  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        # Clients first, the server last, so they can say goodbye to it.
        for name in [n for n in self.procs if n != "server"]:
            self.stop(name, signal.SIGKILL)
        self.stop("server")

    def tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def cli(self, *args: str, extra_env: Mapping[str, str] | None = None, timeout: float = 180.0) -> str:
        """Run a `prefect` command from the repository root, as the README says; return its output."""
        done = subprocess.run(
            [PREFECT, *args], cwd=ROOT, env=self.env(extra_env), capture_output=True, text=True, timeout=timeout
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{output[-4000:]}"
        return output

    # -- API -------------------------------------------------------------------

    def client(self) -> Any:
        """A client for this server only, whatever the test process's own Prefect settings say."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(api=self.api_url)

    def wait_for_run(self, client: Any, run_id: Any, timeout: float = 150.0, logs: tuple[str, ...] = ()) -> Any:
        """Poll a flow run until it reaches a final state; on timeout, show its state and the logs named."""
        deadline = time.monotonic() + timeout
        run = client.read_flow_run(run_id)
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(0.5)
        tails = "\n".join(f"--- {name} ---\n{self.tail(name)}" for name in logs)
        raise TimeoutError(f"flow run {run_id} still {run.state_name} after {timeout} s\n{tails}")

    def wait_for_deployment(self, client: Any, name: str, process: str, timeout: float = 90.0) -> Any:
        """The deployment `flow/name` once the process `process` (a `batchinfer serve`) has registered it."""
        from prefect.exceptions import ObjectNotFound

        deadline = time.monotonic() + timeout
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                proc = self.procs[process]
                assert proc.poll() is None, f"{process} exited {proc.returncode}:\n{self.tail(process)}"
                assert time.monotonic() < deadline, f"no deployment {name} after {timeout} s:\n{self.tail(process)}"
                time.sleep(0.5)

    def wait_for_task_runs(
        self, client: Any, run_id: Any, count: int, prefix: str = "", timeout: float = 30.0
    ) -> list[Any]:
        """The flow run's task runs once `count` of those named PREFIX... are final. The server records task runs from the
        events their process sent, in batches of up to a second (cli.main.SERVER_SETTINGS): a flow run can
        be final before its last task run's state is recorded."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            final = [r for r in runs if r.name.startswith(prefix) and r.state is not None and r.state.is_final()]
            if len(final) >= count:
                return runs
            time.sleep(0.25)
        states = sorted(f"{r.name}: {r.state_name}" for r in runs)
        raise TimeoutError(
            f"flow run {run_id}: {len(runs)} task runs recorded after {timeout} s, not {count}: {states}"
        )


_STACK: PrefectStack | None = None


def shared_stack(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> PrefectStack:
    """The session's server: started on first use, stopped when pytest finishes."""
    global _STACK
    if _STACK is None:
        stack = PrefectStack(tmp_path_factory.mktemp("prefect-stack"))
        config.add_cleanup(stack.stop_all)
        stack.start_server()
        _STACK = stack

        def forget() -> None:
            global _STACK
            _STACK = None

        config.add_cleanup(forget)
    return _STACK
