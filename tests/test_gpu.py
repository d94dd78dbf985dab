"""On CUDA machines: the flow runs on every GPU and agrees with the CPU. Skipped where CUDA is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import run_job

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.usefixtures("prefect_server"),
]


def _gpu_against_cpu(tmp_path: Path, gpu_devices: str, column: str, **job) -> float:
    """Run the same job on `gpu_devices` and on the CPU; both must succeed. The largest difference in `column`."""
    gpu = run_job(output_uri=str(tmp_path / "gpu"), devices=gpu_devices, **job)
    cpu = run_job(output_uri=str(tmp_path / "cpu"), devices="cpu", **job)
    assert gpu["ok"] and cpu["ok"]
    a = pl.read_parquet(f"{tmp_path / 'gpu'}/predictions/*.parquet").sort("id")
    b = pl.read_parquet(f"{tmp_path / 'cpu'}/predictions/*.parquet").sort("id")
    return float(np.abs(np.stack(a[column].to_list()) - np.stack(b[column].to_list())).max())


def test_flow_on_all_gpus_matches_cpu(tabular, tmp_path):
    job = {"input_uri": tabular["input"], "model": "mlp", "checkpoint": tabular["checkpoint"], "shard_rows": 2_000}
    assert _gpu_against_cpu(tmp_path, "auto", "probabilities", **job) <= 1e-4
    devices = {json.loads(p.read_text())["device"] for p in (tmp_path / "gpu" / "markers").glob("*.json")}
    assert len(devices) == min(torch.cuda.device_count(), 12)  # 12 shards spread over every GPU
    assert all(d.startswith("cuda:") for d in devices)


def test_minilm_on_gpu_matches_cpu(text, tmp_path):
    job = {"input_uri": text["input"], "model": "minilm", "text_column": "text", "batch_size": 32}
    assert _gpu_against_cpu(tmp_path, "cuda:0", "embedding", **job) <= 1e-3
    assert Path(tmp_path / "gpu" / "_SUCCESS").exists()


class _GreedyModel:
    """Asks the GPU for `bytes_per_row` of real memory per row, so that large batches fail in the allocator."""

    def __init__(self, bytes_per_row: int) -> None:
        self.bytes_per_row = bytes_per_row
        self.sizes: list[int] = []

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        scratch = torch.empty(batch.shape[0] * self.bytes_per_row, dtype=torch.uint8, device=batch.device)
        del scratch
        return torch.softmax(batch[:, :3].float(), dim=1)


def test_auto_batch_size_halves_on_real_cuda_out_of_memory(monkeypatch):
    from batchinfer import runner
    from batchinfer.devices import Device
    from tests.test_speed_features import _feature_settings, _spec

    monkeypatch.setattr(runner, "_auto_batch", {})
    emptied: list[int] = []  # the allocator already freed what it could; empty_cache would flush every GPU
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    free, _ = torch.cuda.mem_get_info(0)
    per_row = 1 << 28  # 256 MiB a row: the first batch (65,536 rows, 16 TiB) cannot fit on any GPU
    model = _GreedyModel(per_row)
    first = runner.AUTO_START_BATCH_SIZE["features"]
    matrix = np.random.default_rng(0).standard_normal((2 * first, 3)).astype(np.float32)
    out = runner._predict_matrix(
        matrix, _feature_settings(0), _spec("features", "greedy"), model, Device("g", "cuda:0")
    )
    np.testing.assert_allclose(out, torch.softmax(torch.from_numpy(matrix), dim=1).numpy(), atol=1e-6)
    fits = runner._auto_batch[("g", "greedy")]  # remembered for the device
    halvings = first.bit_length() - fits.bit_length()
    assert 0 < halvings and fits * per_row <= free and not emptied
    assert model.sizes[: halvings + 1] == [first >> i for i in range(halvings + 1)]  # real OOM, halved each time
    assert set(model.sizes[halvings:]) == {fits} and len(model.sizes) == halvings + 2 * first // fits


def test_reduced_precisions_on_gpu_stay_close_to_fp32_on_cpu(tabular):
    from batchinfer import demo
    from batchinfer.models import mlp

    x = torch.from_numpy(demo.tabular_frame(4_096, seed=5).select(demo.FEATURE_NAMES).to_numpy())
    with torch.inference_mode():
        reference = mlp.resolve(tabular["checkpoint"], precision="fp32", storage_options={})
        reference = reference.load(torch.device("cpu")).predict(x)
        for precision, limit in {"fp32": 1e-5, "bf16": 0.02, "fp16": 0.005}.items():
            spec = mlp.resolve(tabular["checkpoint"], precision=precision, storage_options={})
            probs = spec.load(torch.device("cuda:0")).predict(x.to("cuda:0")).float().cpu()
            assert torch.isfinite(probs).all(), precision
            assert (probs - reference).abs().mean() < limit, precision
            assert (probs.argmax(1) == reference.argmax(1)).float().mean() > 0.9, precision


class _MakesATensor(torch.nn.Module):
    """Its forward creates a tensor: torch.export records that tensor's device (the CPU, where it exported)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.arange(4, dtype=x.dtype)


