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


def test_flow_on_all_gpus_matches_cpu(tabular, tmp_path):
    gpu = run_job(
        input_uri=tabular["input"],
        output_uri=str(tmp_path / "gpu"),
        model="mlp",
        checkpoint=tabular["checkpoint"],
        devices="auto",
        shard_rows=2_000,
    )
    cpu = run_job(
        input_uri=tabular["input"],
        output_uri=str(tmp_path / "cpu"),
        model="mlp",
        checkpoint=tabular["checkpoint"],
        devices="cpu",
        shard_rows=2_000,
    )
    assert gpu["ok"] and cpu["ok"]
    a = pl.read_parquet(f"{tmp_path / 'gpu'}/predictions/*.parquet").sort("id")
    b = pl.read_parquet(f"{tmp_path / 'cpu'}/predictions/*.parquet").sort("id")
    diff = np.abs(np.stack(a["probabilities"].to_list()) - np.stack(b["probabilities"].to_list())).max()
    assert diff <= 1e-4
    devices = {json.loads(p.read_text())["device"] for p in (tmp_path / "gpu" / "markers").glob("*.json")}
    assert len(devices) == min(torch.cuda.device_count(), 12)  # 12 shards spread over every GPU
    assert all(d.startswith("cuda:") for d in devices)


def test_minilm_on_gpu_matches_cpu(text, tmp_path):
    gpu = run_job(
        input_uri=text["input"],
        output_uri=str(tmp_path / "gpu"),
        model="minilm",
        text_column="text",
        devices="cuda:0",
        batch_size=32,
    )
    cpu = run_job(
        input_uri=text["input"],
        output_uri=str(tmp_path / "cpu"),
        model="minilm",
        text_column="text",
        devices="cpu",
        batch_size=32,
    )
    assert gpu["ok"] and cpu["ok"]
    a = pl.read_parquet(f"{tmp_path / 'gpu'}/predictions/*.parquet").sort("id")
    b = pl.read_parquet(f"{tmp_path / 'cpu'}/predictions/*.parquet").sort("id")
    diff = np.abs(np.stack(a["embedding"].to_list()) - np.stack(b["embedding"].to_list())).max()
    assert diff <= 1e-3
    assert Path(tmp_path / "gpu" / "_SUCCESS").exists()
