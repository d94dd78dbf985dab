"""Concurrency equals the devices: one device per running shard, one model copy per device."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batchinfer.devices import Device, DevicePool, discover, pool_for
from batchinfer.errors import DeviceError
from tests.conftest import ROOT, python_path, run_job
from tests.faulty_models import FEATURES

MODEL = "tests.faulty_models:factory"


def _markers(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / "markers").glob("*.json"))]


def _interval(marker: dict) -> tuple[float, float]:
    start = dt.datetime.fromisoformat(marker["started_at"]).timestamp()
    end = dt.datetime.fromisoformat(marker["finished_at"]).timestamp()
    return start, end


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _run_controlled(tabular: dict, output: str, devices: str, *, shard_rows: int, batch_size: int) -> dict:
    """The real flow over the tabular data with the controlled test model."""
    return run_job(
        input_uri=tabular["input"],
        output_uri=str(output),
        model=MODEL,
        features=FEATURES,
        devices=devices,
        shard_rows=shard_rows,
        batch_size=batch_size,
    )


def test_discover_cpu_and_fake_devices():
    assert [d.name for d in discover("cpu")] == ["cpu"]
    assert [d.name for d in discover("fake:3")] == ["fake:0", "fake:1", "fake:2"]
    assert all(d.torch_name == "cpu" for d in discover("fake:3"))
    if not torch.cuda.is_available():
        assert [d.name for d in discover("auto")] in (["cpu"], ["mps"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "need at least one device"),
        ("-1", "need at least one device"),
        ("fake:0", "need at least one device"),
        ("cuda:7", "cuda:7 does not exist"),
        ("tpu", "is not a device"),
        ("cpu,cpu", "listed twice"),
    ],
)
def test_bad_device_specs_fail_with_one_line(spec, message):
    with pytest.raises(DeviceError, match=message):
        discover(spec)


def test_more_devices_than_gpus_is_refused(monkeypatch):
    """--devices 3 on a machine with 2 GPUs names what is visible."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [d.name for d in discover("auto")] == ["cuda:0", "cuda:1"]
    assert [d.name for d in discover("2")] == ["cuda:0", "cuda:1"]
    assert [d.name for d in discover("cuda:1")] == ["cuda:1"]
    with pytest.raises(DeviceError, match=r"--devices 3: only 2 CUDA device\(s\) are visible \(cuda:0, cuda:1\)"):
        discover("3")
    with pytest.raises(DeviceError, match="cuda:7 does not exist"):
        discover("cuda:0,cuda:7")


