"""Shared fixtures: small deterministic data, a trained checkpoint, a local S3 server, Prefect."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# Quiet, offline, and never real cloud credentials, before prefect or boto import.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "ERROR")
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "batchinfer"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_name, None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
# Under pytest-xdist each worker stands for a host of its own: its own device locks and Prefect home.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    for _name, _leaf in (("BATCHINFER_LOCK_DIR", "batchinfer-devices"), ("PREFECT_HOME", "prefect")):
        _base = os.environ.get(_name) or os.path.join(os.environ.get("TMPDIR", "/tmp"), _leaf)
        os.environ[_name] = os.path.join(_base, _WORKER)

from batchinfer import demo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def python_path() -> str:
    """PYTHONPATH for a child process: the repository, then whatever this process was given."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


class S3Server:
    """moto's S3 server on loopback; can be stopped and started again on the same port."""

    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self) -> dict:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}

    def start(self) -> None:
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
        self.log = open(self.workdir / f"moto-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=self.log)
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(free_port(), tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns (bucket URI, storage options)."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_server.options())
    fs.mkdir(name)
    return f"s3://{name}", s3_server.options()


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def control(tmp_path, monkeypatch) -> Path:
    """The folder that steers tests/faulty_models.py (sleep, fail, nan files)."""
    folder = tmp_path / "control"
    folder.mkdir()
    monkeypatch.setenv("BATCHINFER_TEST_CONTROL", str(folder))
    return folder


@pytest.fixture(scope="session")
def tabular(tmp_path_factory) -> dict:
    """20,000 rows of 64 features over 4 partitions (row groups of 1,000), and a trained MLP checkpoint."""
    root = tmp_path_factory.mktemp("tabular")
    demo.write_tabular(root / "data", rows=20_000, partitions=4, row_group_rows=1_000)
    checkpoint = demo.train_mlp(root / "mlp.safetensors", rows=4_000, steps=40)
    return {"input": str(root / "data"), "checkpoint": str(checkpoint), "root": root}


@pytest.fixture(scope="session")
def text(tmp_path_factory) -> dict:
    """120 sentences of varied length over 2 partitions."""
    root = tmp_path_factory.mktemp("text")
    demo.write_text(root / "data", count=120, partitions=2)
    return {"input": str(root / "data"), "root": root}


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    """The real `prefect server start` shared by the deployment tests (tests/prefect_stack.py)."""
    from tests.prefect_stack import shared_stack

    return shared_stack(request.config, tmp_path_factory)


def run_job(**kwargs):
    """Run the real flow in this process (inside the session's Prefect server)."""
    from batchinfer.config import make_config
    from cli.main import run_flow

    return run_flow(make_config(**kwargs), show_progress=False)
