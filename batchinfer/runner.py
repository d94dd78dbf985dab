"""Scoring one shard on one device and committing it: data first, marker last.

A shard's rows stream through in chunks; each chunk's rows are checked, scored
in mini-batches under `torch.inference_mode()`, and appended as a row group to a
temporary Parquet file. Only when every row is accounted for is the file moved
into place, then the errors file, then the marker. A failure at any point
leaves no marker, so the shard counts as not done.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from batchinfer import devices, faults, outputs, progress
from batchinfer.config import OUTPUT_COMPRESSION, text_columns
from batchinfer.devices import WORKERS, Device, DeviceWorkers, hold_device, stopping
from batchinfer.errors import BatchInferError, ModelError, ShardFailedError, Stopped
from batchinfer.layout import Layout
from batchinfer.models.base import ModelSpec, Predictor
from batchinfer.planning import Shard
from batchinfer.reader import feature_matrix, iter_shard, prefetch
from batchinfer.storage import Storage
from batchinfer.writer import BackgroundWriter

log = logging.getLogger(__name__)

# Rows read, checked and written together. 65,536 feature rows (16 MiB of float32 at 64 features) keep the
# reader, the model and the writer busy at once with a few chunks in memory; text chunks are the pool that
# length sorting draws from.
CHUNK_ROWS_FEATURES = 65_536
CHUNK_ROWS_TEXT = 4_096

# Batch size "auto" (0): on the CPU the measured best (benchmarks/, BENCHMARKS.md); on an accelerator the
# largest that fits, found by halving from the start value on out-of-memory and remembered per device.
CPU_BATCH_SIZE = {"features": 1024, "text": 64}
AUTO_START_BATCH_SIZE = {"features": 65_536, "text": 512}
_auto_batch: dict[tuple[str, str], int] = {}
_auto_lock = threading.Lock()


@dataclass(frozen=True)
class ShardSettings:
    """What scoring needs besides the model: plain values, safe to send to a task."""

    output_uri: str
    key_column: str
    features: tuple[str, ...]
    text_column: str | None
    passthrough: tuple[str, ...]
    batch_size: int
    max_error_ratio: float
    model_fingerprint: str
    output_fingerprint: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    output: outputs.OutputSpec = field(default_factory=outputs.OutputSpec)
    run_id: str = field(default="", compare=False)  # the run that commits a shard, recorded in its marker

    @property
    def text_columns(self) -> list[str]:
        """One text column, or two for text pairs."""
        return text_columns(self.text_column)


@dataclass
class ShardStats:
    """What happened to one shard; stats add up across shards."""

    shard_id: str
    partition_uri: str
    rows_in: int = 0
    rows_out: int = 0
    rows_error: int = 0
    seconds: float = 0.0
    device: str = ""
    host: str = ""
    pid: int = 0
    model_loaded: bool = False
    waited_seconds: float = 0.0
    waited_for: str = ""
    state: str = "done"  # done | skipped | failed
    error: str = ""
    started_at: str = ""
    finished_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_marker(cls, marker: dict[str, Any]) -> ShardStats:
        return cls(**{f.name: marker[f.name] for f in fields(cls) if f.name in marker})

    @property
    def rows_per_second(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0


def stop_shards() -> None:
    """Stop this process's shards at once, none committed: waiting ones give up, scoring ones stop at their
    next chunk, and worker processes this process started (a process pool's) are ended. A rerun redoes them."""
    devices.stop()
    for child in multiprocessing.active_children():
        child.terminate()


def _stop_if_asked(shard_id: str) -> None:
    if stopping():
        raise Stopped(f"shard {shard_id} stopped before it was committed: the run is stopping")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def score_shard(
    shard: Shard,
    settings: ShardSettings,
    spec: ModelSpec,
    devices: list[Device],
    *,
    run: str = "",
    storage: Storage | None = None,
    workers: DeviceWorkers = WORKERS,
) -> ShardStats:
    """Own a device on this host, score the shard on it, commit it. Raises on failure (nothing committed)."""
    storage = storage or Storage(settings.output_uri, settings.storage_options)
    with hold_device(devices, shard.shard_id, run=run, prefer=workers.loaded(spec), on_wait=log.info) as lease:
        device = lease.device
        stats = ShardStats(
            shard.shard_id,
            shard.partition_uri,
            device=device.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            waited_seconds=lease.waited_seconds,
            waited_for=lease.waited_for,
            started_at=_now(),
        )
        start = time.perf_counter()

        def work() -> None:  # on the device's own thread: loading and scoring
            predictor, stats.model_loaded = workers.model(device, spec)
            _score_and_commit(shard, settings, spec, predictor, device, storage, stats)

        workers.run(device, work)
        stats.seconds = round(time.perf_counter() - start, 6)
        stats.finished_at = _now()
        faults.point("commit.data")
        _write_marker(shard, settings, spec, stats, storage)
    progress.emit(progress.Event("shard_done", shard.shard_id, rows=stats.rows_in))
    log.info(
        "shard %s done on %s: %d rows in %.2f s (%d errors)",
        shard.shard_id,
        device.name,
        stats.rows_in,
        stats.seconds,
        stats.rows_error,
    )
    return stats


def _score_and_commit(
    shard: Shard,
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    storage: Storage,
    stats: ShardStats,
) -> None:
    layout = Layout(settings.output_uri)
    in_storage = Storage(shard.partition_uri, settings.storage_options)
    text = spec.input_kind == "text"
    inputs = settings.text_columns if text else list(settings.features)
    columns = list(dict.fromkeys([settings.key_column, *inputs, *settings.passthrough]))
    chunk_rows = CHUNK_ROWS_TEXT if text else CHUNK_ROWS_FEATURES
    error_keys: list[Any] = []
    error_reasons: list[str] = []
    # Three stages overlap: the prefetch thread reads, decodes (and tokenizes) the next chunk, this thread
    # runs the model, the writer thread encodes the previous chunk's output.
    batches = iter_shard(in_storage, shard, columns, chunk_rows, decode_threads=device.is_accelerator)
    chunks = _with_tokens(batches, settings, predictor, text)
    with storage.atomic_local_file(layout.shard(shard.shard_id), suffix=".parquet") as tmp:
        writer = BackgroundWriter(tmp)
        # A chunk whose rows all failed is written only if no chunk has rows: its schema may not be
        # the others' (a regression that does not declare its width shows it in its values).
        empty: pa.Table | None = None
        wrote = False
        try:
            for batch, tokens in prefetch(chunks):
                _stop_if_asked(shard.shard_id)
                faults.point("scoring")
                table, bad_keys, bad_reasons = _score_chunk(batch, settings, spec, predictor, device, shard, tokens)
                if table.num_rows:
                    writer.write(table)
                    wrote = True
                elif empty is None:
                    empty = table
                error_keys.extend(bad_keys)
                error_reasons.extend(bad_reasons)
                stats.rows_in += batch.num_rows
                stats.rows_out += table.num_rows
                progress.emit(progress.Event("rows", shard.shard_id, rows=batch.num_rows))
            if not wrote and empty is not None:
                writer.write(empty)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if not writer.opened:  # a shard always has rows, but keep the file valid regardless
            raise ShardFailedError(f"shard {shard.shard_id} of {shard.partition_uri} read no rows")
        stats.rows_error = len(error_keys)
        if stats.rows_in != shard.num_rows:
            raise ShardFailedError(
                f"shard {shard.shard_id}: read {stats.rows_in} rows from {shard.partition_uri}, planned {shard.num_rows}",
                shard_id=shard.shard_id,
            )
        _check_error_ratio(shard, settings, stats, error_reasons)
        if error_keys:
            _write_errors(layout, shard, settings, storage, error_keys, error_reasons)
        else:
            storage.remove(layout.errors(shard.shard_id))


def _check_error_ratio(shard: Shard, settings: ShardSettings, stats: ShardStats, reasons: list[str]) -> None:
    if not stats.rows_error:
        return
    ratio = stats.rows_error / max(stats.rows_in, 1)
    if ratio > settings.max_error_ratio:
        common = Counter(reasons).most_common(1)[0][0]  # ties: the first seen, so the line is stable
        raise ShardFailedError(
            f"{shard.partition_uri}: {stats.rows_error} of {stats.rows_in} rows cannot be scored "
            f"(e.g. {common}); --max-error-ratio is {settings.max_error_ratio}",
            uri=shard.partition_uri,
            shard_id=shard.shard_id,
        )


def _write_errors(
    layout: Layout, shard: Shard, settings: ShardSettings, storage: Storage, keys: list[Any], reasons: list[str]
) -> None:
    table = pa.table({settings.key_column: keys, "reason": pa.array(reasons, pa.string())})
    with storage.atomic_local_file(layout.errors(shard.shard_id), suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression=OUTPUT_COMPRESSION)


def _with_tokens(
    batches: Iterator[pa.RecordBatch], settings: ShardSettings, predictor: Predictor, text: bool
) -> Iterator[tuple[pa.RecordBatch, list[list[int]] | None]]:
    """Pair each chunk with the token ids of its non-null texts, so tokenizing happens in the prefetch thread."""
    tokenize = getattr(predictor, "tokenize", None) if text else None
    for batch in batches:
        if tokenize is None or getattr(predictor, "encode_ids", None) is None:
            yield batch, None
            continue
        ok, _ = _text_rows(batch, settings)
        yield batch, tokenize(_texts(batch, settings, ok)) if batch.num_rows else []


def _text_rows(batch: pa.RecordBatch, settings: ShardSettings) -> tuple[np.ndarray, list[str]]:
    """Which rows have every text column set, and why the others cannot be scored."""
    ok = np.ones(batch.num_rows, dtype=bool)
    reasons = np.full(batch.num_rows, "", dtype=object)
    for name in reversed(settings.text_columns):  # a row's reason names its first null column
        null = np.asarray(batch.column(name).is_null().to_numpy(zero_copy_only=False))
        ok &= ~null
        reasons[null] = f"text column {name!r} is null"
    return ok, reasons[~ok].tolist()


def _texts(batch: pa.RecordBatch, settings: ShardSettings, ok: np.ndarray) -> list[Any]:
    """The texts of the rows to score: strings, or (a, b) tuples for text pairs."""
    mask = None if ok.all() else pa.array(ok)
    columns = [
        batch.column(name) if mask is None else batch.column(name).filter(mask) for name in settings.text_columns
    ]
    if len(columns) == 1:
        return columns[0].to_pylist()
    return list(zip(*(c.to_pylist() for c in columns), strict=True))


def batch_size_for(settings: ShardSettings, spec: ModelSpec, device: Device) -> int:
    """The batch size to use on `device`: the configured one, or for "auto" (0) the best known for this device."""
    if settings.batch_size:
        return settings.batch_size
    start = (AUTO_START_BATCH_SIZE if device.is_accelerator else CPU_BATCH_SIZE)[spec.input_kind]
    with _auto_lock:
        return _auto_batch.get((device.name, spec.fingerprint), start)


def _out_of_memory(exc: BaseException, size: int, settings: ShardSettings, spec: ModelSpec, device: Device) -> int:
    """Halve the batch after out-of-memory and go on; an automatic size is remembered for the device.

    A configured size is halved for the rest of this chunk only. Out of memory at one row is final.
    """
    if size <= 1:
        raise exc
    smaller = size // 2
    if not settings.batch_size:
        with _auto_lock:
            key = (device.name, spec.fingerprint)
            _auto_batch[key] = min(_auto_batch.get(key, smaller), smaller)
    if device.torch_name.startswith("cuda"):
        torch.cuda.empty_cache()
    log.warning("out of memory at batch size %d on %s; trying %d", size, device.name, smaller)
    return smaller


def _score_chunk(
    batch: pa.RecordBatch,
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    shard: Shard,
    tokens: list[list[int]] | None = None,
) -> tuple[pa.Table, list[Any], list[str]]:
    """Score one chunk; return the output table of good rows and the keys/reasons of bad rows."""
    keys = batch.column(settings.key_column)
    if spec.input_kind == "text":
        ok, reasons = _text_rows(batch, settings)
        good_texts = _texts(batch, settings, ok) if tokens is None else []
        values = _predict_texts(good_texts, settings, spec, predictor, device, tokens)
    else:
        matrix, ok, reasons = feature_matrix(batch, list(settings.features))
        good = matrix if ok.all() else matrix[ok]
        values = _predict_matrix(good, settings, spec, predictor, device)
    _check_outputs(values, spec, shard, keys.filter(pa.array(ok)))
    good_keys = keys if ok.all() else keys.filter(pa.array(ok))
    columns: dict[str, pa.Array] = {settings.key_column: good_keys}
    # A chunk whose rows all went to errors has no values (and no width) at all.
    columns.update(outputs.columns(values, settings.output))
    for name in settings.passthrough:
        column = batch.column(name)
        columns[name] = column if ok.all() else column.filter(pa.array(ok))
    bad_keys = keys.filter(pa.array(~ok)).to_pylist() if not ok.all() else []
    return pa.table(columns), bad_keys, reasons


def _predict_matrix(
    matrix: np.ndarray, settings: ShardSettings, spec: ModelSpec, predictor: Predictor, device: Device
) -> np.ndarray:
    """Mini-batches of `matrix` through the model, into one preallocated output.

    On the CPU the batches are views of the matrix (column-major when the
    features came as separate columns); a predictor that needs contiguous
    input gets a copy of each batch only. On CUDA the chunk is pinned once and
    each batch copied without blocking.
    """
    rows = matrix.shape[0]
    if rows == 0:
        return np.zeros((0, 0), dtype=np.float32)
    cuda = device.torch_name.startswith("cuda")
    with warnings.catch_warnings():  # a read-only zero-copy view is fine: nothing writes into the inputs
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(np.ascontiguousarray(matrix) if cuda else matrix)
    if cuda:
        host = host.pin_memory()
    strided_ok = bool(getattr(predictor, "accepts_strided", False))
    size = batch_size_for(settings, spec, device)
    result: torch.Tensor | None = None
    start = 0
    with torch.inference_mode():
        while start < rows:
            _stop_if_asked("")
            x = host[start : start + size]
            if not (cuda or strided_ok or x.is_contiguous()):
                x = x.contiguous()
            try:
                out = _as_output(predictor.predict(x.to(device.torch, non_blocking=cuda)), x.shape[0])
            except torch.OutOfMemoryError as exc:
                size = _out_of_memory(exc, size, settings, spec, device)
                continue
            if result is None:
                result = torch.empty((rows, out.shape[1]), dtype=torch.float32, pin_memory=cuda)
            # Without blocking only on CUDA, into pinned memory and synchronised below (MPS copies do not wait).
            result[start : start + x.shape[0]].copy_(out, non_blocking=cuda)
            start += x.shape[0]
    if cuda:
        torch.cuda.synchronize(device.torch)
    assert result is not None
    return result.numpy()


def _predict_texts(
    texts: list[str],
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    ids: list[list[int]] | None = None,
) -> np.ndarray:
    """Score texts in length-sorted batches (less padding) and restore the original order.

    `ids` are the texts' token ids when the prefetch thread already tokenized them. A model without a
    tokenizer of its own gets its texts sorted by length in characters.
    """
    encode_ids = getattr(predictor, "encode_ids", None)
    tokenize = getattr(predictor, "tokenize", None)
    if ids is None and tokenize is not None and encode_ids is not None:
        ids = tokenize(texts)
    count = len(ids) if ids is not None else len(texts)
    if count == 0:
        return np.zeros((0, 0), dtype=np.float32)
    sizes = ids if ids is not None else texts
    order = np.argsort(np.fromiter((_text_length(t) for t in sizes), dtype=np.int64, count=count), kind="stable")

    def run(index: np.ndarray) -> Any:
        if ids is not None:
            return encode_ids([ids[i] for i in index])  # type: ignore[misc]
        return predictor.predict([texts[i] for i in index])

    size = batch_size_for(settings, spec, device)
    # The rows are put back in input order where the model left them (on the GPU, say), and the whole
    # chunk comes back to the host once: no wait for the device after every batch.
    result: torch.Tensor | None = None
    start = 0
    with torch.inference_mode():
        while start < count:
            _stop_if_asked("")
            index = order[start : start + size]
            try:
                out = _as_output(run(index), len(index))
            except torch.OutOfMemoryError as exc:
                size = _out_of_memory(exc, size, settings, spec, device)
                continue
            if result is None:
                result = torch.empty((count, out.shape[1]), dtype=torch.float32, device=out.device)
            result[torch.from_numpy(index).to(out.device, non_blocking=out.device.type == "cuda")] = out
            start += len(index)
    assert result is not None
    return result.cpu().numpy()


def _text_length(item: Any) -> int:
    """Tokens of a tokenized text, characters of a text, of both texts of a pair."""
    return len(item[0]) + len(item[1]) if isinstance(item, tuple) else len(item)


def _as_output(value: Any, rows: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"the model returned {type(value).__name__}, expected a torch.Tensor")
    if value.ndim != 2 or value.shape[0] != rows:
        raise ModelError(f"the model returned shape {tuple(value.shape)} for {rows} rows; expected [{rows}, width]")
    if not value.is_floating_point():
        raise ModelError(f"the model returned dtype {value.dtype}; expected floating point")
    return value.float()


def _check_outputs(values: np.ndarray, spec: ModelSpec, shard: Shard, keys: pa.Array) -> None:
    if values.size == 0 or np.isfinite(values).all():  # one flat pass; the per-row one only to name a row
        return
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        first = keys[int(np.flatnonzero(~finite)[0])].as_py()
        raise ShardFailedError(
            f"shard {shard.shard_id}: the model produced NaN/inf for {int((~finite).sum())} rows (first key {first!r})",
            shard_id=shard.shard_id,
        )


def _write_marker(shard: Shard, settings: ShardSettings, spec: ModelSpec, stats: ShardStats, storage: Storage) -> None:
    layout = Layout(settings.output_uri)
    marker = {
        **stats.to_dict(),
        "shard": shard.to_dict(),
        "model_fingerprint": settings.model_fingerprint,
        "output_fingerprint": settings.output_fingerprint,
        "run_id": settings.run_id,
        "output": layout.shard(shard.shard_id),
        "errors": layout.errors(shard.shard_id) if stats.rows_error else None,
    }
    storage.write_json(layout.marker(shard.shard_id), marker)


def read_marker(storage: Storage, output_uri: str, shard_id: str) -> dict[str, Any] | None:
    """A shard's marker, or None if absent or unreadable (an unreadable marker means not done)."""
    uri = Layout(output_uri).marker(shard_id)
    try:
        return storage.read_json(uri)
    except BatchInferError:
        return None


def is_done(marker: dict[str, Any] | None, shard: Shard, settings: ShardSettings) -> bool:
    return bool(
        marker
        and marker.get("shard_id") == shard.shard_id
        and marker.get("model_fingerprint") == settings.model_fingerprint
        and marker.get("output_fingerprint") == settings.output_fingerprint
        and marker.get("rows_in") == shard.num_rows
    )
