"""The same flow on Dask and Ray through Prefect's task runners, with GPUs placed by the engine.

Real engines on this machine: a Dask LocalCluster whose 2 worker processes each offer {"GPU": 1}, and a
local Ray with 2 logical GPUs. Each shard asks the engine for one GPU and runs on the device it was given.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from cli.main import EXIT_BAD_INPUT, main
from tests.conftest import run_job
from tests.faulty_models import FEATURES
from tests.test_devices import (
    _assert_each_device_held_once,
    _core_lines_in_run_logs,
    _interval,
    _markers,
    _max_overlap,
)

pytest.importorskip("prefect_dask", reason="the dask extra is part of the test install")
pytest.importorskip("prefect_ray", reason="the ray extra is part of the test install")

MODEL = "tests.faulty_models:factory"
pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


def _job(tabular: dict, output: Path, **extra) -> dict:
    settings = dict(
        input_uri=tabular["input"],
        output_uri=str(output),
        model=MODEL,
        features=FEATURES,
        devices="fake:2",
        shard_rows=2_500,
        batch_size=500,
    )
    return run_job(**{**settings, **extra})


def _predictions(output: Path) -> pl.DataFrame:
    return pl.read_parquet(output / "predictions" / "*.parquet").sort("id")


@pytest.fixture(scope="module")
def local_result(tabular, tmp_path_factory) -> Path:
    """The same job on the local engine: the reference."""
    output = tmp_path_factory.mktemp("local") / "out"
    control = tmp_path_factory.mktemp("control")
    os.environ["BATCHINFER_TEST_CONTROL"] = str(control)
    _job(tabular, output)
    return output


@pytest.fixture
def api_in_environment(monkeypatch):
    """Worker processes started by a test (a cluster it makes itself) report to the session's server."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())


def _assert_placed_by_engine(output: Path, local_result: Path, report: dict) -> list[dict]:
    assert _predictions(output).equals(_predictions(local_result))
    markers = _markers(output)
    assert len(markers) == 8
    assert 1 <= _max_overlap([_interval(m) for m in markers]) <= 2
    _assert_each_device_held_once(markers)
    assert {m["device"] for m in markers} == {"fake:0", "fake:1"}
    assert os.getpid() not in {m["pid"] for m in markers}  # scored in the engine's worker processes
    by_worker = {}
    for marker in markers:
        by_worker.setdefault(marker["pid"], set()).add(marker["device"])
    assert len(by_worker) == 2 and all(len(d) == 1 for d in by_worker.values())  # one device per worker
    loads = [m for m in markers if m["model_loaded"]]
    assert len(loads) == 2  # once per worker process and device, reused by its other shards
    done = {m["shard_id"] for m in markers}
    # The workers' INFO lines in this run's log.
    assert done <= _core_lines_in_run_logs("batchinfer.runner", done, report["flow_run_id"])
    return markers


def test_dask_local_cluster_places_one_shard_per_gpu_worker(
    tabular, tmp_path, control, local_result, api_in_environment
):
    report = _job(tabular, tmp_path / "out", engine="dask")
    assert report["ok"] and report["shards_run"] == 8
    _assert_placed_by_engine(tmp_path / "out", local_result, report)


def test_dask_cluster_by_address_and_a_worker_killed_mid_shard(
    tabular, tmp_path, control, local_result, api_in_environment
):
    """An existing cluster given by address (annotations must reach its scheduler); one worker process is
    SIGKILLed mid-shard, its nanny starts it again, and the run still ends complete and correct."""
    from distributed import LocalCluster

    (control / "die").write_text("5000 5001")
    shared = {"input_uri": f"file://{tabular['input']}", "output_uri": f"file://{tmp_path}/out"}
    with LocalCluster(n_workers=2, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=None) as cluster:
        report = _job(tabular, tmp_path / "out", engine="dask", engine_address=cluster.scheduler_address, **shared)
    assert not (control / "die").exists()  # a worker did die
    assert report["ok"] and report["shards_run"] == 8
    assert _predictions(tmp_path / "out").equals(_predictions(local_result))
    markers = _markers(tmp_path / "out")
    assert len(markers) == 8 and len(list((tmp_path / "out" / "shards").glob("*.parquet"))) == 8


