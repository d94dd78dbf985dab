"""Each output kind: its columns, what merge-and-validate forbids for it, and where the kind comes from.

Kinds come from the model (checkpoint metadata, the factory, an exported file's metadata); `--output-kind`
may say it where the model does not, and is refused where it contradicts the model. Validation refuses,
naming the shard, the check and the key: a NaN regression output, a multilabel probability of 1.2, an
embedding that its model declares normalised but is not, a classifier row that does not sum to 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchinfer.config import OUTPUT_COLUMNS
from batchinfer.errors import ModelError, ShardFailedError
from batchinfer.layout import Layout
from batchinfer.merge import merge_and_validate
from batchinfer.models import exported, mlp
from batchinfer.models.base import Wanted, resolve_model
from batchinfer.pipeline import run_shard
from tests.core_helpers import prepare_started, run_core, score_pending, write_features
from tests.kind_models import BAD_KEY
from tests.test_bad_input import refused
from tests.test_validation import assert_refused

ROWS = 400


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Two partitions of 400 rows (x0 = the key, x1 = sin(key / 7)) in row groups of 100."""
    for p in range(2):
        write_features(tmp_path / "data" / f"part-{p:05d}.parquet", np.arange(p * ROWS, (p + 1) * ROWS), 100)
    return tmp_path / "data"


def job(data: Path, output: Path, model: str, **more: object) -> dict:
    return {"input_uri": str(data), "output_uri": str(output), "model": model, "shard_rows": 200, **more}


def merged(output: Path) -> pl.DataFrame:
    return pl.read_parquet(output / "predictions" / "*.parquet").sort("id")


def x1(frame: pl.DataFrame) -> np.ndarray:
    return np.sin(frame["id"].to_numpy() / 7.0).astype(np.float32)


def stack(frame: pl.DataFrame, column: str) -> np.ndarray:
    return np.stack(frame[column].to_list())


# -- the columns of each kind ----------------------------------------------------------------------------------


def test_regression_with_one_output_is_a_float64_prediction(data: Path, tmp_path: Path) -> None:
    _, report = run_core(**job(data, tmp_path / "out", "tests.kind_models:regression"))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    assert got.schema == {"id": pl.Int64, "prediction": pl.Float64}
    assert np.allclose(got["prediction"].to_numpy(), 3.0 * x1(got) + 1.0, atol=1e-6)


def test_multilabel_lists_the_labels_over_the_threshold(data: Path, tmp_path: Path) -> None:
    _, report = run_core(**job(data, tmp_path / "out", "tests.kind_models:multilabel", threshold=0.6))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    assert got.columns == ["id", "probabilities", "labels"]
    s = x1(got)
    expected = 1 / (1 + np.exp(-np.stack([s, -s, 0.5 * s + 0.1], axis=1)))
    assert np.allclose(stack(got, "probabilities"), expected, atol=1e-6)
    names = ("red", "green", "blue")
    assert got["labels"].to_list() == [[names[j] for j in range(3) if row[j] > 0.6] for row in expected]


def test_classifier_with_labels_names_each_prediction(data: Path, tmp_path: Path) -> None:
    _, report = run_core(**job(data, tmp_path / "out", "tests.kind_models:classifier"))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    assert got.columns == ["id", "prediction", "probabilities", "label"]
    assert got["label"].to_list() == [("low", "mid", "high")[i] for i in got["prediction"]]
    assert set(got["label"]) == {"low", "mid", "high"}


def test_raw_outputs_are_written_as_they_are(data: Path, tmp_path: Path) -> None:
    _, report = run_core(**job(data, tmp_path / "out", "tests.kind_models:raw"))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    s = x1(got)
    assert got.columns == ["id", "output"]
    assert np.allclose(stack(got, "output"), np.stack([s, -s, 0.5 * s + 0.1], axis=1), atol=1e-6)


def test_an_embedding_not_declared_normalised_is_not_checked_for_unit_norm(data: Path, tmp_path: Path) -> None:
    _, report = run_core(**job(data, tmp_path / "out", "tests.kind_models:not_unit_norm_undeclared"))
    assert report.ok, report.failures
    norms = np.linalg.norm(stack(merged(tmp_path / "out").filter(pl.col("id") == BAD_KEY), "embedding"), axis=1)
    assert np.allclose(norms, 2.0)


