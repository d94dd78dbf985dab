"""Scoring one shard on one device and committing it: data first, marker last.

A shard's rows stream through in chunks; each chunk's rows are checked, scored
in mini-batches under `torch.inference_mode()`, and appended as a row group to a
temporary Parquet file. Only when every row is accounted for is the file moved
into place, then the errors file, then the marker. A failure at any point
leaves no marker, so the shard counts as not done.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
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
from batchinfer.compat import is_fatal_device_error, is_out_of_memory
from batchinfer.config import OUTPUT_COMPRESSION, text_columns
from batchinfer.devices import WORKERS, Device, DeviceWorkers, hold_device, stopping
from batchinfer.errors import BatchInferError, DeviceLostError, ModelError, ShardFailedError, Stopped
from batchinfer.layout import Layout
from batchinfer.models.base import ModelSpec, Predictor
from batchinfer.planning import Shard
from batchinfer.reader import feature_matrix, iter_shard, prefetch
from batchinfer.storage import Storage
from batchinfer.writer import BackgroundWriter

log = logging.getLogger(__name__)

# Rows read, checked and written together. 65,536 feature rows (16 MiB of float32 at 64 features) keep the
# reader, the model and the writer busy at once with a few chunks in memory. Text chunks are the pool that
# length sorting draws from: the larger, the less padding (BENCHMARKS.md), within a byte budget so that
# long documents do not fill memory.
CHUNK_ROWS_FEATURES = 65_536
CHUNK_ROWS_TEXT = 16_384
CHUNK_BYTES_TEXT = 16 * 2**20

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
    partition_types: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

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
    batch_size: int = 0  # rows per forward pass at the end of the shard (after any halving on out-of-memory)
    note: str = ""  # what else happened: the devices this shard moved off because they left the pool, and why
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
    prefer = workers.loaded(spec)
    broken = functools.partial(workers.broken, run)
    with hold_device(devices, shard.shard_id, run=run, prefer=prefer, broken=broken, on_wait=log.info) as lease:
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
            note=_moved_note(workers.broke_under(shard.shard_id, run)),
        )
        start = time.perf_counter()

        files: dict[str, Any] = {}

        def work() -> None:  # on the device's own thread: loading and scoring
            try:
                predictor, stats.model_loaded = workers.model(device, spec)
            except BatchInferError as exc:
                raise _LoadFailed(f"its model failed to load ({exc})") from exc
            files.update(_score_and_commit(shard, settings, spec, predictor, device, storage, stats))

        try:
            workers.run(device, work)
        except Exception as exc:
            why = _why_broken(exc)
            if why is None:
                raise
            workers.mark_broken(device, why, shard.shard_id, run)
            _raise_device_lost(shard, device, devices, why, broken(), exc)
        stats.seconds = round(time.perf_counter() - start, 6)
        stats.finished_at = _now()
        faults.point("commit.data")
        _write_marker(shard, settings, spec, stats, storage, files)
        faults.point("commit.marker")
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


class _LoadFailed(BatchInferError):
    """The model could not be loaded on the device the shard holds."""


def _why_broken(exc: BaseException) -> str | None:
    """Why the device must leave the pool after `exc`, or None when the device is fine (a bad row, a bug)."""
    if isinstance(exc, _LoadFailed):
        return str(exc)
    if is_fatal_device_error(exc):
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"a fatal device error ({type(exc).__name__}: {first[:200]})"
    return None


def _raise_device_lost(
    shard: Shard, device: Device, pool: list[Device], why: str, broken: dict[str, str], exc: BaseException
) -> None:
    """The shard failed with its device: retried (transient) while a healthy device is left, else final."""
    healthy = [d.name for d in pool if d.name not in broken]
    then = f"the shard goes to {', '.join(healthy)}" if healthy else "no healthy device is left"
    raise DeviceLostError(
        f"{device.name} left the pool: {why}; {then}",
        transient=bool(healthy),
        shard_id=shard.shard_id,
    ) from exc


def _moved_note(moved: dict[str, str]) -> str:
    return "; ".join(f"moved off {name}, which left the pool: {why}" for name, why in moved.items())


def _score_and_commit(
    shard: Shard,
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    storage: Storage,
    stats: ShardStats,
) -> dict[str, Any]:
    """Score, check and commit the shard's files; return what proves them unchanged later (`file_record`)."""
    layout = Layout(settings.output_uri)
    in_storage = Storage(shard.partition_uri, settings.storage_options)
    text = spec.input_kind == "text"
    inputs = settings.text_columns if text else list(settings.features)
    columns = list(dict.fromkeys([settings.key_column, *inputs, *settings.passthrough]))
    chunk_rows = CHUNK_ROWS_TEXT if text else CHUNK_ROWS_FEATURES
    error_keys: list[Any] = []
    error_reasons: list[str] = []
    batch = BatchSize(settings, spec, device)
    # Four stages overlap: the prefetch thread reads, decodes (and tokenizes, or on CUDA builds the pinned
    # feature matrix of) the next chunk; this thread queues a chunk's work on the device, then finishes the
    # chunk before it while the device runs; the writer thread encodes the finished chunk's output.
    batches = iter_shard(
        in_storage,
        shard,
        columns,
        chunk_rows,
        decode_threads=device.is_accelerator,
        partition_types=settings.partition_types,
        chunk_bytes=CHUNK_BYTES_TEXT if text else None,
    )
    chunks = _prepared(batches, settings, predictor, text, device)

    # A chunk whose rows all failed is written only if no chunk has rows: its schema may not be the
    # others' (a regression that does not declare its width shows it in its values).
    empty: list[pa.Table] = []
    wrote = False
    schema: list[pa.Schema] = []  # the file's, for merge-and-validate to compare across shards

    def finish(chunk: _Launched) -> None:
        nonlocal wrote
        table, bad_keys, bad_reasons = chunk.table(settings, spec, shard)
        _check_chunk(shard, settings, chunk.batch, table, bad_keys, first=not wrote)
        if table.num_rows:
            writer.write(table)
            if not wrote:
                schema.append(table.schema)
            wrote = True
        elif not empty:
            empty.append(table)
        error_keys.extend(bad_keys)
        error_reasons.extend(bad_reasons)
        stats.rows_in += chunk.batch.num_rows
        stats.rows_out += table.num_rows
        progress.emit(progress.Event("rows", shard.shard_id, rows=chunk.batch.num_rows))

    with storage.atomic_local_file(layout.shard(shard.shard_id), suffix=".parquet") as tmp:
        writer = BackgroundWriter(tmp)
        try:
            previous: _Launched | None = None
            for chunk in prefetch(chunks) if _read_ahead(device, text) else chunks:
                _stop_if_asked(shard.shard_id)
                faults.point("scoring")
                launched = _launch_chunk(chunk, settings, spec, predictor, device, batch)
                if previous is not None:
                    finish(previous)
                previous = launched
            if previous is not None:
                finish(previous)
            if not wrote and empty:
                writer.write(empty[0])
                schema.append(empty[0].schema)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        stats.batch_size = batch.size
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
    return {
        "file": storage.file_record(layout.shard(shard.shard_id)),
        "errors_file": storage.file_record(layout.errors(shard.shard_id)) if error_keys else None,
        "schema": hashlib.sha256(schema[0].remove_metadata().to_string().encode()).hexdigest()[:16],
    }


