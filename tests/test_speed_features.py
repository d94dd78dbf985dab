"""The parts that make a run fast, checked for what they do (never for how fast they are).

Prefetch overlaps and propagates errors; the writer thread keeps order and
reports errors; both feature layouts give the same predictions; text comes back
in its original order after length sorting; precision settings change the
fingerprint and stay within tolerance of fp32; streaming reads at most a chunk
at a time; batch size "auto" halves on out-of-memory and remembers it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchinfer import demo, runner
from batchinfer.config import make_config
from batchinfer.devices import Device
from batchinfer.errors import ConfigError
from batchinfer.merge import merge_and_validate
from batchinfer.models import mlp
from batchinfer.models.base import ModelSpec
from batchinfer.outputs import OutputSpec
from batchinfer.pipeline import prepare, run_shard, start_run
from batchinfer.reader import feature_matrix, iter_shard, prefetch
from batchinfer.runner import ShardSettings
from batchinfer.storage import Storage
from batchinfer.writer import BackgroundWriter
from cli.main import build_parser, config_from_args

WAIT = 30.0  # seconds; only a guard against hanging, never a measurement

# -- prefetch ------------------------------------------------------------------------------------------------


def test_tabular_chunks_on_the_cpu_are_read_ahead_only_beside_spare_cores(monkeypatch):
    from batchinfer.devices import Device
    from batchinfer.runner import _read_ahead

    cores = os.cpu_count() or 1
    cpu, gpu = Device("cpu", "cpu"), Device("cuda:0", "cuda:0")
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)  # the model's threads on every core
    assert not _read_ahead(cpu, text=False)
    assert _read_ahead(cpu, text=True) and _read_ahead(gpu, text=False)  # tokenizing, or an idle host CPU
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # fake devices share the cores
    assert _read_ahead(cpu, text=False) == (cores > 1)


def test_prefetch_reads_ahead_while_the_consumer_works():
    produced: list[int] = []
    second_ready = threading.Event()

    def items():
        for i in range(10):
            produced.append(i)
            if i == 1:
                second_ready.set()
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    # While the consumer still holds item 0, the background thread has already produced item 1 ...
    assert second_ready.wait(WAIT)
    # ... but no more than the bounded queue allows (depth waiting + one being put).
    threading.Event().wait(0.2)
    assert len(produced) <= 1 + 2 + 1
    assert list(stream) == list(range(1, 10))


def test_prefetch_raises_the_producers_error_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("row group 3 is corrupt")

    got = []
    with pytest.raises(ValueError, match="row group 3 is corrupt"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    closed = threading.Event()

    def items():
        try:
            yield from range(1_000_000)
        finally:
            closed.set()

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(WAIT)


def test_prefetch_lets_its_thread_go_when_the_consumer_fails_with_the_queue_full():
    """The consumer fails while the last items wait in the full queue: the thread must not stay blocked."""
    finished = threading.Event()

    def items():
        try:
            yield from range(3)
        finally:
            finished.set()

    def consume() -> None:
        for item in prefetch(items(), depth=2):
            threading.Event().wait(0.3)  # items 1 and 2 fill the queue; the end marker has no room
            raise RuntimeError(f"scoring item {item} failed")

    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="scoring item 0 failed"):
        consume()
    assert time.perf_counter() - started < 2.0, "the consumer waited for a blocked prefetch thread"
    assert finished.wait(WAIT)
    threading.Event().wait(0.3)
    assert not [t for t in threading.enumerate() if t.name == "batchinfer-prefetch"]


# -- the writer thread ---------------------------------------------------------------------------------------


def test_background_writer_keeps_order_and_rows(tmp_path: Path):
    path = tmp_path / "out.parquet"
    writer = BackgroundWriter(str(path))
    for start in range(0, 10_000, 1_000):
        writer.write(pa.table({"id": np.arange(start, start + 1_000)}))
    writer.close()
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == list(range(10_000))
    assert writer.rows == 10_000


def test_background_writer_reports_a_write_error(tmp_path: Path):
    writer = BackgroundWriter(str(tmp_path / "out.parquet"))
    writer.write(pa.table({"id": [1, 2]}))
    writer.write(pa.table({"other": ["a"]}))  # another schema: the thread's write fails
    with pytest.raises(Exception, match="schema|Table schema does not match"):
        for _ in range(3):
            writer.write(pa.table({"id": [3]}))
        writer.close()


def test_background_writer_with_only_an_empty_table_still_makes_a_valid_file(tmp_path: Path):
    path = tmp_path / "out.parquet"
    writer = BackgroundWriter(str(path))
    writer.write(pa.table({"id": pa.array([], pa.int64())}))
    writer.close()
    assert pq.read_table(path).num_rows == 0
    assert pq.read_schema(path).names == ["id"]


# -- feature layouts -----------------------------------------------------------------------------------------


def _write_layouts(root: Path, rows: int = 3_000) -> tuple[Path, Path]:
    frame = demo.tabular_frame(rows, seed=7)
    columns, array = root / "columns", root / "array"
    columns.mkdir()
    array.mkdir()
    frame.write_parquet(columns / "part-00000.parquet", row_group_size=1_000)
    values = frame.select(demo.FEATURE_NAMES).to_numpy().astype(np.float32)
    features = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), demo.N_FEATURES)
    pq.write_table(
        pa.table({"id": frame["id"].to_arrow(), "features": features}),
        array / "part-00000.parquet",
        row_group_size=1_000,
    )
    return columns, array


def _run_core(config) -> pa.Table:
    """The flow's steps without Prefect: plan, score every shard, merge and validate."""
    plan = prepare(config)
    start_run(plan)
    results = {s.shard_id: run_shard(config, plan.settings, s).to_dict() for s in plan.pending}
    report = merge_and_validate(plan, results)
    assert report.ok, report.failures
    return pq.read_table(Path(config.output.uri) / "predictions").sort_by("id")