def test_passthrough_may_not_take_an_output_columns_name(data: Path, tmp_path: Path, capsys) -> None:
    assert "label" in OUTPUT_COLUMNS and "output" in OUTPUT_COLUMNS
    line = refused(capsys, "plan", "--input", str(data), "--model", "tests.kind_models:raw", "--passthrough", "label")
    assert line.startswith("--passthrough: 'label' is the name of an output column")


# -- what validation refuses, per kind ---------------------------------------------------------------------------


def bad_shard(plan) -> str:
    return next(
        s.shard_id for s in plan.shards if s.partition_index == 0 and s.row_start <= BAD_KEY < s.row_start + s.num_rows
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("multilabel_above_1", f"probabilities check failed: key {BAD_KEY} has 1.200000 at 0, outside [0, 1]"),
        ("not_unit_norm", f"unit norm check failed: key {BAD_KEY} has norm 2.000000"),
        ("not_summing_to_1", f"probabilities check failed: key {BAD_KEY} sums to 0.500000"),
    ],
    ids=["multilabel-1.2", "embedding-not-unit-norm", "classifier-sum-not-1"],
)
def test_validation_refuses_what_the_kind_forbids(data: Path, tmp_path: Path, model: str, expected: str) -> None:
    """A kind's checks run as each shard is committed: a shard that fails them commits nothing."""
    output = tmp_path / "out"
    plan = prepare_started(**job(data, output, f"tests.kind_models:{model}"))
    victim = next(s for s in plan.shards if s.shard_id == bad_shard(plan))
    with pytest.raises(ShardFailedError) as failure:
        run_shard(plan.config, plan.settings, victim)
    assert str(failure.value) == f"{victim.partition_uri}: {expected}"
    layout = Layout(str(output))
    assert not Path(layout.marker(victim.shard_id)).exists() and not Path(layout.shard(victim.shard_id)).exists()


def test_a_nan_regression_output_fails_its_shard(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    plan = prepare_started(**job(data, output, "tests.kind_models:nan_regression"))
    victim = next(s for s in plan.shards if s.shard_id == bad_shard(plan))
    with pytest.raises(ShardFailedError, match=rf"shard {victim.shard_id}: .*NaN.*first key {BAD_KEY}"):
        run_shard(plan.config, plan.settings, victim)
    assert not Path(Layout(str(output)).marker(victim.shard_id)).exists()


def _set(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def nan_prediction(table: pa.Table) -> pa.Table:
    values = table.column("prediction").to_numpy().copy()
    values[5] = np.nan
    return _set(table, "prediction", pa.array(values))


def wrong_label(table: pa.Table) -> pa.Table:
    labels = table.column("label").to_pylist()
    labels[5] = "nonsense"
    return _set(table, "label", pa.array(labels, pa.string()))


def labels_not_over_threshold(table: pa.Table) -> pa.Table:
    labels = table.column("labels").to_pylist()
    labels[5] = ["red", "green", "blue"]
    return _set(table, "labels", pa.array(labels, pa.list_(pa.string())))


@pytest.mark.parametrize(
    ("model", "change", "expected"),
    [
        ("regression", nan_prediction, "finite check failed: key {key!r} has NaN/inf"),
        ("classifier", wrong_label, "label check failed: key {key!r} is labelled 'nonsense'"),
        ("multilabel", labels_not_over_threshold, "labels check failed: key {key!r} lists ['red', 'green', 'blue']"),
    ],
    ids=["regression-nan", "classifier-label", "multilabel-labels"],
)
def test_a_tampered_shard_fails_its_kinds_check(
    data: Path, tmp_path: Path, model: str, change: Callable[[pa.Table], pa.Table], expected: str
) -> None:
    output = tmp_path / "out"
    plan = prepare_started(**job(data, output, f"tests.kind_models:{model}"))
    score_pending(plan)
    victim = plan.shards[2].shard_id
    path = Path(Layout(str(output)).shard(victim))
    table = pq.read_table(path)
    pq.write_table(change(table), path)
    assert_refused(output, merge_and_validate(plan), victim, expected.format(key=table.column("id")[5].as_py()))


# -- where the kind comes from ----------------------------------------------------------------------------------


def test_mlp_checkpoint_metadata_declares_kind_and_labels(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = mlp.MLP([2, 8, 3]).eval()
    checkpoint = tmp_path / "tags.safetensors"
    mlp.save_checkpoint(model, str(checkpoint), ["x0", "x1"], output_kind="multilabel", labels=["a", "b", "c"])
    _, report = run_core(**job(data, tmp_path / "out", "mlp", checkpoint=str(checkpoint)))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    x = torch.from_numpy(np.stack([got["id"].to_numpy().astype(np.float32), x1(got)], axis=1))
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()
    assert np.abs(stack(got, "probabilities") - expected).max() <= 1e-5
    assert got["labels"].to_list() == [[n for n, p in zip("abc", row, strict=True) if p > 0.5] for row in expected]


def test_labels_given_by_the_flag_name_a_checkpoints_predictions(data: Path, tmp_path: Path) -> None:
    """A checkpoint with no label names: --labels gives them, in the order of the model's outputs."""
    torch.manual_seed(3)
    model = mlp.MLP([2, 8, 3]).eval()
    checkpoint = tmp_path / "plain.safetensors"
    mlp.save_checkpoint(model, str(checkpoint), ["x0", "x1"])
    _, report = run_core(**job(data, tmp_path / "out", "mlp", checkpoint=str(checkpoint), labels="cat,dog,eel"))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    assert got.columns == ["id", "prediction", "probabilities", "label"]
    x = torch.from_numpy(np.stack([got["id"].to_numpy().astype(np.float32), x1(got)], axis=1))
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1).numpy().argmax(axis=1)
    assert got["prediction"].to_list() == expected.tolist()
    assert got["label"].to_list() == [("cat", "dog", "eel")[i] for i in expected]


def _checkpoint(tmp_path: Path, **metadata: object) -> Path:
    path = tmp_path / "model.safetensors"
    mlp.save_checkpoint(mlp.MLP([2, 4, 3]), str(path), ["x0", "x1"], **metadata)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("metadata", "flags", "expected"),
    [
        (
            {"output_kind": "multilabel"},
            ("--output-kind", "classifier"),
            "--output-kind classifier contradicts checkpoint {ckpt}: its metadata declares multilabel",
        ),
        ({}, ("--labels", "a,b"), "--labels names 2 labels but checkpoint {ckpt} gives 3 outputs per row"),
        (
            {"output_kind": "regression"},
            ("--labels", "a,b,c"),
            "--labels applies to classifier and multilabel outputs, not to checkpoint {ckpt}'s regression outputs",
        ),
        ({}, ("--labels", "a,b,a"), "--labels: 'a' is listed twice (got 'a,b,a')"),
    ],
    ids=["contradiction", "label-count", "labels-on-regression", "repeated-label"],
)
def test_kind_and_labels_that_do_not_fit_the_model_are_refused(
    data: Path, tmp_path: Path, capsys, metadata: dict, flags: tuple[str, ...], expected: str
) -> None:
    ckpt = _checkpoint(tmp_path, **metadata)
    line = refused(capsys, "plan", "--input", str(data), "--model", "mlp", "--checkpoint", str(ckpt), *flags)
    assert line == expected.format(ckpt=ckpt)


def test_raw_may_be_asked_of_any_model(data: Path, tmp_path: Path) -> None:
    """raw: the model's outputs as they are (an MLP's logits), whatever kind it declares."""
    torch.manual_seed(2)
    model = mlp.MLP([2, 4, 3]).eval()
    checkpoint = tmp_path / "model.safetensors"
    mlp.save_checkpoint(model, str(checkpoint), ["x0", "x1"], output_kind="classifier")
    _, report = run_core(**job(data, tmp_path / "out", "mlp", checkpoint=str(checkpoint), output_kind="raw"))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    x = torch.from_numpy(np.stack([got["id"].to_numpy().astype(np.float32), x1(got)], axis=1))
    with torch.no_grad():
        assert np.abs(stack(got, "output") - model(x).numpy()).max() <= 1e-4


def _scripted(tmp_path: Path, **metadata: object) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    module = torch.nn.Linear(2, 2).eval()
    path = tmp_path / "model.pt"
    extra = exported.save_metadata(**metadata) if metadata else {}  # type: ignore[arg-type]
    torch.jit.save(torch.jit.script(module), str(path), _extra_files=extra)
    return path, module


def test_exported_file_declares_its_kind_and_is_not_forced_through_softmax(data: Path, tmp_path: Path) -> None:
    path, module = _scripted(tmp_path, output_kind="regression")
    _, report = run_core(**job(data, tmp_path / "out", str(path), features=["x0", "x1"]))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    x = torch.from_numpy(np.stack([got["id"].to_numpy().astype(np.float32), x1(got)], axis=1))
    with torch.no_grad():
        assert np.abs(stack(got, "predictions") - module(x).numpy()).max() <= 1e-4


def test_exported_file_without_a_declared_kind_needs_output_kind(data: Path, tmp_path: Path, capsys) -> None:
    path, _ = _scripted(tmp_path)
    out = str(tmp_path / "out")  # `run`: its checks run before Prefect starts (`plan` runs no model)
    line = refused(capsys, "run", "--input", str(data), "--output", out, "--model", str(path), "--features", "x0,x1")
    assert line == (
        f"{path} does not declare what its outputs are: give --output-kind "
        "(classifier, multilabel, regression, embedding, raw)"
    )


# -- real half precision --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_casts_the_weights(tmp_path: Path, precision: str) -> None:
    """bf16/fp16 weights on the device (half the memory), not autocast over fp32 weights; outputs stay close."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ckpt = _checkpoint(tmp_path)
    x = torch.randn(64, 2)
    reference = mlp.resolve(str(ckpt), precision="fp32", storage_options={}).load(torch.device("cpu"))
    predictor = mlp.resolve(str(ckpt), precision=precision, storage_options={}).load(torch.device("cpu"))
    assert {p.dtype for p in predictor.model.parameters()} == {dtype}
    with torch.inference_mode():
        assert (predictor.predict(x) - reference.predict(x)).abs().max() < 0.02
    spec = resolve_model(
        "minilm", checkpoint=None, precision=precision, features=None, text_column="text", storage_options={}
    )
    encoder = spec.load(torch.device("cpu"))
    assert {p.dtype for p in encoder.model.parameters()} == {dtype}
    with torch.inference_mode():
        out = encoder.predict(["a short sentence", "another one, somewhat longer than the first"])
    assert out.dtype == torch.float32 and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-3)


def test_minilm_declares_normalised_embeddings_and_refuses_other_kinds() -> None:
    spec = resolve_model(
        "minilm", checkpoint=None, precision="fp32", features=None, text_column="text", storage_options={}
    )
    assert (spec.output.kind, spec.output.normalized, spec.output.width) == ("embedding", True, 384)
    with pytest.raises(ModelError, match="--output-kind classifier contradicts --model minilm"):
        from batchinfer.models import minilm

        minilm.resolve(precision="fp32", wanted=Wanted("classifier"))


def test_the_output_spec_is_recorded_and_part_of_the_fingerprint(data: Path, tmp_path: Path) -> None:
    a = prepare_started(**job(data, tmp_path / "a", "tests.kind_models:multilabel", threshold=0.5))
    b = prepare_started(**job(data, tmp_path / "b", "tests.kind_models:multilabel", threshold=0.7))
    assert a.settings.model_fingerprint != b.settings.model_fingerprint
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["output"] == {
        "kind": "multilabel",
        "labels": ["red", "green", "blue"],
        "threshold": 0.7,
        "normalized": False,
        "width": None,
    }


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    """A raw pickle starts with 0x80; so does a safetensors file whose header is 128 bytes long modulo 256."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in mlp.MLP([2, 4, 3]).state_dict().items()}
    path = tmp_path / "model.safetensors"
    for pad in range(256):
        save_file(state, str(path), metadata={"feature_names": '["x0", "x1"]', "note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert mlp.resolve(str(path), precision="fp32", storage_options={}).feature_names == ("x0", "x1")


def test_a_chunk_of_failed_rows_does_not_change_a_regressions_columns(tmp_path: Path, monkeypatch) -> None:
    """A regression that does not declare its width shows it in its values; a chunk whose rows all failed has
    none, and must not make the shard's file start with the other column (`predictions`)."""
    import batchinfer.runner as runner

    monkeypatch.setattr(runner, "CHUNK_ROWS_FEATURES", 100)
    table = pa.table({"id": np.arange(300), "x0": np.arange(300, dtype=np.float32), "x1": np.ones(300, np.float32)})
    x1 = table.column("x1").to_numpy().copy()
    x1[:100] = np.nan  # the first chunk, whole
    (tmp_path / "in").mkdir()
    pq.write_table(table.set_column(2, "x1", pa.array(x1)), tmp_path / "in" / "part-0.parquet", row_group_size=100)
    _, report = run_core(**job(tmp_path / "in", tmp_path / "out", "tests.kind_models:regression", max_error_ratio=0.5))
    assert report.ok, report.failures
    got = merged(tmp_path / "out")
    assert got.schema == {"id": pl.Int64, "prediction": pl.Float64} and got.height == 200
    assert np.allclose(got["prediction"].to_numpy(), 4.0)
