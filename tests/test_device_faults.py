"""How GPUs fail, on the CPU: out-of-memory halving for every model, outputs on the wrong device, broken
devices leaving the pool, and the differences between the torch releases the project supports.

The real CUDA versions of these paths run in tests/test_gpu.py.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import tomllib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchinfer import compat, devices, runner
from batchinfer.devices import Device, DeviceWorkers, discover, hold_device
from batchinfer.errors import NoHealthyDevice
from tests.conftest import ROOT, run_job
from tests.core_helpers import run_core
from tests.device_faults import FEATURES, LIMIT, expected
from tests.test_bad_input import cli

# -- telling device failures apart ----------------------------------------------------------------------------


class _LimitedModule(torch.nn.Module):
    """TorchScript re-raises what its graph raises as torch.jit.Error, which is not even a RuntimeError."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 300:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.linear(x)


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing was raised")


def test_out_of_memory_is_recognised_from_its_type_its_message_and_its_cause():
    scripted = torch.jit.script(_LimitedModule())
    from_torchscript = _raised(lambda: scripted(torch.zeros(301, 3)))
    assert not isinstance(from_torchscript, (RuntimeError, torch.OutOfMemoryError))
    assert compat.is_out_of_memory(from_torchscript)
    assert compat.is_out_of_memory(torch.OutOfMemoryError("anything"))
    assert compat.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert compat.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))

    def wrapped() -> None:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as exc:
            raise ValueError("the model's own wrapper") from exc

    assert compat.is_out_of_memory(_raised(wrapped))
    assert not compat.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not compat.is_out_of_memory(ValueError("injected failure"))


