"""Every model kind scored through the core equals the same computation done by hand, key by key.

TorchScript and torch.export files, custom `module:factory` models on features
and on text, and the `mlp` checkpoint whose recorded feature names decide which
column feeds which input, whatever the file's column order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from batchinfer.models.mlp import MLP, save_checkpoint
from tests import custom_models
from tests.core_helpers import run_core

FEATURES = [f"x{i}" for i in range(6)]
# 257 rows in row groups of 128: at shard_rows=200 a 256-row shard and a 1-row shard (a batch of one row).
JOB = {"shard_rows": 200, "batch_size": 64}


def frame(rows: int, start: int, seed: int) -> pl.DataFrame:
    x = np.random.default_rng(seed).standard_normal((rows, len(FEATURES)), dtype=np.float32)
    return pl.DataFrame({"id": np.arange(start, start + rows, dtype=np.int64), **dict(zip(FEATURES, x.T, strict=True))})


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for p in range(2):
        frame(257, p * 1_000, seed=p).write_parquet(folder / f"part-{p:05d}.parquet", row_group_size=128)
    return folder


def score(data: Path, output: Path, **kwargs: object) -> pl.DataFrame:
    """Run the job through the core and join its predictions onto the input rows, key by key."""
    _, report = run_core(input_uri=str(data), output_uri=str(output), **{**JOB, **kwargs})
    assert report.ok, report.failures
    got = pl.read_parquet(output / "predictions" / "*.parquet")
    inputs = pl.read_parquet(data / "*.parquet")
    assert got.height == inputs.height == got["id"].n_unique()
    return inputs.join(got, on="id", how="left", validate="1:1").sort("id")


def probabilities(joined: pl.DataFrame) -> np.ndarray:
    return np.stack(joined["probabilities"].to_list()).astype(np.float32)


def logits_module() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def save_exported(module: torch.nn.Module, kind: str, folder: Path) -> Path:
    example = torch.randn(4, len(FEATURES))
    if kind == "script":
        path = folder / "model.pt"
        torch.jit.save(torch.jit.script(module), str(path))
    elif kind == "trace":
        path = folder / "model.torchscript"
        torch.jit.save(torch.jit.trace(module, example), str(path))
    else:
        path = folder / "model.pt2"
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: batch},)), str(path))
    return path


@pytest.mark.parametrize("kind", ["script", "trace", "export"])
def test_exported_model_matches_the_plain_module(kind: str, data: Path, tmp_path: Path) -> None:
    """An exported file scores like the module it came from (softmax of its logits), batches of one row included."""
    module = logits_module()
    path = save_exported(module, kind, tmp_path)
    joined = score(data, tmp_path / "out", model=str(path), features=FEATURES, output_kind="classifier")
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(joined.select(FEATURES).to_numpy())), dim=1).numpy()
    assert np.abs(probabilities(joined) - expected).max() <= 1e-5
    assert (joined["prediction"].to_numpy() == expected.argmax(axis=1)).all()


def test_custom_feature_model_gets_its_named_columns(data: Path, tmp_path: Path) -> None:
    """The factory's feature_names (not in file order) pick the columns; outputs are its probabilities."""
    joined = score(data, tmp_path / "out", model="tests.custom_models:linear")
    x = joined.select(custom_models.FEATURE_NAMES).to_numpy()
    expected = torch.softmax(torch.from_numpy(x) @ custom_models.WEIGHTS + custom_models.BIAS, dim=1).numpy()
    assert np.abs(probabilities(joined) - expected).max() <= 1e-6
    assert (joined["prediction"].to_numpy() == expected.argmax(axis=1)).all()


def test_custom_text_model_embeds_each_row_under_its_key(tmp_path: Path) -> None:
    """Texts of varied length go through in batches and come back in their rows' places."""
    from batchinfer import demo

    data = tmp_path / "text"
    demo.write_text(data, count=90, partitions=2)
    joined = score(data, tmp_path / "out", model="tests.custom_models:characters", text_column="text", batch_size=16)
    assert joined.columns == ["id", "text", "embedding"]
    raw = np.array([[len(t), t.count("a"), t.count(" "), 1.0] for t in joined["text"]], dtype=np.float64)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.abs(np.stack(joined["embedding"].to_list()) - expected).max() <= 1e-6


def test_mlp_matches_features_by_name_not_position(data: Path, tmp_path: Path) -> None:
    """The checkpoint records its feature order; shuffled file columns or --features give the same predictions."""
    torch.manual_seed(3)
    model = MLP([len(FEATURES), 16, 4]).eval()
    recorded = ["x3", "x1", "x5", "x0", "x4", "x2"]
    checkpoint = tmp_path / "mlp.safetensors"
    save_checkpoint(model, str(checkpoint), recorded)

    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for path in sorted(data.glob("*.parquet")):
        pl.read_parquet(path).select("x2", "id", "x4", "x0", "x5", "x1", "x3").write_parquet(
            shuffled / path.name, row_group_size=128
        )

    job = {"model": "mlp", "checkpoint": str(checkpoint)}
    plain = score(data, tmp_path / "plain", **job)
    moved = score(shuffled, tmp_path / "moved", **job)
    listed = score(data, tmp_path / "listed", features=sorted(FEATURES), **job)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(plain.select(recorded).to_numpy())), dim=1).numpy()
    assert np.abs(probabilities(plain) - expected).max() <= 1e-5
    for other in (moved, listed):
        assert other["id"].to_list() == plain["id"].to_list()
        assert np.array_equal(probabilities(other), probabilities(plain))
