"""Writing a shard's output off the critical path: Parquet encoding in a background thread."""

from __future__ import annotations

import queue
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer.config import OUTPUT_COMPRESSION


def _float_lists(schema: pa.Schema) -> set[str]:
    return {
        f.name
        for f in schema
        if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type))
        and pa.types.is_floating(f.type.value_type)
    }


def open_writer(path: str, schema: pa.Schema, compression: str = OUTPUT_COMPRESSION) -> pq.ParquetWriter:
    """A Parquet writer that spends no time on what cannot pay off for model outputs.

    Probability and embedding lists are distinct floats: a dictionary never
    fits (Arrow builds one, then falls back, and the file ends up larger) and
    min/max statistics help no reader. Skipping both halves the encoding time;
    other columns keep the defaults.
    """
    lists = _float_lists(schema)
    others = [name for name in schema.names if name not in lists]
    if not lists:
        return pq.ParquetWriter(path, schema, compression=compression)
    return pq.ParquetWriter(path, schema, compression=compression, use_dictionary=others, write_statistics=others)


class BackgroundWriter:
    """Appends tables to one Parquet file from a thread, so encoding overlaps the next chunk's forward passes.

    At most `depth` tables wait in the queue (memory stays bounded; `write`
    blocks when the thread falls behind). The first error of the thread is
    raised by the next `write` or by `close`; tables after it are dropped.
    """

    def __init__(self, path: str, *, compression: str = OUTPUT_COMPRESSION, depth: int = 2):
        self.path = path
        self.compression = compression
        self.rows = 0
        self._queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=depth)
        self._writer: pq.ParquetWriter | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batchinfer-writer", daemon=True)
        self._thread.start()

    def write(self, table: pa.Table) -> None:
        self._raise()
        self._queue.put(table)

    def close(self) -> None:
        """Write what is queued, close the file and raise the thread's error, if any."""
        if self._closed:
            self._raise()
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:  # noqa: BLE001 - reported like any write error
                self._error = self._error or exc
        self._raise()

    def abort(self) -> None:
        """Stop after what is queued and close the file, swallowing errors (the caller is failing already)."""
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    @property
    def opened(self) -> bool:
        return self._writer is not None

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            table = self._queue.get()
            if table is None:
                return
            if self._error is not None:
                continue  # keep draining so `write` never blocks forever
            try:
                if self._writer is None:
                    self._writer = open_writer(self.path, table.schema, self.compression)
                if table.num_rows:  # an empty table only fixes the schema (a shard whose rows all failed)
                    self._writer.write_table(table)
                    self.rows += table.num_rows
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc
