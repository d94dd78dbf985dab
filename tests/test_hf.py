"""Hugging Face model directories (`hf:PATH`) through the real flow equal transformers run directly, key by key.

Tiny BERTs made here (2 layers, hidden size 32, random weights, `save_pretrained` with the MiniLM package's
tokenizer files, 64 positions so that long texts must be truncated); sentence-transformers directories built
from the shipped all-MiniLM-L6-v2 package against `SentenceTransformer.encode`; and the directories that are
refused, each with one line naming the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from batchinfer import demo
from tests import hf_models
from tests.conftest import run_job
from tests.core_helpers import run_core
from tests.test_bad_input import refused

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """90 sentences of 2 to ~150 words (many longer than the tiny models' 64 positions) in 2 partitions."""
    folder = tmp_path_factory.mktemp("texts") / "data"
    demo.write_text(folder, count=90, partitions=2)
    return folder


def scored(data: Path, output: Path, model: str, errors: int = 0, **job: object) -> pl.DataFrame:
    """The flow's merged predictions joined onto the input rows, by key."""
    report = run_job(input_uri=str(data), output_uri=str(output), model=model, batch_size=16, **job)
    assert report["ok"] and (output / "_SUCCESS").exists()
    got = pl.read_parquet(output / "predictions" / "*.parquet")
    inputs = pl.read_parquet(data / "*.parquet")
    assert got.height + errors == inputs.height and got.height == got["id"].n_unique()
    return inputs.join(got, on="id", how="left", validate="1:1").sort("id")


def matrix(frame: pl.DataFrame, column: str) -> np.ndarray:
    return np.stack(frame[column].to_list()).astype(np.float64)


@pytest.mark.usefixtures("prefect_server")
def test_sequence_classifier_gives_probabilities_predictions_and_labels(texts: Path, tmp_path: Path) -> None:
    folder = hf_models.save_classifier(tmp_path / "cls", id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    joined = scored(texts, tmp_path / "out", f"hf:{folder}", text_column="text")
    assert joined.columns == ["id", "text", "prediction", "probabilities", "label"]
    expected = torch.softmax(hf_models.logits(folder, joined["text"].to_list()), dim=1).numpy()
    assert np.abs(matrix(joined, "probabilities") - expected).max() <= 1e-5
    assert (joined["prediction"].to_numpy() == expected.argmax(axis=1)).all()
    assert joined["label"].to_list() == [LABELS[i] for i in expected.argmax(axis=1)]
    assert len(set(joined["label"])) > 1  # the oracle tells classes apart, so the labels were really checked


@pytest.mark.usefixtures("prefect_server")
def test_multilabel_classifier_lists_the_labels_over_the_threshold(texts: Path, tmp_path: Path) -> None:
    names = {0: "sport", 1: "politics", 2: "science", 3: "art"}
    folder = hf_models.save_classifier(
        tmp_path / "tags",
        id2label=names,
        label2id={v: k for k, v in names.items()},
        problem_type="multi_label_classification",
    )
    joined = scored(texts, tmp_path / "out", f"hf:{folder}", text_column="text", threshold=0.3)
    assert joined.columns == ["id", "text", "probabilities", "labels"]
    expected = torch.sigmoid(hf_models.logits(folder, joined["text"].to_list())).numpy()
    assert np.abs(matrix(joined, "probabilities") - expected).max() <= 1e-5
    on = [[names[j] for j in range(4) if row[j] > 0.3] for row in matrix(joined, "probabilities")]
    assert joined["labels"].to_list() == on
    assert {len(row) for row in on} != {len(on[0])}  # rows with different numbers of labels


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(("outputs", "column"), [(1, "prediction"), (3, "predictions")])
def test_regression_gives_its_values(texts: Path, tmp_path: Path, outputs: int, column: str) -> None:
    """One output: `prediction` float64; several: `predictions` list<float64>."""
    folder = hf_models.save_classifier(tmp_path / "reg", num_labels=outputs, problem_type="regression")
    joined = scored(texts, tmp_path / "out", f"hf:{folder}", text_column="text")
    assert joined.columns == ["id", "text", column]
    assert joined[column].dtype == (pl.Float64 if outputs == 1 else pl.List(pl.Float64))
    expected = hf_models.logits(folder, joined["text"].to_list()).numpy()
    got = joined[column].to_numpy()[:, None] if outputs == 1 else matrix(joined, column)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # fp32, padded batches against one text


@pytest.mark.usefixtures("prefect_server")
def test_raw_outputs_of_a_classifier_are_its_logits(texts: Path, tmp_path: Path) -> None:
    folder = hf_models.save_classifier(tmp_path / "cls", num_labels=3)
    joined = scored(texts, tmp_path / "out", f"hf:{folder}", text_column="text", output_kind="raw")
    assert joined.columns == ["id", "text", "output"]
    expected = hf_models.logits(folder, joined["text"].to_list()).numpy()
    np.testing.assert_allclose(matrix(joined, "output"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("prefect_server")
def test_plain_encoder_gives_mean_pooled_embeddings(texts: Path, tmp_path: Path) -> None:
    """AutoModel's last hidden state, mean-pooled over the attention mask; not unit norm, and not checked as such."""
    folder = hf_models.save_encoder(tmp_path / "enc")
    joined = scored(texts, tmp_path / "out", f"hf:{folder}", text_column="text")
    assert joined.columns == ["id", "text", "embedding"]
    expected = hf_models.mean_pooled(folder, joined["text"].to_list()).numpy()
    got = matrix(joined, "embedding")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() > 0.1


@pytest.mark.usefixtures("prefect_server")
def test_text_pairs_go_to_the_classifier_as_pairs(tmp_path: Path) -> None:
    """`--text-column premise,hypothesis`: a cross-encoder's input, with segment ids; a null in either column
    sends the row to errors."""
    sentences = demo.sentences(61, seed=9)
    premise, hypothesis = sentences[:30] + [None], sentences[30:]
    (tmp_path / "pairs").mkdir()
    frame = pl.DataFrame({"id": np.arange(31), "premise": premise, "hypothesis": hypothesis})
    frame.write_parquet(tmp_path / "pairs" / "part-0.parquet")
    folder = hf_models.save_classifier(tmp_path / "nli", num_labels=3, type_vocab_size=2)
    with torch.no_grad():  # segment ids must matter, or pairs and concatenations would look alike
        model, _ = hf_models.load(folder, head=True)
        model.bert.embeddings.token_type_embeddings.weight.normal_(0.0, 1.0)
        model.save_pretrained(folder)
    joined = scored(
        tmp_path / "pairs",
        tmp_path / "out",
        f"hf:{folder}",
        errors=1,
        text_column="premise,hypothesis",
        max_error_ratio=0.05,
    )
    scored_rows = joined.filter(pl.col("premise").is_not_null())
    expected = hf_models.logits(folder, scored_rows["premise"].to_list(), scored_rows["hypothesis"].to_list())
    assert np.abs(matrix(scored_rows, "probabilities") - torch.softmax(expected, dim=1).numpy()).max() <= 1e-5
    errors = pl.read_parquet(tmp_path / "out" / "errors" / "*.parquet")
    assert errors.to_dicts() == [{"id": 30, "reason": "text column 'premise' is null"}]


def _sentence_transformers(folder: Path, pooling: str, normalize: bool, max_seq_length: int) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(hf_models.minilm_dir()), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    SentenceTransformer(modules=[*modules, *([Normalize()] if normalize else [])], device="cpu").save(str(folder))
    return folder


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("pooling", "normalize", "max_seq_length"),
    [("mean", True, 256), ("cls", False, 32)],
    ids=["mean-normalized", "cls"],
)
def test_sentence_transformers_directory_matches_encode(
    texts: Path, tmp_path: Path, pooling: str, normalize: bool, max_seq_length: int
) -> None:
    """Built from the shipped all-MiniLM-L6-v2 package: its pooling and Normalize modules are honoured."""
    from sentence_transformers import SentenceTransformer

    folder = _sentence_transformers(tmp_path / "st", pooling, normalize, max_seq_length)
    joined = scored(texts, tmp_path / "out", f"hf:{folder}", text_column="text")
    expected = SentenceTransformer(str(folder), device="cpu").encode(joined["text"].to_list(), convert_to_numpy=True)
    assert np.abs(matrix(joined, "embedding") - expected).max() <= 1e-4
    norms = np.linalg.norm(matrix(joined, "embedding"), axis=1)
    assert (np.abs(norms - 1) < 1e-4).all() if normalize else (np.abs(norms - 1) > 0.1).all()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["output"]["normalized"] is normalize


@pytest.mark.s3
def test_directory_on_s3_scores_like_the_local_one(texts: Path, tmp_path: Path, s3_bucket, monkeypatch) -> None:
    """Copied once into a local cache, named by the files' names, sizes and versions."""
    import s3fs

    monkeypatch.setenv("BATCHINFER_CACHE", str(tmp_path / "cache"))
    bucket, options = s3_bucket
    folder = hf_models.save_classifier(tmp_path / "cls", id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    s3fs.S3FileSystem(**options).put(str(folder) + "/", f"{bucket}/models/cls/", recursive=True)
    common = {"input_uri": str(texts), "text_column": "text", "devices": "cpu", "storage_options": options}
    _, remote = run_core(output_uri=str(tmp_path / "remote"), model=f"hf:{bucket}/models/cls", **common)
    _, local = run_core(output_uri=str(tmp_path / "local"), model=f"hf:{folder}", **common)
    assert remote.ok and local.ok
    a = pl.read_parquet(tmp_path / "remote" / "predictions" / "*.parquet").sort("id")
    b = pl.read_parquet(tmp_path / "local" / "predictions" / "*.parquet").sort("id")
    assert a.equals(b)
    assert len(list((tmp_path / "cache" / "hf").iterdir())) == 1


# -- refusals: one line naming the file, exit 2, before any work -------------------------------------------


def plan_line(capsys, texts: Path, model: str, *more: str) -> str:
    return refused(capsys, "plan", "--input", str(texts), "--model", model, "--text-column", "text", *more)


def test_directory_with_only_pickled_weights_is_refused(texts: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    folder = hf_models.save_classifier(tmp_path / "cls", num_labels=2)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert plan_line(capsys, texts, f"hf:{folder}") == (
        f"{folder}/pytorch_model.bin holds pickled weights, which can run code when loaded; "
        "batchinfer reads safetensors only (save_pretrained writes model.safetensors)"
    )


def test_unknown_architecture_is_refused(texts: Path, tmp_path: Path, capsys) -> None:
    import transformers

    folder = hf_models.save_encoder(tmp_path / "enc")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bort", "architectures": ["BortModel"]}))
    assert plan_line(capsys, texts, f"hf:{folder}") == (
        f"{folder}/config.json: model_type 'bort' is not an architecture transformers {transformers.__version__} knows"
    )


def test_architecture_transformers_does_not_ship_is_refused(texts: Path, tmp_path: Path, capsys) -> None:
    import transformers

    folder = hf_models.save_classifier(tmp_path / "cls", num_labels=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForTelepathy"]}))
    assert plan_line(capsys, texts, f"hf:{folder}") == (
        f"{folder}/config.json: architecture 'BertForTelepathy' is not one transformers "
        f"{transformers.__version__} ships"
    )


def test_resolving_a_directory_leaves_its_modeling_code_unimported(tmp_path: Path) -> None:
    """The driver checks and plans; only a process that scores imports the architecture (seconds for BERT)."""
    folder = hf_models.save_classifier(tmp_path / "cls", num_labels=2)
    script = (
        "import sys\n"
        "from batchinfer.models.base import resolve_model\n"
        f"spec = resolve_model({f'hf:{folder}'!r}, checkpoint=None, precision='fp32', features=None, "
        "text_column='text', storage_options={})\n"
        "assert spec.output.kind == 'classifier', spec.output\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.bert.modeling')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_config_asking_for_its_own_code_is_refused(texts: Path, tmp_path: Path, capsys) -> None:
    folder = hf_models.save_classifier(tmp_path / "cls", num_labels=2)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('this must never run')\n")
    assert plan_line(capsys, texts, f"hf:{folder}") == (
        f"{folder}/config.json asks to run the model's own code "
        "(auto_map: modeling_evil.EvilForSequenceClassification); batchinfer never sets trust_remote_code"
    )


def test_output_kind_that_contradicts_the_config_is_refused(texts: Path, tmp_path: Path, capsys) -> None:
    folder = hf_models.save_classifier(tmp_path / "tags", num_labels=4, problem_type="multi_label_classification")
    assert plan_line(capsys, texts, f"hf:{folder}", "--output-kind", "classifier") == (
        f"--output-kind classifier contradicts hf:{folder}: its config.json problem_type "
        "'multi_label_classification' declares multilabel"
    )


def test_text_pairs_for_an_encoder_are_refused(texts: Path, tmp_path: Path, capsys) -> None:
    folder = hf_models.save_encoder(tmp_path / "enc")
    line = refused(capsys, "plan", "--input", str(texts), "--model", f"hf:{folder}", "--text-column", "text,text2")
    assert line == (
        f"--model hf:{folder} reads one text column; --text-column names two (text, text2), which only text-pair "
        "models (cross-encoders, NLI classifiers) take"
    )


def test_a_local_model_directory_with_a_cluster_engine_is_refused(texts: Path, tmp_path: Path, capsys) -> None:
    """Workers on other machines could not read it; refused before any work, like a local input."""
    folder = tmp_path / "cls"
    args = ["run", "--input", f"file://{texts}", "--output", f"file://{tmp_path}/out", "--model", f"hf:{folder}"]
    args += ["--text-column", "text"]
    line = refused(capsys, *args, "--engine", "dask", "--engine-address", "tcp://127.0.0.1:9")
    assert line == (
        f"--model {folder} is a local path, but --engine dask runs shards on the cluster at tcp://127.0.0.1:9: "
        f"use storage every worker sees (s3://...), or file://{folder} if every worker mounts it at that path"
    )
    assert not (tmp_path / "out").exists()
