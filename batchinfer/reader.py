"""Streaming a shard's rows: row-group batches of only the needed columns, prefetched."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer.errors import InputError
from batchinfer.partitions import constant_column
from batchinfer.planning import Shard
from batchinfer.storage import Storage, is_transient, storage_error

T = TypeVar("T")


def iter_shard(
    storage: Storage,
    shard: Shard,
    columns: list[str],
    chunk_rows: int,
    *,
    decode_threads: bool = False,
    partition_types: dict[str, str] | None = None,
    chunk_bytes: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the shard's row groups; never the whole partition at once.

    Columns named after the partition's `key=value` folders are not in the file: each batch gets
    them as one value repeated, typed by `partition_types` (strings otherwise).
    `decode_threads`: decode a chunk's columns on Arrow's thread pool. Worth it only where the cores are
    not busy with the model (an accelerator); on the CPU the prefetch thread alone overlaps the model.
    `chunk_bytes`: fewer rows per batch where the columns' uncompressed size (from the footer) would pass it.
    """
    uri = shard.partition_uri
    hive = {name: value for name, value in shard.hive if name in columns}
    with storage.open(uri) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            expected = sum(parquet.metadata.row_group(i).num_rows for i in range(shard.rg_start, shard.rg_stop))
            if shard.rg_stop > parquet.metadata.num_row_groups or expected != shard.num_rows:
                raise InputError(f"{uri} changed since it was planned; plan again", uri=uri, shard_id=shard.shard_id)
            hive = {name: value for name, value in hive.items() if name not in parquet.schema_arrow.names}
            if chunk_bytes:
                chunk_rows = rows_within(parquet.metadata, shard, columns, chunk_rows, chunk_bytes)
            batches = parquet.iter_batches(
                batch_size=chunk_rows,
                row_groups=range(shard.rg_start, shard.rg_stop),
                columns=[c for c in columns if c not in hive],
                use_threads=decode_threads,
            )
            for batch in batches:
                yield _with_partition_columns(batch, columns, hive, partition_types or {}) if hive else batch
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):
                raise storage_error(exc, uri, "reading") from exc
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{uri} is corrupt or unreadable ({first})", uri=uri, shard_id=shard.shard_id) from exc


def rows_within(metadata: pq.FileMetaData, shard: Shard, columns: list[str], most: int, budget: int) -> int:
    """Rows per chunk, at most `most`, whose `columns` hold about `budget` bytes uncompressed on average."""
    names = set(columns)
    size = 0
    for i in range(shard.rg_start, shard.rg_stop):
        group = metadata.row_group(i)
        size += sum(
            group.column(j).total_uncompressed_size
            for j in range(group.num_columns)
            if group.column(j).path_in_schema in names
        )
    per_row = size / max(shard.num_rows, 1)
    return max(1, min(most, int(budget / per_row))) if per_row else most


def _with_partition_columns(
    batch: pa.RecordBatch, columns: list[str], hive: dict[str, str | None], types: dict[str, str]
) -> pa.RecordBatch:
    arrays = [
        constant_column(name, hive[name], types, batch.num_rows) if name in hive else batch.column(name)
        for name in columns
    ]
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run `items` in a background thread, `depth` ahead, so reading overlaps compute."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry: tuple[str, object]) -> bool:
        """Queue `entry` unless the consumer has gone (a full queue must never hold this thread for good)."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", done))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(("error", exc))

    thread = threading.Thread(target=produce, name="batchinfer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        close = getattr(items, "close", None)
        thread.join(timeout=5)
        if close and not thread.is_alive():
            close()


def feature_matrix(
    batch: pa.RecordBatch, features: list[str], *, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A float32 [rows, features] matrix, a mask of rows that can be scored, and why the others cannot.

    One fixed-size-list column of float32 converts without a copy (C order).
    Separate columns are copied into a column-major (Fortran-ordered) matrix:
    each column lands in one contiguous run, several times faster than
    scattering it across rows, and `torch.nn.Linear` reads either layout
    without a further copy. `out`, a [rows, features] float32 array (say, a
    view of pinned memory), receives the separate columns instead of a new matrix.
    """
    rows = batch.num_rows
    if len(features) == 1 and pa.types.is_fixed_size_list(batch.schema.field(features[0]).type):
        column = batch.column(features[0])
        width = column.type.list_size
        values = column.flatten()  # no copy without nulls; `.values` would ignore a slice of the column
        matrix = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)
        if column.null_count:
            full = np.full((rows, width), np.nan, dtype=np.float32)
            valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))
            full[valid] = matrix.reshape(-1, width)
            matrix = full
        else:
            matrix = matrix.reshape(rows, width)
        nulls = {features[0]: np.asarray(column.is_null().to_numpy(zero_copy_only=False))} if column.null_count else {}
    else:
        matrix = np.empty((len(features), rows), dtype=np.float32).T if out is None else out
        if matrix.shape != (rows, len(features)) or matrix.dtype != np.float32:
            raise ValueError(f"out must be float32 [{rows}, {len(features)}], not {matrix.dtype} {matrix.shape}")
        nulls = {}
        for j, name in enumerate(features):
            column = batch.column(name)
            if column.null_count:
                nulls[name] = np.asarray(column.is_null().to_numpy(zero_copy_only=False))
                column = column.fill_null(False if pa.types.is_boolean(column.type) else 0)
            matrix[:, j] = column.to_numpy(zero_copy_only=False)
    # One flat pass settles the usual case; a per-row reduction over a C-ordered matrix is slower.
    if np.isfinite(matrix).all():
        ok = np.ones(rows, dtype=bool)
    else:
        ok = np.isfinite(matrix).all(axis=1)
    for mask in nulls.values():
        ok &= ~mask
    reasons: list[str] = []
    if not ok.all():
        for i in np.flatnonzero(~ok):
            reasons.append(_row_reason(i, matrix, nulls, features))
    return matrix, ok, reasons


def _row_reason(i: int, matrix: np.ndarray, nulls: dict[str, np.ndarray], features: list[str]) -> str:
    for name, mask in nulls.items():
        if mask[i]:
            return f"column {name!r} is null"
    row = matrix[i]
    j = int(np.flatnonzero(~np.isfinite(row))[0])
    name = features[j] if len(features) > 1 else f"{features[0]}[{j}]"
    value = "NaN" if np.isnan(row[j]) else ("inf" if row[j] > 0 else "-inf")
    return f"column {name!r} is {value}"
