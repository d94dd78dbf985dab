"""Concurrency equals the devices: one device per running shard on the host, one model copy per device and process.

A shard owns its device through a flock on the host's lock file for that device: other runs, other
processes and other threads wait, and a killed holder frees it at once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from batchinfer.devices import Device, discover, hold_device
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
    from cli.main import main

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


HOLD = """
import sys, time
from batchinfer.devices import Device, hold_device
with hold_device([Device("fake:0", "cpu")], "holder-shard", run="run-a", on_wait=print):
    print("held", flush=True)
    time.sleep(600)
"""


def _lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "locks"
    monkeypatch.setenv("BATCHINFER_LOCK_DIR", str(folder))
    return folder


def test_a_device_is_held_by_one_shard_at_a_time_and_comes_back_when_the_shard_raises(tmp_path, monkeypatch):
    """Threads of one process exclude each other too (flock, not lockf); a waiting shard names the holder."""
    _lock_dir(tmp_path, monkeypatch)
    device = [Device("fake:0", "cpu")]
    waits: list[str] = []
    got: dict = {}

    def second() -> None:
        with hold_device(device, "b" * 16, on_wait=waits.append) as lease:
            got["lease"] = lease

    with pytest.raises(RuntimeError, match="boom"):
        with hold_device(device, "a" * 16, run="flow run first", on_wait=waits.append):
            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(0.3)
            assert "lease" not in got  # still waiting while the first shard holds the device
            raise RuntimeError("boom")
    thread.join(timeout=5)
    assert got["lease"].device.name == "fake:0" and got["lease"].waited_seconds > 0.2
    assert waits == [f"shard {'b' * 16} is waiting for fake:0, held by {got['lease'].waited_for}"]
    assert f"pid {os.getpid()}" in got["lease"].waited_for and "flow run first" in got["lease"].waited_for
    with hold_device(device, "c" * 16, on_wait=waits.append) as lease:  # free again, no wait
        assert lease.waited_for == "" and len(waits) == 1


def test_a_waiting_shard_takes_whichever_device_comes_free_first(tmp_path, monkeypatch):
    """With every device held, a shard names each holder and gets the first device released, whichever it is."""
    _lock_dir(tmp_path, monkeypatch)
    devices = discover("fake:3")
    waits: list[str] = []
    got: dict = {}
    done = {shard: threading.Event() for shard in ("a" * 16, "b" * 16, "c" * 16, "d" * 16, "e" * 16)}

    def hold(shard: str) -> None:
        with hold_device(devices, shard, run=f"run-{shard[0]}", on_wait=waits.append) as lease:
            got[shard] = lease
            done[shard].wait(10)

    def started(shard: str) -> threading.Thread:
        thread = threading.Thread(target=hold, args=(shard,))
        thread.start()
        return thread

    def held(shard: str) -> object:
        deadline = time.time() + 5
        while shard not in got and time.time() < deadline:
            time.sleep(0.01)
        return got[shard]

    threads = [started(shard) for shard in ("a" * 16, "b" * 16, "c" * 16)]
    owner = {held(shard).device.name: shard for shard in ("a" * 16, "b" * 16, "c" * 16)}
    for waiter, freed in (("d" * 16, "fake:2"), ("e" * 16, "fake:1")):
        threads.append(started(waiter))
        time.sleep(0.3)
        assert waiter not in got  # every device is held
        done[owner[freed]].set()
        lease = held(waiter)
        assert lease.device.name == freed and f"shard {owner[freed]}, run-{owner[freed][0]}" in lease.waited_for
        owner[freed] = waiter
    assert len(waits) == 2 and all(waits[0].count(f"fake:{i}, held by pid {os.getpid()}") == 1 for i in range(3))
    for event in done.values():
        event.set()
    for thread in threads:
        thread.join(timeout=5)


def test_free_devices_are_taken_first_and_preferred_ones_before_others(tmp_path, monkeypatch):
    _lock_dir(tmp_path, monkeypatch)
    devices = discover("fake:3")
    with hold_device(devices, "a" * 16, on_wait=print) as first:
        with hold_device(devices, "b" * 16, prefer=["fake:2"], on_wait=print) as second:
            with hold_device(devices, "c" * 16, on_wait=print) as third:
                assert [first.device.name, second.device.name, third.device.name] == ["fake:0", "fake:2", "fake:1"]
                assert not (first.waited_for or second.waited_for or third.waited_for)


def test_a_killed_holder_frees_its_device_at_once(tmp_path, monkeypatch):
    """SIGKILL leaves nothing to expire: the kernel drops the lock with the process."""
    _lock_dir(tmp_path, monkeypatch)
    env = {**os.environ, "PYTHONPATH": python_path()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waits: list[str] = []
        killer = threading.Timer(0.5, holder.send_signal, [signal.SIGKILL])
        killer.start()
        with hold_device([Device("fake:0", "cpu")], "d" * 16, on_wait=waits.append) as lease:
            assert holder.poll() is not None or holder.wait(5) == -signal.SIGKILL
            assert f"pid {holder.pid}" in waits[0] and "holder-shard" in waits[0] and "run-a" in waits[0]
            assert 0.4 < lease.waited_seconds < 3
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.usefixtures("prefect_server")
def test_fake_devices_through_the_flow(tabular, tmp_path, control):
    """3 devices, 12 shards: at most 3 at once, no device held twice, all used, one model load per device."""
    (control / "sleep").write_text("0.15")
    (control / "fail").write_text("value 2000 2001")  # one shard raises: its device must come back
    output = tmp_path / "out"
    with pytest.raises(Exception, match="injected failure"):
        _run_controlled(tabular, str(output), "fake:3", shard_rows=2_000, batch_size=500)
    markers = _markers(output)
    assert len(markers) == 11  # the failing shard committed nothing
    assert {m["device"] for m in markers} == {"fake:0", "fake:1", "fake:2"}
    intervals = [_interval(m) for m in markers]
    assert 2 <= _max_overlap(intervals) <= 3  # side by side, never more than the devices
    _assert_each_device_held_once(markers)
    loads = (control / "loads").read_text().split()
    assert len(loads) <= 3
    assert sum(m["model_loaded"] for m in markers) <= 3
    assert {m["pid"] for m in markers} == {os.getpid()}  # the local engine: threads of this process
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["state"] == "failed"
    failed = [s for s in manifest["shards"] if s["state"] == "failed"]
    assert len(failed) == 1 and "injected failure" in failed[0]["error"]
    assert not (output / "_SUCCESS").exists()


@pytest.mark.usefixtures("prefect_server")
def test_the_local_engine_starts_the_next_shard_task_while_a_shard_scores(tabular, tmp_path, control):
    """One device: the next shard's task is already running, waiting for the device inside the task, while
    the shard before it scores, so Prefect's start of a task never sits between two shards."""
    (control / "sleep").write_text("0.3")
    output = tmp_path / "out"
    _run_controlled(tabular, str(output), "fake:1", shard_rows=6_000, batch_size=3_000)
    markers = sorted(_markers(output), key=lambda m: m["started_at"])
    assert len(markers) >= 3 and _max_overlap([_interval(m) for m in markers]) == 1
    followed = [
        (before, after)
        for before, after in zip(markers, markers[1:], strict=False)
        if after["waited_seconds"] > 0 and f"shard {before['shard_id']}," in after["waited_for"]
    ]
    assert followed, [(m["shard_id"], m["waited_seconds"], m["waited_for"]) for m in markers]
    assert all(f"pid {after['pid']} " in after["waited_for"] for _, after in followed)  # its own run held it