def _check_chunk(
    shard: Shard, settings: ShardSettings, batch: pa.RecordBatch, table: pa.Table, bad_keys: list[Any], *, first: bool
) -> None:
    """The checks merge-and-validate relies on, run once here on each chunk before it is written: row counts,
    the schema (on the first chunk with rows), and the checks of the output kind (batchinfer/outputs.py)."""
    where = shard.partition_uri  # the run's line names the shard already
    if table.num_rows + len(bad_keys) != batch.num_rows:
        raise ShardFailedError(
            f"{where}: row counts check failed: {table.num_rows} output + {len(bad_keys)} error rows "
            f"from {batch.num_rows} input rows",
            uri=where,
            shard_id=shard.shard_id,
        )
    if not table.num_rows:  # a chunk whose rows all failed: its columns may not show the width yet
        return
    try:
        if first:
            _check_schema(table, settings, str(batch.schema.field(settings.key_column).type))
        outputs.check(table, settings.output)
    except outputs.OutputInvalid as exc:
        raise ShardFailedError(f"{where}: {exc}", uri=where, shard_id=shard.shard_id) from None


def _check_schema(table: pa.Table, settings: ShardSettings, key_type: str) -> None:
    kinds = dict(outputs.expected_schema(settings.output, table.column_names))
    expected = [settings.key_column, *kinds, *settings.passthrough]
    if table.column_names != expected:
        raise outputs.OutputInvalid(f"schema check failed: columns {table.column_names}, expected {expected}")
    if str(table.schema.field(settings.key_column).type) != key_type:
        raise outputs.OutputInvalid(f"schema check failed: key type {table.schema.field(0).type}, expected {key_type}")
    for name, dtype in kinds.items():
        if not table.schema.field(name).type.equals(dtype):
            raise outputs.OutputInvalid(
                f"schema check failed: {name} is {table.schema.field(name).type}, expected {dtype}"
            )


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