def test_feature_matrix_layouts_hold_the_same_values(tmp_path: Path):
    columns, array = _write_layouts(tmp_path, rows=1_500)
    a = next(pq.ParquetFile(columns / "part-00000.parquet").iter_batches(batch_size=1_500))
    b = next(pq.ParquetFile(array / "part-00000.parquet").iter_batches(batch_size=1_500))
    separate, ok_a, _ = feature_matrix(a, demo.FEATURE_NAMES)
    one, ok_b, _ = feature_matrix(b, ["features"])
    assert separate.shape == one.shape == (1_500, 64)
    assert np.array_equal(separate, one)
    assert ok_a.all() and ok_b.all()
    # The array column is used in place: no copy of its values buffer.
    column = b.column("features")
    assert np.shares_memory(one, column.values.to_numpy(zero_copy_only=True))


def test_array_column_gives_the_same_predictions_as_separate_columns(tmp_path: Path, tabular):
    columns, array = _write_layouts(tmp_path)
    common = {"model": "mlp", "checkpoint": tabular["checkpoint"], "devices": "cpu", "batch_size": 256}
    by_columns = _run_core(make_config(input_uri=str(columns), output_uri=str(tmp_path / "o1"), **common))
    by_array = _run_core(
        make_config(input_uri=str(array), output_uri=str(tmp_path / "o2"), features=["features"], **common)
    )
    assert by_columns.column("id").equals(by_array.column("id"))
    assert by_columns.column("prediction").equals(by_array.column("prediction"))
    p1 = np.asarray(by_columns.column("probabilities").combine_chunks().flatten())
    p2 = np.asarray(by_array.column("probabilities").combine_chunks().flatten())
    np.testing.assert_allclose(p1, p2, rtol=0, atol=1e-6)


def test_array_column_of_the_wrong_width_is_refused(tmp_path: Path, tabular):
    from batchinfer.errors import BatchInferError

    values = np.zeros((10, 8), dtype=np.float32)
    folder = tmp_path / "narrow"
    folder.mkdir()
    pq.write_table(
        pa.table({"id": np.arange(10), "features": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 8)}),
        folder / "part-00000.parquet",
    )
    config = make_config(
        input_uri=str(folder),
        output_uri=str(tmp_path / "out"),
        model="mlp",
        checkpoint=tabular["checkpoint"],
        features=["features"],
        devices="cpu",
    )
    with pytest.raises(BatchInferError, match="holds 8 per row"):
        prepare(config, check_existing=False)


# -- streaming: at most a chunk at a time --------------------------------------------------------------------


def test_iter_shard_yields_at_most_chunk_rows(tmp_path: Path):
    from batchinfer.planning import list_partitions, plan_shards

    folder = tmp_path / "data"
    demo.write_tabular(folder, rows=5_000, partitions=1, row_group_rows=1_000)
    storage = Storage(str(folder))
    shard = plan_shards(list_partitions(storage, str(folder)), 10_000)[0]
    sizes = [b.num_rows for b in iter_shard(storage, shard, ["id", "f00"], chunk_rows=300)]
    assert sum(sizes) == 5_000
    assert max(sizes) <= 300
    # Decoding on Arrow's threads (what an accelerator's shard does) gives the same chunks, value for value.
    columns = ["id", *demo.FEATURE_NAMES]
    one = list(iter_shard(storage, shard, columns, chunk_rows=300))
    threaded = list(iter_shard(storage, shard, columns, chunk_rows=300, decode_threads=True))
    assert [b.num_rows for b in threaded] == sizes
    assert all(a.equals(b) for a, b in zip(one, threaded, strict=True))


