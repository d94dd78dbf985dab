"""On CUDA machines: the flow runs on every GPU and agrees with the CPU. Skipped where CUDA is absent."""

from __future__ import annotations

import json
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
    assert 0 < halvings and fits * per_row <= free
    assert model.sizes[: halvings + 1] == [first >> i for i in range(halvings + 1)]  # real OOM, halved each time
    assert set(model.sizes[halvings:]) == {fits} and len(model.sizes) == halvings + 2 * first // fits
    torch.cuda.empty_cache()


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