def test_exported_program_that_creates_tensors_runs_on_the_gpu(tmp_path):
    from batchinfer.models.base import Wanted
    from batchinfer.models.exported import resolve

    torch.manual_seed(0)
    module = _MakesATensor().eval()
    path = tmp_path / "model.pt2"
    program = torch.export.export(module, (torch.randn(4, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    spec = resolve(
        str(path), precision="fp32", features=["a", "b", "c"], storage_options={}, wanted=Wanted("classifier")
    )
    x = torch.randn(64, 3)
    with torch.inference_mode():
        on_gpu = spec.load(torch.device("cuda:0")).predict(x.to("cuda:0")).cpu()
        on_cpu = spec.load(torch.device("cpu")).predict(x)
        expected = torch.softmax(module(x), dim=1)
    assert torch.allclose(on_gpu, expected, atol=1e-5) and torch.allclose(on_cpu, expected, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_halves_the_models_gpu_memory(precision):
    """The weights are cast with the model (`model.to(dtype)`), not autocast over fp32 weights."""
    from batchinfer.models import minilm

    def loaded(which: str) -> int:
        torch.cuda.synchronize(0)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(0)
        predictor = minilm.resolve(precision=which).load(torch.device("cuda:0"))
        used = torch.cuda.memory_allocated(0) - before
        assert {p.dtype for p in predictor.model.parameters()} == {
            torch.float32 if which == "fp32" else {"bf16": torch.bfloat16, "fp16": torch.float16}[which]
        }
        del predictor
        return used

    assert loaded(precision) <= 0.55 * loaded("fp32")


# -- ready for real GPUs: placement, the overlapped path, out-of-memory in TorchScript, bf16, broken devices ----


def _two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")


def test_a_model_that_calls_cuda_without_an_index_lands_on_the_shards_device(tabular, tmp_path):
    """Each device thread makes its device current: `.cuda()` in a factory model means cuda:1 there."""
    _two_gpus()
    job = {"input_uri": tabular["input"], "model": "tests.test_gpu:bare_cuda", "features": _FEATURES}
    assert _gpu_against_cpu(tmp_path, "cuda:1", "probabilities", shard_rows=5_000, **job) <= 1e-5
    devices = {json.loads(p.read_text())["device"] for p in (tmp_path / "gpu" / "markers").glob("*.json")}
    assert devices == {"cuda:1"}


def test_an_output_left_on_cuda_0_is_refused_on_cuda_1(tabular, tmp_path):
    _two_gpus()
    job = {"input_uri": tabular["input"], "model": "tests.test_gpu:always_cuda_0", "features": _FEATURES}
    with pytest.raises(Exception, match=r"the model returned its output on cuda:0, but the shard runs on cuda:1"):
        run_job(output_uri=str(tmp_path / "out"), devices="cuda:1", shard_rows=5_000, **job)


_FEATURES = ["f00", "f01", "f02", "f03"]


class _Linear:
    input_kind = "features"
    output_kind = "classifier"
    feature_names = _FEATURES

    def load(self, device: torch.device) -> _Linear:
        self.weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        self.weight = self.weight.cuda() if device.type == "cuda" else self.weight  # no index: the current device
        return self

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(batch @ self.weight, dim=1)


class _AlwaysCuda0(_Linear):
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(batch.to("cuda:0") @ self.weight.to("cuda:0"), dim=1)


def bare_cuda() -> _Linear:
    return _Linear()


def always_cuda_0() -> _AlwaysCuda0:
    return _AlwaysCuda0()


def test_multi_chunk_shards_on_the_gpu_match_the_cpu(tabular, text, tmp_path, monkeypatch):
    """Small chunks, so that every shard runs the overlapped path: pinned matrices built ahead, one copy per
    chunk, a chunk finished while the next one runs; NaN rows take the path that compacts the matrix."""
    from batchinfer import runner

    monkeypatch.setattr(runner, "CHUNK_ROWS_FEATURES", 1_000)
    monkeypatch.setattr(runner, "CHUNK_ROWS_TEXT", 16)
    job = {"input_uri": tabular["input"], "model": "mlp", "checkpoint": tabular["checkpoint"], "shard_rows": 5_000}
    assert _gpu_against_cpu(tmp_path / "mlp", "cuda:0", "probabilities", batch_size=300, **job) <= 1e-4
    job = {"input_uri": text["input"], "model": "minilm", "text_column": "text", "batch_size": 8}
    assert _gpu_against_cpu(tmp_path / "text", "cuda:0", "embedding", **job) <= 1e-3
    with_nan = tmp_path / "nan"
    with_nan.mkdir()
    frame = pl.read_parquet(f"{tabular['input']}/*.parquet").head(3_000)
    frame = frame.with_columns(pl.when(pl.col("id") % 97 == 0).then(float("nan")).otherwise(pl.col("f03")).alias("f03"))
    frame.write_parquet(with_nan / "part-00000.parquet", row_group_size=500)
    job = {"input_uri": str(with_nan), "model": "mlp", "checkpoint": tabular["checkpoint"], "max_error_ratio": 0.05}
    assert _gpu_against_cpu(tmp_path / "nan-run", "cuda:0", "probabilities", **job) <= 1e-4


class _GreedyScript(torch.nn.Module):
    """Allocates 256 MiB of real GPU memory per row: TorchScript re-raises the allocator's error as its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.empty([x.size(0) * 268435456], dtype=torch.uint8, device=x.device)
        return x[:, :3] + scratch[:1].float() * 0.0


def test_torchscript_out_of_memory_on_cuda_halves_without_emptying_the_cache(tmp_path, monkeypatch):
    from batchinfer import runner
    from batchinfer.devices import Device
    from batchinfer.models.base import Wanted
    from batchinfer.models.exported import resolve
    from tests.test_speed_features import _feature_settings

    path = tmp_path / "greedy.pt"
    torch.jit.save(torch.jit.script(_GreedyScript()), str(path))
    spec = resolve(
        str(path), precision="fp32", features=["a", "b", "c"], storage_options={}, wanted=Wanted("classifier")
    )
    spec.accepts(3)
    monkeypatch.setattr(runner, "_auto_batch", {})
    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    predictor = spec.load(torch.device("cuda:0"))
    matrix = np.random.default_rng(0).standard_normal((4_096, 3)).astype(np.float32)
    out = runner._predict_matrix(matrix, _feature_settings(0), spec, predictor, Device("g", "cuda:0"))
    np.testing.assert_allclose(out, torch.softmax(torch.from_numpy(matrix), dim=1).numpy(), atol=1e-6)
    fits = runner._auto_batch[("g", spec.fingerprint)]
    assert fits < runner.AUTO_START_BATCH_SIZE["features"] and not emptied


def test_bf16_minilm_on_the_gpu_stays_close_to_fp32_on_the_cpu(text, tmp_path):
    job = {"input_uri": text["input"], "model": "minilm", "text_column": "text"}
    gpu = run_job(output_uri=str(tmp_path / "gpu"), devices="cuda:0", precision="bf16", **job)
    cpu = run_job(output_uri=str(tmp_path / "cpu"), devices="cpu", **job)
    assert gpu["ok"] and cpu["ok"]
    a = pl.read_parquet(f"{tmp_path / 'gpu'}/predictions/*.parquet").sort("id")
    b = pl.read_parquet(f"{tmp_path / 'cpu'}/predictions/*.parquet").sort("id")
    cosine = (np.stack(a["embedding"].to_list()) * np.stack(b["embedding"].to_list())).sum(axis=1)
    assert cosine.min() > 0.999


class _MakesATensorOnItsDevice(_MakesATensor):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.arange(4, dtype=x.dtype, device=x.device)


def test_an_exported_program_made_on_the_gpu_runs_on_the_cpu(tmp_path):
    """move_to_device_pass on every device: the tensor its graph creates was recorded on cuda:0."""
    from batchinfer.models.base import Wanted
    from batchinfer.models.exported import resolve

    torch.manual_seed(0)
    module = _MakesATensorOnItsDevice().eval().to("cuda:0")
    path = tmp_path / "model.pt2"
    example = (torch.randn(4, 3, device="cuda:0"),)
    program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    x = torch.randn(64, 3)
    spec = resolve(
        str(path), precision="fp32", features=["a", "b", "c"], storage_options={}, wanted=Wanted("classifier")
    )
    with torch.inference_mode():
        on_cpu = spec.load(torch.device("cpu")).predict(x)
        expected = torch.softmax(module(x.to("cuda:0")), dim=1).cpu()
    assert torch.allclose(on_cpu, expected, atol=1e-5)


DEVICE_SIDE_ASSERT = """
import torch


class Asserts:
    input_kind = "features"
    output_kind = "classifier"
    feature_names = ["f00", "f01", "f02", "f03"]

    def load(self, device):
        self.device = device
        return self

    def predict(self, batch):
        index = torch.full((batch.shape[0],), 10**9, device=batch.device)
        bad = torch.zeros(3, device=batch.device)[index]  # out of bounds: a device-side assert
        return torch.softmax(batch[:, :3], dim=1) + bad[:, None]


def factory():
    return Asserts()
"""


def test_a_device_side_assert_takes_the_gpu_out_of_the_pool_with_one_line(tabular, tmp_path):
    """A real sticky CUDA error, in a process of its own (it breaks that process's CUDA context): the only
    device leaves the pool, the run fails with one line that says why, and no shard is committed."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from tests.conftest import ROOT, python_path

    (tmp_path / "asserting_model.py").write_text(DEVICE_SIDE_ASSERT)
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), python_path()]),
    }
    args = ["run", "--input", tabular["input"], "--output", str(tmp_path / "out"), "--devices", "cuda:0"]
    args += ["--model", "asserting_model:factory", "--shard-rows", "5000"]
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    # (torch may add its own lines about the broken context as the process ends)
    lines = [line for line in done.stderr.splitlines() if line.startswith("batchinfer: ")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("batchinfer: run failed: ") and "left the pool" in lines[0], lines[0]
    assert "device-side assert" in lines[0] or "CUDA error" in lines[0], lines[0]
    assert not list((tmp_path / "out" / "markers").glob("*.json"))


def test_an_onnx_model_on_a_gpu_shard_gives_its_outputs_on_that_device(tmp_path):
    """With or without onnxruntime's CUDA provider, a shard on cuda:0 gets the ONNX model's outputs there."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tests.test_onnx import FEATURES, export

    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(0).standard_normal((300, len(FEATURES)), dtype=np.float32)
    pl.DataFrame({"id": np.arange(300), **dict(zip(FEATURES, x.T, strict=True))}).write_parquet(data / "p.parquet")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    path = export(module, tmp_path / "cls.onnx", {"features": (2, 6)}, ["logits"], output_kind="classifier")
    job = {"input_uri": str(data), "model": str(path), "features": FEATURES}
    assert _gpu_against_cpu(tmp_path, "cuda:0", "probabilities", **job) <= 1e-5


def test_the_process_pool_on_the_gpus_matches_the_cpu(tabular, tmp_path):
    """The `processes` engine on real GPUs: worker processes, each loading the model once per GPU it uses."""
    job = {"input_uri": tabular["input"], "model": "mlp", "checkpoint": tabular["checkpoint"], "shard_rows": 2_000}
    assert _gpu_against_cpu(tmp_path, "auto", "probabilities", engine="processes", **job) <= 1e-4
    markers = [json.loads(p.read_text()) for p in (tmp_path / "gpu" / "markers").glob("*.json")]
    assert all(m["device"].startswith("cuda:") for m in markers)
    assert os.getpid() not in {m["pid"] for m in markers}
    loads = [(m["pid"], m["device"]) for m in markers if m["model_loaded"]]
    assert len(loads) == len(set(loads)) and {(m["pid"], m["device"]) for m in markers} == set(loads)


def test_two_runs_on_one_host_never_share_a_gpu(tabular, tmp_path, control):
    """Two runs at once, one seeing every GPU and one with CUDA_VISIBLE_DEVICES=0: the lock is the GPU's own
    (its UUID), so physical GPU 0 is never held by two shards."""
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import python_path
    from tests.test_devices import _assert_each_device_held_once, _cli_run, _markers

    (control / "sleep").write_text("0.2")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": python_path()}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    procs = [
        _cli_run(tabular, tmp_path / "all", "auto", env),
        _cli_run(tabular, tmp_path / "first", "auto", {**env, "CUDA_VISIBLE_DEVICES": "0"}),
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    on_gpu0 = [m for m in _markers(tmp_path / "all") if m["device"] == "cuda:0"] + _markers(tmp_path / "first")
    assert {m["device"] for m in on_gpu0} == {"cuda:0"} and len(_markers(tmp_path / "first")) == 4
    _assert_each_device_held_once(on_gpu0)