def test_a_dask_worker_killed_after_its_commit_leaves_the_shard_committed_once(
    tabular, tmp_path, local_result, api_in_environment, monkeypatch
):
    """SIGKILL between a shard's marker and its task's end: Dask runs the task again on a worker, which finds
    the marker and its file and does not score or commit the shard a second time."""
    from distributed import LocalCluster

    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "pause").write_text("commit.marker 5\n")
    monkeypatch.setenv("BATCHINFER_FAULT_POINTS", str(faults))
    out = tmp_path / "out"
    shared = {"input_uri": f"file://{tabular['input']}", "output_uri": f"file://{out}"}
    outcome: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=None) as cluster:
        job = threading.Thread(
            target=lambda: outcome.update(
                _job(tabular, out, engine="dask", engine_address=cluster.scheduler_address, **shared)
            )
        )
        job.start()
        deadline = time.monotonic() + 120
        reached = faults / "reached"
        while time.monotonic() < deadline and not (reached.exists() and reached.read_text().endswith("\n")):
            time.sleep(0.05)  # a whole line: the point appends it after creating the file
        (faults / "pause").write_text("")  # no other shard waits there
        name, pid = reached.read_text().split("\n")[0].split()
        assert name == "commit.marker"
        committed = {m["shard_id"]: m for m in _markers(out)}  # the killed shard's marker is among them
        os.kill(int(pid), signal.SIGKILL)
        job.join(timeout=180)
    assert not job.is_alive() and outcome["ok"] and outcome["shards_run"] == 8
    assert _predictions(out).equals(_predictions(local_result))
    markers = {m["shard_id"]: m for m in _markers(out)}
    assert len(markers) == 8 and all((out / "shards" / f"{i}.parquet").exists() for i in markers)
    killed = [i for i, m in committed.items() if m["pid"] == int(pid)]
    assert killed and all(markers[i] == committed[i] for i in killed)  # committed once, by the killed worker
    assert int(pid) not in {m["pid"] for i, m in markers.items() if i not in committed}  # it did die


def test_ray_local_places_each_shard_on_its_own_gpu(tabular, tmp_path, control, local_result):
    (control / "visible").write_text("")
    report = _job(tabular, tmp_path / "out", engine="ray")
    assert report["ok"] and report["shards_run"] == 8
    markers = _assert_placed_by_engine(tmp_path / "out", local_result, report)
    seen = {}
    for line in (control / "visible").read_text().split("\n"):
        if line:
            pid, visible = line.split()
            seen.setdefault(int(pid), set()).add(visible)
    assert sorted(v for values in seen.values() for v in values) == ["0", "1"]  # Ray set each task's GPU
    device_of = {m["pid"]: m["device"] for m in markers}
    assert all(device_of[pid] == f"fake:{next(iter(v))}" for pid, v in seen.items())  # and that one was used


def test_ray_worker_killed_mid_shard_is_retried_by_ray(tabular, tmp_path, control, local_result):
    (control / "die").write_text("7500 7501")
    report = _job(tabular, tmp_path / "out", engine="ray")
    assert not (control / "die").exists()
    assert report["ok"] and report["shards_run"] == 8
    assert _predictions(tmp_path / "out").equals(_predictions(local_result))
    assert len(_markers(tmp_path / "out")) == 8


def test_a_local_output_with_a_remote_engine_is_refused_before_any_work(tabular, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["run", "--input", tabular["input"], "--output", str(output), "--model", "mlp"]
    args += ["--checkpoint", tabular["checkpoint"], "--engine", "dask", "--engine-address", "tcp://127.0.0.1:9"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"batchinfer: error: --input {tabular['input']} is a local path, but --engine dask runs shards on the "
        f"cluster at tcp://127.0.0.1:9: use storage every worker sees (s3://...), or file://{tabular['input']} "
        "if every worker mounts it at that path"
    ]
    assert not output.exists()


def test_a_cluster_without_gpu_workers_is_refused_with_one_line(tabular, tmp_path, control, api_in_environment):
    """A shard asking for a GPU that no worker offers would wait forever; the run is refused instead."""
    from distributed import LocalCluster

    from batchinfer.errors import ConfigError

    data = f"file://{tabular['input']}"
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        with pytest.raises(ConfigError, match="no worker of tcp://.* offers a GPU; start workers with `dask worker"):
            _job(
                tabular,
                tmp_path / "out",
                input_uri=data,
                output_uri=f"file://{tmp_path}/out",
                engine="dask",
                engine_address=cluster.scheduler_address,
            )
    assert not list((tmp_path / "out").glob("markers/*.json"))


def test_engine_address_needs_a_cluster_engine(tabular, tmp_path, capsys):
    args = ["run", "--input", tabular["input"], "--output", str(tmp_path / "o"), "--model", "mlp"]
    assert main([*args, "--engine-address", "tcp://x:1"]) == EXIT_BAD_INPUT
    assert "--engine-address: needs --engine dask or ray (the engine is 'local')" in capsys.readouterr().err
