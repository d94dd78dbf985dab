"""ONNX files through the real flow equal onnxruntime run directly on the same rows, key by key.

Inputs and outputs are matched by name; the kind comes from the file's metadata or `--output-kind`; an
input that names no column is refused before any work, in one line naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import run_job
from tests.test_bad_input import refused

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FEATURES = [f"x{i}" for i in range(6)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for p in range(2):
        x = np.random.default_rng(p).standard_normal((150, len(FEATURES)), dtype=np.float32)
        frame = pl.DataFrame({"id": np.arange(p * 1000, p * 1000 + 150), **dict(zip(FEATURES, x.T, strict=True))})
        frame.write_parquet(folder / f"part-{p:05d}.parquet", row_group_size=50)
    return folder


def export(module: torch.nn.Module, path: Path, inputs: dict[str, tuple[int, ...]], outputs: list[str], **meta: str):
    """`torch.onnx.export` with a dynamic batch axis, then `metadata_props` set with onnx."""
    example = tuple(torch.randn(*shape) for shape in inputs.values())
    axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
    with warnings.catch_warnings():  # the TorchScript exporter needs only onnx (torch.export's, onnxscript too)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, example, str(path), input_names=list(inputs), output_names=outputs, dynamic_axes=axes, dynamo=False
        )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


def run_directly(path: Path, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


def merged(data: Path, output: Path) -> pl.DataFrame:
    got = pl.read_parquet(output / "predictions" / "*.parquet")
    inputs = pl.read_parquet(data / "*.parquet")
    assert got.height == inputs.height == got["id"].n_unique()
    return inputs.join(got, on="id", how="left", validate="1:1").sort("id")


@pytest.mark.usefixtures("prefect_server")
def test_classifier_from_its_metadata_matches_onnxruntime(data: Path, tmp_path: Path) -> None:
    """One input `features` takes --features; the logits come back as probabilities, with the labels."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    path = export(
        module,
        tmp_path / "cls.onnx",
        {"features": (2, 6)},
        ["logits"],
        output_kind="classifier",
        labels='["a","b","c"]',
    )
    report = run_job(input_uri=str(data), output_uri=str(tmp_path / "out"), model=str(path), features=FEATURES)
    assert report["ok"]
    joined = merged(data, tmp_path / "out")
    logits = run_directly(path, {"features": joined.select(FEATURES).to_numpy().astype(np.float32)}, "logits")
    expected = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    assert np.abs(np.stack(joined["probabilities"].to_list()) - expected).max() <= 1e-6
    assert joined["label"].to_list() == [("a", "b", "c")[i] for i in expected.argmax(axis=1)]


class TwoInputs(torch.nn.Module):
    """Inputs `x3` and `x1`, each [batch]; outputs `hidden` and `predictions`."""

    def forward(self, x3: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.stack([x3 * x1, x3 - x1], dim=1)
        return hidden, 2.0 * hidden + 1.0


@pytest.mark.usefixtures("prefect_server")
def test_inputs_and_outputs_are_matched_by_name(data: Path, tmp_path: Path) -> None:
    """No --features: each input takes the column of its name; of two outputs, `predictions` is the regression's."""
    path = export(TwoInputs(), tmp_path / "two.onnx", {"x3": (2,), "x1": (2,)}, ["hidden", "predictions"])
    report = run_job(input_uri=str(data), output_uri=str(tmp_path / "out"), model=str(path), output_kind="regression")
    assert report["ok"]
    joined = merged(data, tmp_path / "out")
    feeds = {name: joined[name].to_numpy().astype(np.float32) for name in ("x3", "x1")}
    expected = run_directly(path, feeds, "predictions")
    assert np.abs(np.stack(joined["predictions"].to_list()) - expected).max() <= 1e-6


def run_args(data: Path, tmp_path: Path, model: Path, *extra: str) -> list[str]:
    """`batchinfer run` of an ONNX file: its checks run before Prefect starts (`plan` runs no model)."""
    return ["run", "--input", str(data), "--output", str(tmp_path / "out"), "--model", str(model), *extra]


def test_an_input_that_matches_no_column_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    path = export(TwoInputs(), tmp_path / "two.onnx", {"x3": (2,), "age": (2,)}, ["hidden", "predictions"])
    line = refused(capsys, *run_args(data, tmp_path, path, "--output-kind", "regression"))
    assert line == (
        f"{path}: input 'age' matches no column of {data}/part-00000.parquet "
        "(give --features, or name the inputs after the columns)"
    )


def test_an_output_for_the_kind_must_be_found_by_name(data: Path, tmp_path: Path, capsys) -> None:
    path = export(TwoInputs(), tmp_path / "two.onnx", {"x3": (2,), "x1": (2,)}, ["hidden", "scores"])
    line = refused(capsys, *run_args(data, tmp_path, path, "--output-kind", "embedding"))
    assert line == f"{path} has outputs hidden, scores; for embedding outputs one must be named embedding or " + (
        "embeddings or sentence_embedding"
    )


def test_half_precision_is_refused_for_onnx(data: Path, tmp_path: Path, capsys) -> None:
    path = export(TwoInputs(), tmp_path / "two.onnx", {"x3": (2,), "x1": (2,)}, ["hidden", "predictions"])
    line = refused(capsys, *run_args(data, tmp_path, path, "--output-kind", "regression", "--precision", "bf16"))
    assert line == f"--precision bf16 does not apply to {path}: an ONNX file runs in the types it holds"