def test_text_chunks_hold_many_short_texts_and_few_long_ones(tmp_path: Path):
    """Short texts fill a chunk up to its rows (a wide pool to sort by length); long documents stop at the
    byte budget, so a chunk of them does not fill memory."""
    from batchinfer.planning import list_partitions, plan_shards

    folder = tmp_path / "data"
    folder.mkdir()
    short = pa.table({"id": list(range(3_000)), "text": [f"short sentence {i}" for i in range(3_000)]})
    long = pa.table(
        {"id": list(range(3_000, 3_100)), "text": [f"{i} " + "word " * 20_000 for i in range(100)]}
    )  # 100 KB each
    pq.write_table(short, folder / "a.parquet", row_group_size=500)
    pq.write_table(long, folder / "b.parquet", row_group_size=10)
    storage = Storage(str(folder))
    shards = {s.partition_uri.rsplit("/", 1)[-1]: s for s in plan_shards(list_partitions(storage, str(folder)), 10_000)}
    budget = 1_000_000
    sizes = [b.num_rows for b in iter_shard(storage, shards["a.parquet"], ["id", "text"], 2_048, chunk_bytes=budget)]
    assert sizes == [2_048, 952]
    sizes = [b.num_rows for b in iter_shard(storage, shards["b.parquet"], ["id", "text"], 2_048, chunk_bytes=budget)]
    assert sum(sizes) == 100 and max(sizes) <= 10  # about 1 MB of 100 KB texts
    assert (
        max(b.nbytes for b in iter_shard(storage, shards["b.parquet"], ["text"], 2_048, chunk_bytes=budget))
        < 2 * budget
    )


def test_the_runner_never_holds_more_than_a_chunk_of_features(tmp_path: Path, tabular, monkeypatch):
    seen: list[int] = []
    original = runner.feature_matrix

    def recording(batch, features):
        seen.append(batch.num_rows)
        return original(batch, features)

    monkeypatch.setattr(runner, "feature_matrix", recording)
    monkeypatch.setattr(runner, "CHUNK_ROWS_FEATURES", 700)
    config = make_config(
        input_uri=tabular["input"],
        output_uri=str(tmp_path / "out"),
        model="mlp",
        checkpoint=tabular["checkpoint"],
        devices="cpu",
    )
    table = _run_core(config)
    assert table.num_rows == 20_000
    assert sum(seen) == 20_000
    assert max(seen) <= 700


# -- text: sorted by length inside, original order outside --------------------------------------------------


class _LengthEmbedder:
    """Tokens are words; the 'embedding' is (number of words, first word's length), and calls are recorded."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[len(w) for w in t.split()] for t in texts]

    def encode_ids(self, ids: list[list[int]]) -> torch.Tensor:
        self.calls.append([len(row) for row in ids])
        return torch.tensor([[float(len(row)), float(row[0])] for row in ids])

    def predict(self, texts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(texts))


def _text_settings(batch_size: int = 4) -> ShardSettings:
    return ShardSettings(
        output_uri="unused",
        key_column="id",
        features=(),
        text_column="text",
        passthrough=(),
        batch_size=batch_size,
        max_error_ratio=0.0,
        model_fingerprint="f",
        output_fingerprint="o",
    )


def _spec(kind: str = "text", fingerprint: str = "fp-test") -> ModelSpec:
    return ModelSpec(
        name="fake",
        input_kind=kind,  # type: ignore[arg-type]
        output=OutputSpec("embedding"),
        fingerprint=fingerprint,
    )


def test_texts_are_scored_sorted_by_length_and_returned_in_input_order():
    texts = demo.sentences(50, seed=3)
    model = _LengthEmbedder()
    out = runner._predict_texts(texts, _text_settings(), _spec(), model, Device("cpu", "cpu"))
    expected = np.array([[len(t.split()), len(t.split()[0])] for t in texts], dtype=np.float32)
    np.testing.assert_array_equal(out, expected)
    lengths = [n for call in model.calls for n in call]
    assert lengths == sorted(lengths)  # the model saw the texts shortest first
    assert sorted(lengths) == sorted(len(t.split()) for t in texts)


class _CharacterCounter:
    """A text model without a tokenizer of its own: it only has predict(texts)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def predict(self, texts: list[str]) -> torch.Tensor:
        self.calls.append([len(t) for t in texts])
        return torch.tensor([[float(len(t))] for t in texts])