@dataclass
class _Chunk:
    """A chunk as the prefetch thread hands it over: its rows, plus the token ids of its non-null texts, or
    (on CUDA) its feature matrix already built in pinned memory."""

    batch: pa.RecordBatch
    tokens: list[list[int]] | None = None
    features: _Features | None = None


@dataclass
class _Features:
    """A chunk's feature matrix, the rows that can be scored, and why the others cannot. `host` is the
    matrix as a tensor (pinned on CUDA, so that its copy to the device does not block)."""

    matrix: np.ndarray
    ok: np.ndarray
    reasons: list[str]
    host: torch.Tensor | None = None


def _read_ahead(device: Device, text: bool) -> bool:
    """Read the next chunk in a thread of its own, unless the model's threads already use every core: on
    the CPU, tabular chunks then read faster in turn than beside the forward passes (BENCHMARKS.md)."""
    if device.is_accelerator or text:
        return True
    return torch.get_num_threads() < (os.cpu_count() or 1)  # as devices.configure_threads counts them


def _prepared(
    batches: Iterator[pa.RecordBatch], settings: ShardSettings, predictor: Predictor, text: bool, device: Device
) -> Iterator[_Chunk]:
    """Chunks with what can be done ahead of the model done in the prefetch thread: tokens for text models,
    and on CUDA the feature matrix, built straight into pinned memory.

    On the CPU the matrix is built on the device's thread: built ahead, the freed matrices of the prefetch
    thread grew the resident memory by a quarter and nothing ran faster (BENCHMARKS.md).
    """
    pinned = device.torch_name.startswith("cuda")
    for batch, tokens in _with_tokens(batches, settings, predictor, text):
        features = _pinned_features(batch, list(settings.features)) if pinned and not text else None
        yield _Chunk(batch, tokens, features)


def _pinned_features(batch: pa.RecordBatch, names: list[str]) -> _Features:
    """The feature matrix in pinned memory, written there directly when it comes from separate columns.

    Each chunk gets its block from torch's pinned-memory cache, which hands the block out again only
    once the copies queued from it have run, so a reused block is never overwritten while a copy reads it.
    """
    rows = batch.num_rows
    if len(names) == 1 and pa.types.is_fixed_size_list(batch.schema.field(names[0]).type):
        matrix, ok, reasons = feature_matrix(batch, names)
        with warnings.catch_warnings():  # a read-only zero-copy view: pin_memory copies it
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(np.ascontiguousarray(matrix)).pin_memory()
        return _Features(host.numpy(), ok, reasons, host)
    # Column-major, as feature_matrix builds it: [features, rows] in memory, seen as [rows, features].
    host = torch.empty((len(names), rows), dtype=torch.float32, pin_memory=True).T
    matrix, ok, reasons = feature_matrix(batch, names, out=host.numpy())
    return _Features(matrix, ok, reasons, host)


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


