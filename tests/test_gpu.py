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