def _assert_each_device_held_once(markers: list[dict]) -> None:
    for device in {m["device"] for m in markers}:
        own = sorted(_interval(m) for m in markers if m["device"] == device)
        assert all(a[1] <= b[0] for a, b in zip(own, own[1:], strict=False)), f"{device} was held by two shards"


def _cli_run(tabular: dict, output: Path, devices: str, env: dict) -> subprocess.Popen:
    args = ["run", "--input", tabular["input"], "--output", str(output), "--model", MODEL]
    args += ["--features", ",".join(FEATURES), "--devices", devices, "--shard-rows", "5000", "--batch-size", "1000"]
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.usefixtures("prefect_server")
def test_runs_on_one_host_never_share_a_device(tabular, tmp_path, control):
    """Two runs with the same two devices and a third asking for one, at once on one host and server:
    no device is ever held by two shards, never more than two shards run, and a waiting shard says who
    holds its device. No run sets a limit that another run sees."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    (control / "sleep").write_text("0.3")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": python_path()}
    outputs = {"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"}
    procs = [
        _cli_run(tabular, outputs[name], devices, env)
        for name, devices in zip("abc", ["fake:2", "fake:2", "fake:1"], strict=True)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    markers = [m for out in outputs.values() for m in _markers(out)]
    assert len(markers) == 12
    assert _max_overlap([_interval(m) for m in markers]) <= 2
    _assert_each_device_held_once(markers)
    assert {m["device"] for m in _markers(outputs["c"])} == {"fake:0"}
    waited = [m for m in markers if m["waited_for"]]
    assert waited, "with 5 shards wanting 2 devices at the start, some shard must have waited"
    pids, shards = {m["pid"] for m in markers}, {m["shard_id"] for m in markers}
    # A shard may wait for a shard of its own run (all devices held, one by a sibling); each names a real holder,
    # and the runs did wait for one another.
    assert all(any(f"pid {pid} on " in m["waited_for"] for pid in pids) for m in waited), [
        m["waited_for"] for m in waited
    ]
    assert all(any(f"shard {shard}," in m["waited_for"] for shard in shards) for m in waited)
    assert any(f"pid {m['pid']} " not in m["waited_for"] for m in waited)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limits() == []  # no run left a limit for the others


@pytest.mark.usefixtures("prefect_server")
def test_each_device_runs_all_its_torch_work_on_one_thread(tabular, tmp_path, control):
    """Shards reach a device from different Prefect worker threads; loading and scoring still happen on
    the device's own thread (one libgomp thread team per device), a different one for each device."""
    (control / "threads").write_text("")
    _run_controlled(tabular, str(tmp_path / "out"), "fake:2", shard_rows=2_500, batch_size=500)
    calls = (control / "threads").read_text().split()
    assert len(calls) >= 8 * 5  # 8 shards of 5 batches (plus the loads, unless an earlier run loaded the model)
    assert len(set(calls)) == 2  # one thread per device, however many worker threads Prefect used