class BatchSize:
    """A shard's rows per forward pass on its device: halved after out-of-memory, and kept for the rest of
    the shard. An automatic size is also remembered for the device, for the shards after this one."""

    def __init__(self, settings: ShardSettings, spec: ModelSpec, device: Device) -> None:
        self.settings, self.spec, self.device = settings, spec, device
        self.size = batch_size_for(settings, spec, device)

    def halve(self, failed: int) -> None:
        """`failed` rows ran out of memory (the exception is gone by now: it held that batch's tensors)."""
        smaller = max(1, min(self.size, failed // 2))
        if not self.settings.batch_size:
            with _auto_lock:
                key = (self.device.name, self.spec.fingerprint)
                _auto_batch[key] = min(_auto_batch.get(key, smaller), smaller)
        # No empty_cache(): the allocator freed its cached blocks and retried before it raised, and
        # empty_cache() would empty the cache of every GPU of the process, not just this one.
        log.warning("out of memory at batch size %d on %s; trying %d", failed, self.device.name, smaller)
        self.size = smaller


def _out_of_memory_at(exc: Exception, size: int) -> bool:
    """Whether a batch of `size` rows failed for lack of device memory, and halving may still help."""
    return size > 1 and is_out_of_memory(exc)


@dataclass
class _Pending:
    """A chunk's model outputs, on the host (pinned on CUDA) once `done` has passed: the copies back from
    the device may still be running when the next chunk's work is queued."""

    result: torch.Tensor | None
    done: Any = None  # a torch.cuda.Event recorded after the chunk's last copy

    def wait(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()  # this chunk's work only; the device goes on with the next chunk's
        if self.result is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self.result.numpy()


@dataclass
class _Launched:
    """A chunk whose work is queued on the device: `table` waits for its outputs and builds its rows."""

    batch: pa.RecordBatch
    ok: np.ndarray
    reasons: list[str]
    pending: _Pending

    def table(self, settings: ShardSettings, spec: ModelSpec, shard: Shard) -> tuple[pa.Table, list[Any], list[str]]:
        values = self.pending.wait()
        return _output_table(self.batch, self.ok, self.reasons, values, settings, spec, shard)


def _launch_chunk(
    chunk: _Chunk, settings: ShardSettings, spec: ModelSpec, predictor: Predictor, device: Device, batch: BatchSize
) -> _Launched:
    """Check one chunk's rows and queue its forward passes; on the CPU they have run when this returns."""
    rows = chunk.batch
    if spec.input_kind == "text":
        ok, reasons = _text_rows(rows, settings)
        good_texts = _texts(rows, settings, ok) if chunk.tokens is None else []
        pending = _launch_texts(good_texts, settings, spec, predictor, device, chunk.tokens, batch)
        return _Launched(rows, ok, reasons, pending)
    features = chunk.features
    if features is None:
        features = _Features(*feature_matrix(rows, list(settings.features)))
    ok = features.ok
    if ok.all():
        pending = _launch_matrix(features.matrix, settings, spec, predictor, device, batch, host=features.host)
    else:
        pending = _launch_matrix(features.matrix[ok], settings, spec, predictor, device, batch)
    return _Launched(rows, ok, features.reasons, pending)


def _output_table(
    batch: pa.RecordBatch,
    ok: np.ndarray,
    reasons: list[str],
    values: np.ndarray,
    settings: ShardSettings,
    spec: ModelSpec,
    shard: Shard,
) -> tuple[pa.Table, list[Any], list[str]]:
    """The output table of a chunk's good rows, and the keys/reasons of its bad rows."""
    keys = batch.column(settings.key_column)
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


def _score_chunk(
    batch: pa.RecordBatch,
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    shard: Shard,
    tokens: list[list[int]] | None = None,
) -> tuple[pa.Table, list[Any], list[str]]:
    """Score one chunk at once; return the output table of good rows and the keys/reasons of bad rows."""
    launched = _launch_chunk(
        _Chunk(batch, tokens), settings, spec, predictor, device, BatchSize(settings, spec, device)
    )
    return launched.table(settings, spec, shard)


def _predict_matrix(
    matrix: np.ndarray,
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    batch: BatchSize | None = None,
) -> np.ndarray:
    """`_launch_matrix`, waited for."""
    return _launch_matrix(matrix, settings, spec, predictor, device, batch or BatchSize(settings, spec, device)).wait()


def _launch_matrix(
    matrix: np.ndarray,
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    batch: BatchSize,
    *,
    host: torch.Tensor | None = None,
) -> _Pending:
    """Mini-batches of `matrix` through the model, into one preallocated output.

    On the CPU the batches are views of the matrix (column-major when the features came as separate
    columns); a predictor that needs contiguous input gets a copy of each batch only. On CUDA the chunk
    goes to the device in one copy from pinned memory (`host`, else pinned here), the batches are views
    of it there, and the outputs come back into pinned memory without blocking: `_Pending.wait` waits.
    """
    rows = matrix.shape[0]
    if rows == 0:
        return _Pending(None)
    cuda = device.torch_name.startswith("cuda")
    if host is None:
        with warnings.catch_warnings():  # a read-only zero-copy view is fine: nothing writes into the inputs
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(np.ascontiguousarray(matrix) if cuda else matrix)
        if cuda:
            host = host.pin_memory()
    strided_ok = bool(getattr(predictor, "accepts_strided", False))
    inputs = _to_device(host, device) if device.is_accelerator else host  # one copy per chunk
    result: torch.Tensor | None = None
    start = 0
    with torch.inference_mode():
        while start < rows:
            _stop_if_asked("")
            size = batch.size
            x = inputs[start : start + size]
            if not (strided_ok or x.is_contiguous()):
                x = x.contiguous()
            try:
                out = _as_output(predictor.predict(x), x.shape[0], device)
            except Exception as exc:
                if not _out_of_memory_at(exc, x.shape[0]):
                    raise
                out = None  # halved below, once the exception and the tensors its frames hold are gone
            if out is None:
                batch.halve(x.shape[0])
                continue
            if result is None:
                result = torch.empty((rows, out.shape[1]), dtype=torch.float32, pin_memory=cuda)
            # Without blocking only on CUDA, into pinned memory, waited for by the event below (MPS copies do not wait).
            result[start : start + x.shape[0]].copy_(out, non_blocking=cuda)
            start += x.shape[0]
    return _Pending(result, _recorded(device) if cuda else None)


def _to_device(host: torch.Tensor, device: Device) -> torch.Tensor:
    """`host` on the device in one plain copy: a column-major matrix goes as its [features, rows] block and is
    seen as [rows, features] again there (without blocking on CUDA, where `host` is pinned)."""
    cuda = device.torch_name.startswith("cuda")
    if not host.is_contiguous() and host.T.is_contiguous():
        return host.T.to(device.torch, non_blocking=cuda).T
    return host.to(device.torch, non_blocking=cuda)


def _recorded(device: Device) -> Any:
    """A CUDA event recorded now on the device's current stream: it passes once the work queued so far has run."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device.torch))
    return event


def _predict_texts(
    texts: list[str],
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    ids: list[list[int]] | None = None,
    batch: BatchSize | None = None,
) -> np.ndarray:
    """`_launch_texts`, waited for."""
    batch = batch or BatchSize(settings, spec, device)
    return _launch_texts(texts, settings, spec, predictor, device, ids, batch).wait()


def _launch_texts(
    texts: list[str],
    settings: ShardSettings,
    spec: ModelSpec,
    predictor: Predictor,
    device: Device,
    ids: list[list[int]] | None,
    batch: BatchSize,
) -> _Pending:
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
        return _Pending(None)
    sizes = ids if ids is not None else texts
    order = np.argsort(np.fromiter((_text_length(t) for t in sizes), dtype=np.int64, count=count), kind="stable")

    def run(index: np.ndarray) -> Any:
        if ids is not None:
            return encode_ids([ids[i] for i in index])  # type: ignore[misc]
        return predictor.predict([texts[i] for i in index])

    cuda = device.torch_name.startswith("cuda")
    # The rows are put back in input order where the model left them (on the GPU, say), and the whole
    # chunk comes back to the host once: no wait for the device after every batch.
    result: torch.Tensor | None = None
    start = 0
    with torch.inference_mode():
        while start < count:
            _stop_if_asked("")
            index = order[start : start + batch.size]
            try:
                out = _as_output(run(index), len(index), device)
            except Exception as exc:
                if not _out_of_memory_at(exc, len(index)):
                    raise
                out = None  # halved below, once the exception and the tensors its frames hold are gone
            if out is None:
                batch.halve(len(index))
                continue
            if result is None:
                result = torch.empty((count, out.shape[1]), dtype=torch.float32, device=out.device)
            result[torch.from_numpy(index).to(out.device, non_blocking=cuda)] = out
            start += len(index)
        assert result is not None
        if not cuda:
            return _Pending(result.cpu())
        host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(result, non_blocking=True)
    return _Pending(host, _recorded(device))


def _text_length(item: Any) -> int:
    """Tokens of a tokenized text, characters of a text, of both texts of a pair."""
    return len(item[0]) + len(item[1]) if isinstance(item, tuple) else len(item)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _as_output(value: Any, rows: int, device: Device | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"the model returned {type(value).__name__}, expected a torch.Tensor")
    if value.ndim != 2 or value.shape[0] != rows:
        raise ModelError(f"the model returned shape {tuple(value.shape)} for {rows} rows; expected [{rows}, width]")
    if not value.is_floating_point():
        raise ModelError(f"the model returned dtype {value.dtype}; expected floating point")
    # Refused before anything reads it: a copy from another device is not waited for by this device's event.
    if device is not None and not _same_device(value.device, device.torch):
        raise ModelError(
            f"the model returned its output on {value.device}, but the shard runs on {device.name}; "
            f"load(device) must put the model on the device it is given"
        )
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


# Version 2: the marker records the checks its shard passed at commit and the size and checksum of its files.
MARKER_VERSION = 2
# What a committed shard's marker records as passed; merge-and-validate trusts a marker that lists them all.
SHARD_CHECKS = ("schema", "row counts", "keys match the input", "finite", "output kind")


def _write_marker(
    shard: Shard,
    settings: ShardSettings,
    spec: ModelSpec,
    stats: ShardStats,
    storage: Storage,
    files: dict[str, Any],
) -> None:
    layout = Layout(settings.output_uri)
    marker = {
        **stats.to_dict(),
        "marker_version": MARKER_VERSION,
        "shard": shard.to_dict(),
        "model_fingerprint": settings.model_fingerprint,
        "output_fingerprint": settings.output_fingerprint,
        "run_id": settings.run_id,
        "output": layout.shard(shard.shard_id),
        "errors": layout.errors(shard.shard_id) if stats.rows_error else None,
        "checks": list(SHARD_CHECKS),
        "file": files.get("file"),
        "errors_file": files.get("errors_file"),
        "schema": files.get("schema"),
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
    """The marker proves the shard done with these settings, and records its commit-time checks and files."""
    return bool(
        marker
        and marker.get("marker_version", 1) >= MARKER_VERSION
        and isinstance(marker.get("file"), dict)
        and set(SHARD_CHECKS) <= set(marker.get("checks") or ())
        and (marker.get("rows_error") == 0 or isinstance(marker.get("errors_file"), dict))
        and marker.get("shard_id") == shard.shard_id
        and marker.get("model_fingerprint") == settings.model_fingerprint
        and marker.get("output_fingerprint") == settings.output_fingerprint
        and marker.get("rows_in") == shard.num_rows
    )