def test_bad_devices_exit_before_any_shard(tabular, tmp_path, capsys):
    from batchinfer.cli import main

    output = tmp_path / "out"
    code = main(
        [
            "run",
            "--input",
            tabular["input"],
            "--output",
            str(output),
            "--model",
            "mlp",
            "--checkpoint",
            tabular["checkpoint"],
            "--devices",
            "cuda:7",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [err[0]] and "cuda:7 does not exist" in err[0]
    assert not output.exists()


def test_lease_returns_device_when_the_shard_raises():
    pool = DevicePool([Device("fake:0", "cpu")])
    with pytest.raises(RuntimeError, match="boom"):
        with pool.lease("a" * 16):
            raise RuntimeError("boom")
    assert pool.held == {}
    with pool.lease("b" * 16, timeout=1) as device:
        assert device.name == "fake:0"


@pytest.mark.usefixtures("prefect_server")
def test_fake_devices_through_the_flow(tabular, tmp_path, control):
    """3 devices, 12 shards: at most 3 overlap, no device held twice, all used, one model load per device."""
    (control / "sleep").write_text("0.15")
    (control / "fail").write_text("value 2000 2001")  # one shard raises: its device must come back
    output = tmp_path / "out"
    pool = pool_for(discover("fake:3"))
    history_before = len(pool.history)
    with pytest.raises(Exception, match="injected failure"):
        _run_controlled(tabular, str(output), "fake:3", shard_rows=2_000, batch_size=500)
    history = pool.history[history_before:]
    assert len(history) == 12
    assert pool.held == {}
    assert {r.device for r in history} == {"fake:0", "fake:1", "fake:2"}
    assert _max_overlap([(r.start, r.end) for r in history]) <= 3
    assert _max_overlap([(r.start, r.end) for r in history]) >= 2  # they did run side by side
    for device in ("fake:0", "fake:1", "fake:2"):
        own = sorted((r.start, r.end) for r in history if r.device == device)
        assert all(a[1] <= b[0] for a, b in zip(own, own[1:], strict=False)), f"{device} was held by two shards"
    loads = (control / "loads").read_text().split()
    assert len(loads) <= 3
    markers = _markers(output)
    assert len(markers) == 11  # the failing shard committed nothing
    assert {m["device"] for m in markers} == {"fake:0", "fake:1", "fake:2"}
    assert sum(m["model_loaded"] for m in markers) <= 3
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["state"] == "failed"
    failed = [s for s in manifest["shards"] if s["state"] == "failed"]
    assert len(failed) == 1 and "injected failure" in failed[0]["error"]
    assert not (output / "_SUCCESS").exists()


@pytest.mark.usefixtures("prefect_server")
def test_gpu_tag_limit_is_set_and_shared_by_two_runs(tabular, tmp_path, control):
    """Two runs on one server, each with 2 fake devices: together never more than 2 shards at once."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    tag = "gpu-shared-test"
    (control / "sleep").write_text("0.3")
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": python_path(),
        "BATCHINFER_TEST_CONTROL": str(control),
    }
    outputs = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batchinfer.cli",
                "run",
                "--input",
                tabular["input"],
                "--output",
                str(out),
                "--model",
                MODEL,
                "--features",
                ",".join(FEATURES),
                "--devices",
                "fake:2",
                "--shard-rows",
                "5000",
                "--batch-size",
                "1000",
                "--concurrency-tag",
                tag,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-2000:]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(tag).limit == 2
    intervals = [_interval(m) for out in outputs for m in _markers(out)]
    assert len(intervals) == 8
    assert _max_overlap(intervals) <= 2


@pytest.mark.usefixtures("prefect_server")
def test_runs_starting_together_all_get_the_slot_limit():
    """Runs that start at the same moment race to create the limit; none of them may fail on it."""
    import threading
    import uuid

    from prefect.client.orchestration import get_client

    from flows.slots import DeviceSlots

    name = f"gpu-race-{uuid.uuid4().hex[:8]}"
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def open_slots() -> None:
        start.wait()
        try:
            with DeviceSlots(name, 8) as slots:  # a slot for each, so none is refused for want of one
                lease = slots.try_take()
                assert lease is not None
                slots.give_back(lease)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_slots) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 8


@pytest.mark.usefixtures("prefect_server")
def test_next_shard_task_starts_while_the_current_shard_runs(tabular, tmp_path, control, monkeypatch):
    """One device: each next shard's task is already started (held at its gate) before the shard
    before it finishes, so Prefect's task start-up is off the critical path; shards never overlap."""
    import tasks.shards

    # 3 s shards: longer than a 2 s retry of "database is locked" in the next task's start-up
    (control / "sleep").write_text("0.6")
    gates: list = []
    reached: dict[int, float] = {}

    class RecordingGate(tasks.shards.Gate):
        def __init__(self) -> None:
            super().__init__()
            self.index = len(gates)
            gates.append(self)

        def wait(self) -> bool:
            reached[self.index] = time.monotonic()  # the clock of the pool's lease records
            return super().wait()

    monkeypatch.setattr(tasks.shards, "Gate", RecordingGate)
    monkeypatch.setattr("flows.batch_inference.Gate", RecordingGate)
    output = tmp_path / "out"
    pool = pool_for(discover("fake:1"))
    history_before = len(pool.history)
    _run_controlled(tabular, str(output), "fake:1", shard_rows=5_000, batch_size=1_000)
    history = sorted(pool.history[history_before:], key=lambda r: r.start)
    assert len(history) == len(gates) == 4
    assert _max_overlap([(r.start, r.end) for r in history]) == 1
    for previous, index in zip(history, range(1, 4), strict=False):
        assert reached[index] < previous.end, f"the task of shard {index + 1} started only after shard {index} ended"
    assert all(gate._event.is_set() for gate in gates)  # no task left waiting


@pytest.mark.usefixtures("prefect_server")
def test_a_committed_shard_frees_its_device_before_prefect_ends_its_task_run(tabular, tmp_path, control, monkeypatch):
    """Prefect's end of a task run (final state, the tag's slot) can take tenths of a second or a 2 s
    retry; the next shard must not wait for it. Here every shard task's end is made 1.5 s slower."""
    import prefect.task_engine

    original = prefect.task_engine.SyncTaskRunEngine.handle_success
    ended: list[float] = []

    def slow_success(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.task.name == "infer-shard":
            time.sleep(1.5)
            ended.append(time.monotonic())
        return result

    monkeypatch.setattr(prefect.task_engine.SyncTaskRunEngine, "handle_success", slow_success)
    # 2.5 s shards: longer than the slower end, and than a 2 s retry in a waiting task's start-up
    (control / "sleep").write_text("0.5")
    pool = pool_for(discover("fake:1"))
    history_before = len(pool.history)
    result = _run_controlled(tabular, str(tmp_path / "out"), "fake:1", shard_rows=5_000, batch_size=1_000)
    assert result["ok"]
    history = sorted(pool.history[history_before:], key=lambda r: r.start)
    assert len(history) == len(ended) == 4
    gaps = [after.start - before.end for before, after in zip(history, history[1:], strict=False)]
    assert max(gaps) < 1.0, gaps  # each next shard started while the task before it was still ending
    assert _max_overlap([(r.start, r.end) for r in history]) == 1


@pytest.mark.usefixtures("prefect_server")
def test_each_device_runs_all_its_torch_work_on_one_thread(tabular, tmp_path, control):
    """Shards reach a device from different Prefect worker threads; loading and scoring still happen on
    the device's own thread (one libgomp thread team per device), a different one for each device."""
    (control / "threads").write_text("")
    _run_controlled(tabular, str(tmp_path / "out"), "fake:2", shard_rows=2_500, batch_size=500)
    calls = (control / "threads").read_text().split()
    assert len(calls) > 8 * 5  # 8 shards of 5 batches, plus the loads
    assert len(set(calls)) == 2  # one thread per device, however many worker threads Prefect used


@pytest.mark.usefixtures("prefect_server")
def test_the_model_loads_before_the_first_shard_task_starts(tabular, tmp_path, control, monkeypatch):
    """The model load starts on each device as soon as the plan is known, overlapping the start-up of
    the first shards' tasks, instead of inside the first shard."""
    import time

    import tasks.shards
    from batchinfer.devices import DevicePool

    loading: list[float] = []
    original = DevicePool.model

    def model(self, device, spec):
        loading.append(time.monotonic())
        return original(self, device, spec)

    reached: list[float] = []

    class RecordingGate(tasks.shards.Gate):
        def wait(self) -> bool:
            reached.append(time.monotonic())
            return super().wait()

    monkeypatch.setattr(DevicePool, "model", model)
    monkeypatch.setattr("flows.batch_inference.Gate", RecordingGate)
    output = tmp_path / "out"
    _run_controlled(tabular, str(output), "fake:2", shard_rows=5_000, batch_size=1_000)
    assert len(reached) == 4
    assert len(loading) == 2 + 4  # one per device up front, then one per shard (finding it loaded)
    assert sorted(loading)[1] < min(reached)  # both loads began before any shard task started

    # A rerun of one shard loads the model on one device only.
    next((output / "markers").glob("*.json")).unlink()
    loading.clear()
    reached.clear()
    _run_controlled(tabular, str(output), "fake:2", shard_rows=5_000, batch_size=1_000)
    assert len(reached) == 1
    assert len(loading) == 1 + 1


@pytest.mark.usefixtures("prefect_server")
def test_slots_given_back_and_held_at_close_are_all_freed_on_the_server():
    import uuid

    from prefect.client.orchestration import get_client

    from flows.slots import DeviceSlots

    name = f"gpu-free-{uuid.uuid4().hex[:8]}"
    with DeviceSlots(name, 3) as slots:
        leases = [slots.try_take() for _ in range(3)]
        assert None not in leases and slots.try_take() is None  # all 3 held
        slots.give_back(leases[0])  # returns before the server has it
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 20
        while client.read_global_concurrency_limit_by_name(name).active_slots and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
    with DeviceSlots(name, 3) as slots:
        assert all(slots.try_take() is not None for _ in range(3))