@pytest.mark.usefixtures("prefect_server")
def test_the_process_pool_engine_gives_the_same_predictions_as_threads(tabular, tmp_path, control):
    """Prefect's ProcessPoolTaskRunner: shards run in worker processes, each loading the model once per device."""
    import polars as pl

    common = dict(input_uri=tabular["input"], model="mlp", checkpoint=tabular["checkpoint"], shard_rows=2_500)
    threads = run_job(output_uri=str(tmp_path / "threads"), devices="fake:2", **common)
    processes = run_job(output_uri=str(tmp_path / "processes"), devices="fake:2", engine="processes", **common)
    assert threads["ok"] and processes["ok"] and processes["shards_run"] == 8

    def predictions(name: str) -> pl.DataFrame:
        return pl.read_parquet(tmp_path / name / "predictions" / "*.parquet").sort("id")

    assert predictions("processes").equals(predictions("threads"))
    markers = _markers(tmp_path / "processes")
    assert os.getpid() not in {m["pid"] for m in markers}  # scored in the pool's worker processes
    loads = [(m["pid"], m["device"]) for m in markers if m["model_loaded"]]
    assert len(loads) == len(set(loads))  # at most one load per worker process and device
    assert {(m["pid"], m["device"]) for m in markers} == set(loads)  # every pair that scored loaded once
    _assert_each_device_held_once(markers)
    # The core's INFO lines from the worker processes reach the run's log, as the local engine's do.
    done = {m["shard_id"] for m in markers}
    assert done <= _core_lines_in_run_logs("batchinfer.runner", done, processes["flow_run_id"])