def test_a_text_model_without_a_tokenizer_gets_its_texts_sorted_by_length():
    texts = demo.sentences(50, seed=6)
    model = _CharacterCounter()
    out = runner._predict_texts(texts, _text_settings(), _spec(), model, Device("cpu", "cpu"))
    assert out[:, 0].tolist() == [float(len(t)) for t in texts]  # back in input order
    lengths = [n for call in model.calls for n in call]
    assert lengths == sorted(lengths) and len(model.calls) == 13  # batches of 4, shortest first


def test_texts_tokenized_in_the_prefetch_thread_come_back_in_order():
    texts = demo.sentences(30, seed=4)
    model = _LengthEmbedder()
    batch = pa.record_batch({"id": np.arange(30), "text": texts})
    [(got_batch, tokens)] = list(runner._with_tokens(iter([batch]), _text_settings(), model, text=True))
    assert got_batch is batch and tokens == model.tokenize(texts)
    out = runner._predict_texts([], _text_settings(), _spec(), model, Device("cpu", "cpu"), tokens)
    assert out[:, 0].tolist() == [len(t.split()) for t in texts]


@pytest.mark.slow
def test_minilm_shard_matches_one_sentence_at_a_time(tmp_path: Path):
    from batchinfer.models import minilm

    texts = demo.sentences(24, seed=5)
    folder = tmp_path / "text"
    folder.mkdir()
    pq.write_table(pa.table({"id": np.arange(24), "text": texts}), folder / "part-00000.parquet")
    config = make_config(
        input_uri=str(folder),
        output_uri=str(tmp_path / "out"),
        model="minilm",
        text_column="text",
        devices="cpu",
        batch_size=5,
    )
    table = _run_core(config)
    got = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(24, -1)
    predictor = minilm.resolve(precision="fp32").load(torch.device("cpu"))
    with torch.inference_mode():
        one_by_one = np.concatenate([predictor.predict([t]).numpy() for t in texts])
    cosine = (got * one_by_one).sum(axis=1)
    assert cosine.min() > 0.9999


def test_minilm_tokenizes_and_encodes_as_transformers_does():
    """The Rust tokenizer (also in pieces on threads) gives BertTokenizer's ids, and the plain-PyTorch
    encoder with numpy padding gives BertModel's mean-pooled embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModel, AutoTokenizer

    from batchinfer.models import minilm

    predictor = minilm.resolve(precision="fp32").load(torch.device("cpu"))
    folder = str(minilm.model_dir())
    reference = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = demo.sentences(3 * minilm.TOKENIZE_PIECE + 7, seed=8) + ["", "word " * 400]  # empty, and truncated
    wrapper = reference(texts, truncation=True, max_length=predictor.max_length)["input_ids"]
    assert predictor._pool is None  # the CPU: one thread, the cores run the model
    assert predictor.tokenize(texts) == wrapper
    with ThreadPoolExecutor(3) as pool:  # as on an accelerator
        predictor._pool = pool
        assert predictor.tokenize(texts) == wrapper
    assert max(map(len, wrapper)) == predictor.max_length
    sample = [*texts[:38], *texts[-2:]]
    padded = reference(sample, truncation=True, max_length=predictor.max_length, padding=True, return_tensors="pt")
    bert = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():
        got = predictor.encode_ids(predictor.tokenize(sample))
        hidden = bert(**padded).last_hidden_state
    mask = padded["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# -- precision -----------------------------------------------------------------------------------------------


def test_precisions_change_the_fingerprint_and_stay_close_to_fp32(tabular):
    x = torch.from_numpy(demo.tabular_frame(2_000, seed=11).select(demo.FEATURE_NAMES).to_numpy())
    fingerprints, outputs = {}, {}
    for precision in ("fp32", "bf16", "fp16", "int8"):
        spec = mlp.resolve(tabular["checkpoint"], precision=precision, storage_options={})
        fingerprints[precision] = spec.fingerprint
        with torch.inference_mode():
            outputs[precision] = spec.load(torch.device("cpu")).predict(x)
    assert len(set(fingerprints.values())) == 4
    reference = outputs["fp32"]
    limits = {"bf16": 0.02, "fp16": 0.005, "int8": 0.05}  # mean |p - p_fp32|; see BENCHMARKS.md for the maxima
    for precision, limit in limits.items():
        probs = outputs[precision]
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(x)), rtol=0, atol=1e-4)
        assert (probs - reference).abs().mean() < limit, precision
        assert (probs.argmax(1) == reference.argmax(1)).float().mean() > 0.9, precision


def test_precision_is_part_of_the_shard_settings_fingerprint(tmp_path: Path, tabular):
    common = {"input_uri": tabular["input"], "model": "mlp", "checkpoint": tabular["checkpoint"], "devices": "cpu"}
    fp32 = prepare(make_config(output_uri=str(tmp_path / "a"), **common), check_existing=False)
    bf16 = prepare(make_config(output_uri=str(tmp_path / "b"), precision="bf16", **common), check_existing=False)
    assert fp32.settings.model_fingerprint != bf16.settings.model_fingerprint


# -- batch size "auto" ---------------------------------------------------------------------------------------


class _SmallMemoryModel:
    """Runs out of memory above `limit` rows per call, like a GPU would."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        if batch.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.softmax(batch[:, :3].float(), dim=1)