def test_fatal_device_errors_are_recognised_and_out_of_memory_is_not_one():
    assert compat.is_fatal_device_error(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert compat.is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not compat.is_fatal_device_error(RuntimeError("CUDA error: out of memory"))
    assert not compat.is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert not compat.is_fatal_device_error(ValueError("injected failure for ids 0..9"))


def test_both_checks_work_on_a_torch_without_the_newer_exception_types(monkeypatch):
    """Releases in the supported range may lack a name: then the message still tells."""
    monkeypatch.delattr(torch, "AcceleratorError")
    monkeypatch.delattr(torch, "OutOfMemoryError")
    monkeypatch.delattr(torch.cuda, "OutOfMemoryError")
    assert compat.accelerator_error_types() == () and compat.out_of_memory_types() == ()
    assert compat.is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert compat.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not compat.is_out_of_memory(RuntimeError("index 3 is out of bounds"))


def test_the_supported_torch_range_is_stated_once_and_holds_the_installed_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"torch{compat.SUPPORTED_TORCH}" in project["project"]["dependencies"]
    assert compat.SUPPORTED_TORCH in (ROOT / "README.md").read_text()
    assert compat.torch_supported()
    assert compat.torch_supported("2.11.0+cu130") and compat.torch_supported("2.13.0")
    assert not compat.torch_supported("2.10.1") and not compat.torch_supported("2.14.0")


# -- out of memory ---------------------------------------------------------------------------------------------


def _limited_script(path: Path) -> Path:
    torch.manual_seed(3)
    torch.jit.save(torch.jit.script(_LimitedModule().eval()), str(path))
    return path


def _three_features(folder: Path, rows: int, parts: int = 2) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    per = rows // parts
    for p in range(parts):
        x = rng.standard_normal((per, 3), dtype=np.float32)
        table = pa.table({"id": np.arange(p * per, (p + 1) * per), "a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
        pq.write_table(table, folder / f"part-{p:05d}.parquet", row_group_size=250)
    return folder


@pytest.mark.usefixtures("prefect_server")
def test_a_torchscript_model_out_of_memory_above_a_batch_size_finishes_through_the_cli(tmp_path, capsys):
    model = _limited_script(tmp_path / "limited.pt")
    data = _three_features(tmp_path / "data", 2_000)
    output = tmp_path / "out"
    code, _ = cli(
        capsys,
        "run",
        *("--input", str(data), "--output", str(output), "--model", str(model), "--features", "a,b,c"),
        *("--batch-size", "1024", "--devices", "cpu", "--output-kind", "classifier"),
    )
    assert code == 0
    got = pl.read_parquet(output / "predictions" / "*.parquet").sort("id")
    inputs = pl.read_parquet(data / "*.parquet").sort("id")
    x = torch.from_numpy(inputs.select("a", "b", "c").to_numpy())
    module = torch.jit.load(str(model))
    with torch.inference_mode():
        want = torch.cat([torch.softmax(module(x[lo : lo + 250]), dim=1) for lo in range(0, len(x), 250)])
    np.testing.assert_allclose(np.stack(got["probabilities"].to_list()), want.numpy(), atol=1e-6)
    markers = [json.loads(p.read_text()) for p in (output / "markers").glob("*.json")]
    assert len(markers) == 2 and {m["batch_size"] for m in markers} == {250}  # chunks of 1,000: 1,000 -> 500 -> 250


def test_a_configured_batch_halved_once_stays_halved_for_the_rest_of_the_shard(tmp_path, control, monkeypatch):
    """Two shards of 1,000 rows in chunks of 400, batch 400, room for 300: one failure per shard, not per chunk."""
    monkeypatch.setattr(runner, "CHUNK_ROWS_FEATURES", 400)
    data = _ids_and_features(tmp_path / "data", 2_000)
    plan, report = run_core(
        input_uri=str(data),
        output_uri=str(tmp_path / "out"),
        model="tests.device_faults:out_of_memory",
        features=FEATURES,
        batch_size=400,
        shard_rows=1_000,
    )
    assert report.ok and len(plan.shards) == 2
    assert (control / "oom").read_text().split() == ["400", "400"]  # the first chunk of each shard
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "markers").glob("*.json")]
    assert {m["batch_size"] for m in markers} == {200} and LIMIT >= 200
    got = pl.read_parquet(tmp_path / "out" / "predictions" / "*.parquet").sort("id")
    features = pl.read_parquet(data / "*.parquet").sort("id").select(FEATURES).to_numpy()
    np.testing.assert_allclose(
        np.stack(got["probabilities"].to_list()), expected(torch.from_numpy(features)).numpy(), atol=1e-6
    )


def _ids_and_features(folder: Path, rows: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    columns = {"id": np.arange(rows)}
    columns.update({name: rng.standard_normal(rows, dtype=np.float32) for name in FEATURES[1:]})
    pq.write_table(pa.table(columns), folder / "part-00000.parquet", row_group_size=250)
    return folder


# -- work lands on the device the shard holds ------------------------------------------------------------------


def test_each_device_thread_makes_its_cuda_device_current(monkeypatch):
    """A model that calls .cuda() without an index then lands on the shard's device, not on cuda:0."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    workers = DeviceWorkers()
    names = [workers.run(Device("cuda:1", "cuda:1"), lambda: threading.current_thread().name) for _ in range(3)]
    workers.run(Device("cpu", "cpu"), lambda: None)
    assert current == [torch.device("cuda:1")]  # once, on the device's own thread, before its first work
    assert len(set(names)) == 1


@pytest.mark.usefixtures("prefect_server")
def test_an_output_on_another_device_is_refused_with_one_line(tabular, tmp_path, capsys):
    code, line = cli(
        capsys,
        *("run", "--input", tabular["input"], "--output", str(tmp_path / "out")),
        *("--model", "tests.device_faults:wrong_device", "--features", ",".join(FEATURES), "--devices", "cpu"),
    )
    assert code == 1
    assert re.fullmatch(
        r"batchinfer: run failed: shard \w+ \(.+\): the model returned its output on meta, but the shard runs on "
        r"cpu; load\(device\) must put the model on the device it is given",
        line,
    ), line


# -- a broken device leaves the pool ---------------------------------------------------------------------------


def test_a_broken_device_is_never_taken_again(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHINFER_LOCK_DIR", str(tmp_path / "locks"))
    pool = discover("fake:2")
    broken = {"fake:0": "its model failed to load (injected)"}
    with hold_device(pool, "a" * 16, broken=lambda: broken, on_wait=print) as lease:
        assert lease.device.name == "fake:1"
    broken["fake:1"] = "a fatal device error (injected)"
    with pytest.raises(NoHealthyDevice) as raised:
        with hold_device(pool, "b" * 16, broken=lambda: broken, on_wait=print):
            pass
    assert str(raised.value) == (
        "every device left the pool in this process "
        "(fake:0: its model failed to load (injected); fake:1: a fatal device error (injected))"
    )


def test_a_device_that_leaves_the_pool_while_a_shard_waits_for_it_is_not_taken(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHINFER_LOCK_DIR", str(tmp_path / "locks"))
    pool = discover("fake:2")
    broken: dict[str, str] = {}
    got: dict = {}

    def waiter() -> None:
        with hold_device(pool, "w" * 16, broken=lambda: broken, on_wait=print) as lease:
            got["device"] = lease.device.name

    with hold_device(pool, "a" * 16, on_wait=print) as first, hold_device(pool, "b" * 16, on_wait=print) as second:
        thread = threading.Thread(target=waiter)
        thread.start()
        threading.Event().wait(0.3)  # the waiter now waits on one of the two
        broken["fake:0"] = broken["fake:1"] = "gone"  # both leave; then one becomes free
        del broken["fake:1"]
        assert {first.device.name, second.device.name} == {"fake:0", "fake:1"}
    thread.join(timeout=10)
    assert got == {"device": "fake:1"}


def _faulty_run(tabular: dict, output: Path, control: Path, mode: str, device: str) -> dict:
    (control / "broken").write_text(f"{mode} {device}")
    return run_job(
        input_uri=tabular["input"],
        output_uri=str(output),
        model="tests.device_faults:breaks_a_device",
        features=FEATURES,
        devices="fake:2",
        shard_rows=5_000,
    )


def _shard_table() -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [latest] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["batchinfer-shards"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return json.loads(latest.data) if isinstance(latest.data, str) else latest.data


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (
            "load",
            "its model failed to load (model 'tests.device_faults:breaks_a_device' failed to load on cpu: "
            "cannot place the weights on this device (injected))",
        ),
        (
            "fatal",
            "a fatal device error (AcceleratorError: CUDA error: an illegal memory access was encountered (injected))",
        ),
    ],
)
def test_a_broken_device_leaves_the_pool_and_the_healthy_one_finishes_the_run(tabular, tmp_path, control, mode, why):
    report = _faulty_run(tabular, tmp_path / "out", control, mode, "fake:0")
    assert report["ok"] and report["shards_run"] == 4
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "markers").glob("*.json")]
    assert {m["device"] for m in markers} == {"fake:1"}
    moved = [m for m in markers if m["note"]]
    assert moved and all(m["note"] == f"moved off fake:0, which left the pool: {why}" for m in moved)
    table = {row["shard"]: row for row in _shard_table()}
    assert {m["shard_id"] for m in moved} == {shard for shard, row in table.items() if row["note"]}
    assert all(table[m["shard_id"]]["note"] == m["note"] and table[m["shard_id"]]["state"] == "done" for m in moved)
    got = pl.read_parquet(tmp_path / "out" / "predictions" / "*.parquet").sort("id")
    features = pl.read_parquet(Path(tabular["input"]) / "*.parquet").sort("id").select(FEATURES).to_numpy()
    np.testing.assert_allclose(
        np.stack(got["probabilities"].to_list()), expected(torch.from_numpy(features)).numpy(), atol=1e-5
    )


@pytest.mark.usefixtures("prefect_server")
def test_a_run_whose_every_device_breaks_fails_with_one_line(tabular, tmp_path, control, capsys):
    (control / "broken").write_text("fatal all")  # (a failed load would not show where a run loaded it before)
    code, line = cli(
        capsys,
        *("run", "--input", tabular["input"], "--output", str(tmp_path / "out"), "--shard-rows", "5000"),
        *("--model", "tests.device_faults:breaks_a_device", "--features", ",".join(FEATURES), "--devices", "fake:2"),
    )
    assert code == 1 and line.startswith("batchinfer: run failed: "), line
    assert "left the pool" in line and "CUDA error: an illegal memory access was encountered" in line, line
    assert not list((tmp_path / "out" / "markers").glob("*.json"))


# -- devices=auto, and the benchmark's device --------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_devices_auto_warns_when_the_driver_lists_gpus_that_torch_cannot_use(tmp_path, monkeypatch):
    if torch.cuda.is_available() or torch.version.cuda:
        pytest.skip("this test's torch is a CPU-only build")
    gpus = tmp_path / "gpus"
    (gpus / "0000:01:00.0").mkdir(parents=True)
    monkeypatch.setattr(devices, "NVIDIA_GPUS_DIR", str(gpus))
    monkeypatch.setattr(devices, "_warned_unusable", False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    records = _Records()
    devices.log.addHandler(records)
    try:
        assert [d.name for d in discover("auto")] == ["cpu"]
        assert [d.name for d in discover("auto")] == ["cpu"]
        assert records.lines == [
            f"--devices auto: the NVIDIA driver lists 1 GPU(s) but torch {torch.__version__} cannot use them "
            "(a CPU-only build); running on the CPU"
        ]  # once a process
        records.lines.clear()
        monkeypatch.setattr(devices, "_warned_unusable", False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose: nothing to say
        assert [d.name for d in discover("auto")] == ["cpu"] and not records.lines
    finally:
        devices.log.removeHandler(records)


def test_the_benchmarks_cuda_flow_asks_for_a_device_that_discover_accepts(monkeypatch):
    from benchmarks.variants import flow_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [d.name for d in discover(flow_devices({"device": "cuda"}))] == ["cuda:0"]
    assert [d.name for d in discover(flow_devices({"device": "cuda:1"}))] == ["cuda:1"]
    assert [d.name for d in discover(flow_devices({"device": "auto"}))] == ["cuda:0"]
    assert flow_devices({"device": "cpu"}) == "cpu"


def test_whether_a_lost_device_may_be_retried_survives_a_process_pool():
    """Prefect's process pool sends a worker's exception back pickled; the retry decision must come along."""
    import pickle

    from batchinfer.errors import DeviceLostError
    from tasks.shards import retry_transient

    class _State:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def result(self, raise_on_failure: bool = False) -> BaseException:
            return self.exc

    for transient in (True, False):
        sent = pickle.loads(pickle.dumps(DeviceLostError("cuda:1 left the pool: ...", transient=transient)))
        assert retry_transient(None, None, _State(sent)) is transient and str(sent) == "cuda:1 left the pool: ..."


def test_a_device_leaves_the_pool_of_one_run_only():
    """A long-lived worker process (Dask, Ray) serves many runs: the next run tries the device again."""
    workers = DeviceWorkers()
    workers.mark_broken(Device("cuda:1", "cuda:1"), "its model failed to load (...)", "s" * 16, "flow run a")
    assert workers.broken("flow run a") == {"cuda:1": "its model failed to load (...)"}
    assert workers.broke_under("s" * 16, "flow run a") == {"cuda:1": "its model failed to load (...)"}
    assert workers.broken("flow run b") == {} and workers.broke_under("s" * 16, "flow run b") == {}