def _core_lines_in_run_logs(logger: str, shard_ids: set[str], flow_run_id: str) -> set[str]:
    """The shard ids that a `shard ... done on` line of `logger` names in one flow run's logs (shipped in batches).

    Filtered by the run: shard ids come from the inputs and settings, so an earlier run's lines name them too."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterName
    from prefect.client.schemas.sorting import LogSort

    found: set[str] = set()
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline and not shard_ids <= found:
            named = LogFilter(name=LogFilterName(any_=[logger]), flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            logs = client.read_logs(log_filter=named, limit=200, sort=LogSort.TIMESTAMP_DESC)
            found |= {i for log in logs for i in shard_ids if f"shard {i} done on" in log.message}
            time.sleep(0.5)
    return found


_FREEZE = """
import gc
from batchinfer.devices import freeze_imports
from batchinfer.pipeline import run_shard  # torch and the core, as a worker has them by its first shard
assert gc.get_freeze_count() == 0
freeze_imports()
frozen = gc.get_freeze_count()
later = [[] for _ in range(1000)]  # made during the run: must stay in the collector's sight
freeze_imports()
print(frozen, gc.get_freeze_count())
"""


_LAZY_RAY = """
import json, sys, threading
from batchinfer.devices import discover, engine_assigned  # torch with it, as a run has them
from prefect.utilities.importtools import lazy_import
lazy_import("ray")  # as importing prefect-ray does
devices = discover("fake:2")
start, got, errors = threading.Barrier(4), [], []
def shard():
    start.wait()  # the shard threads of a local run ask at once
    try:
        got.append([d.name for d in engine_assigned(devices)])
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=shard) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"errors": errors, "got": got, "ray": type(sys.modules["ray"]).__name__}))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    """`code` run in a fresh interpreter with the project importable; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path()},
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_a_lazily_imported_ray_is_neither_loaded_nor_broken_by_shard_threads():
    done = _python(_LAZY_RAY)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["got"] == [["fake:0", "fake:1"]] * 4  # not on an engine: all devices
    assert result["ray"] == "_LazyModule"  # a run outside Ray does not import it


def test_imports_are_frozen_out_of_the_collector_once_per_process():
    done = _python(_FREEZE)
    frozen, after = map(int, done.stdout.split())
    assert frozen > 50_000  # torch's modules and their objects
    assert after == frozen  # the second call froze nothing of what the run made since


_MALLOC = """
import ctypes, resource
from batchinfer.devices import tune_malloc
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buffer = libc.malloc(1 << 20)  # a batch's worth: above glibc's first mmap threshold (128 KiB)
ctypes.memset(buffer, 1, 1 << 20)
kept = libc.malloc(200_000)  # lives on above it: the freed buffer is not the heap top, which trimming returns
libc.free(buffer)
before = faults()
for _ in range(200):
    buffer = libc.malloc(1 << 20)
    ctypes.memset(buffer, 1, 1 << 20)
    libc.free(buffer)
print(faults() - before)
"""


@pytest.mark.parametrize(
    ("environ", "reused"),
    [
        ({}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "65536"}, True),  # what Dask's nanny gives its workers
        ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, False),  # the user's own choice
    ],
)
def test_batch_buffers_are_reused_whatever_thresholds_the_worker_was_given(environ, reused):
    """A freed 1 MiB buffer is reused by the next one, not mapped and faulted in again (256 pages each)."""
    done = subprocess.run(
        [sys.executable, "-c", _MALLOC],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path(), **environ},
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    faults = int(done.stdout)
    assert (faults < 2_000) if reused else (faults > 200 * 200), faults