def _feature_settings(batch_size: int) -> ShardSettings:
    return ShardSettings(
        output_uri="unused",
        key_column="id",
        features=("a", "b", "c"),
        text_column=None,
        passthrough=(),
        batch_size=batch_size,
        max_error_ratio=0.0,
        model_fingerprint="f",
        output_fingerprint="o",
    )


def test_auto_batch_size_halves_on_out_of_memory_and_is_remembered_per_device(monkeypatch):
    monkeypatch.setattr(runner, "_auto_batch", {})
    device, spec = Device("fake:0", "cpu"), _spec("features", "fp-auto")
    model = _SmallMemoryModel(limit=300)
    matrix = np.random.default_rng(0).standard_normal((2_000, 3)).astype(np.float32)
    out = runner._predict_matrix(matrix, _feature_settings(0), spec, model, device)
    np.testing.assert_allclose(out, torch.softmax(torch.from_numpy(matrix), dim=1).numpy(), atol=1e-6)
    assert model.sizes[:3] == [1024, 512, 256]  # the CPU default, halved until it fits
    assert runner._auto_batch[("fake:0", "fp-auto")] == 256
    assert runner.batch_size_for(_feature_settings(0), spec, device) == 256
    assert (
        runner.batch_size_for(_feature_settings(0), spec, Device("fake:1", "cpu")) == runner.CPU_BATCH_SIZE["features"]
    )
    model.sizes.clear()
    runner._predict_matrix(matrix, _feature_settings(0), spec, model, device)
    assert max(model.sizes) == 256  # the next chunk starts where the last one ended


def test_a_fixed_batch_size_is_halved_on_out_of_memory_but_not_remembered(monkeypatch):
    monkeypatch.setattr(runner, "_auto_batch", {})
    model = _SmallMemoryModel(limit=100)
    matrix = np.random.default_rng(1).standard_normal((500, 3)).astype(np.float32)
    out = runner._predict_matrix(matrix, _feature_settings(400), _spec("features"), model, Device("cpu", "cpu"))
    np.testing.assert_allclose(out, torch.softmax(torch.from_numpy(matrix), dim=1).numpy(), atol=1e-6)
    assert model.sizes[:3] == [400, 200, 100]
    assert runner._auto_batch == {}


def test_out_of_memory_at_one_row_is_final(monkeypatch):
    model = _SmallMemoryModel(limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        runner._predict_matrix(
            np.zeros((4, 3), dtype=np.float32), _feature_settings(2), _spec("features"), model, Device("cpu", "cpu")
        )


def test_auto_batch_size_on_the_cpu_is_the_measured_default():
    device = Device("cpu", "cpu")
    assert runner.batch_size_for(_feature_settings(0), _spec("features", "x1"), device) == 1024
    assert runner.batch_size_for(_feature_settings(0), _spec("text", "x2"), device) == 64
    assert runner.batch_size_for(_feature_settings(333), _spec("features", "x3"), device) == 333


def test_cli_batch_size_auto_means_zero_and_zero_is_refused():
    parser = build_parser()
    base = ["run", "--input", "in", "--output", "out", "--model", "mlp"]
    assert config_from_args(parser.parse_args([*base, "--batch-size", "auto"])).compute.batch_size == 0
    assert config_from_args(parser.parse_args([*base, "--batch-size", "512"])).compute.batch_size == 512
    with pytest.raises(ConfigError, match="positive number of rows"):
        config_from_args(parser.parse_args([*base, "--batch-size", "0"]))
