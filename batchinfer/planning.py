"""Listing partitions and planning shards, from Parquet metadata alone.

A shard is a run of whole row groups of one partition, about `shard_rows` rows.
Its id hashes the partition URI, the partition fingerprint (size + etag/mtime)
and the row range, so ids stay stable while the input is unchanged and a marker
stays valid when unrelated partitions change.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from batchinfer.errors import InputError, SchemaError
from batchinfer.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    """One input Parquet file and what its footer says."""

    uri: str
    size: int
    version: str
    num_rows: int
    row_groups: tuple[int, ...]
    schema: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return _digest(f"{self.size}|{self.version}")


@dataclass(frozen=True)
class Shard:
    """A deterministic slice of one partition: row groups [rg_start, rg_stop)."""

    shard_id: str
    partition_uri: str
    partition_fingerprint: str
    partition_index: int
    rg_start: int
    rg_stop: int
    row_start: int
    num_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _digest(text: str, size: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def read_partition(storage: Storage, uri: str, size: int, version: str) -> Partition:
    """Read one file's footer; a file that is not Parquet fails with its name."""
    try:
        with storage.open(uri) as handle:
            meta = pq.ParquetFile(handle).metadata
            schema = meta.schema.to_arrow_schema()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise InputError(f"{uri} is not a readable Parquet file ({_reason(exc)})", uri=uri) from exc
    row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    types = {name: str(schema.field(name).type) for name in schema.names}
    return Partition(uri=uri, size=size, version=version, num_rows=meta.num_rows, row_groups=row_groups, schema=types)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def list_partitions(storage: Storage, input_uri: str) -> list[Partition]:
    """All Parquet partitions under the input URI, sorted by URI."""
    files = storage.list_files(input_uri)
    if not files:
        raise InputError(f"no Parquet files under {input_uri}", uri=input_uri)
    return [read_partition(storage, f.uri, f.size, f.version) for f in files]


def plan_shards(partitions: list[Partition], shard_rows: int) -> list[Shard]:
    """Group consecutive row groups into shards of about `shard_rows` rows.

    A shard closes once it holds at least `shard_rows` rows, so a shard is never
    smaller than that except the last of its partition. Empty partitions give
    no shards.
    """
    shards: list[Shard] = []
    for index, part in enumerate(partitions):
        rg_start, row_start, rows = 0, 0, 0
        for rg, rg_rows in enumerate(part.row_groups):
            rows += rg_rows
            last = rg == len(part.row_groups) - 1
            if rows >= shard_rows or (last and rows > 0):
                shards.append(_make_shard(part, index, rg_start, rg + 1, row_start, rows))
                rg_start, row_start, rows = rg + 1, row_start + rows, 0
            elif rows == 0 and not last:
                rg_start = rg + 1  # skip empty leading row groups
    return shards


def _make_shard(part: Partition, index: int, rg_start: int, rg_stop: int, row_start: int, rows: int) -> Shard:
    shard_id = _digest(f"{part.uri}|{part.fingerprint}|{row_start}:{row_start + rows}")
    return Shard(
        shard_id=shard_id,
        partition_uri=part.uri,
        partition_fingerprint=part.fingerprint,
        partition_index=index,
        rg_start=rg_start,
        rg_stop=rg_stop,
        row_start=row_start,
        num_rows=rows,
    )


def resolve_columns(patterns: list[str], partition: Partition, what: str = "feature") -> list[str]:
    """Expand names and globs against a partition's columns, keeping schema order for globs."""
    names = list(partition.schema)
    resolved: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise SchemaError(f"{what} pattern {pattern!r} matches no column of {partition.uri}", uri=partition.uri)
        elif pattern in partition.schema:
            matched = [pattern]
        else:
            raise SchemaError(f"{what} column {pattern!r} is missing from {partition.uri}", uri=partition.uri)
        resolved.extend(m for m in matched if m not in resolved)
    return resolved


_NUMERIC_PREFIXES = ("int", "uint", "float", "double", "halffloat", "decimal", "bool")
_ARRAY = re.compile(r"^fixed_size_list<[^:>]*: (\w+)(?: not null)?>\[(\d+)\]$")


def array_width(dtype: str) -> int | None:
    """The width of a fixed-size list of numbers (all features in one column), else None."""
    match = _ARRAY.match(dtype)
    if match and match.group(1).startswith(_NUMERIC_PREFIXES):
        return int(match.group(2))
    return None


_TEXT_TYPES = ("string", "large_string", "string_view")


def check_schemas(
    partitions: list[Partition],
    *,
    key_column: str,
    features: list[str],
    text_columns: list[str],
    passthrough: list[str],
) -> None:
    """Every partition has every needed column, with usable types that agree across partitions."""
    needed = list(dict.fromkeys([key_column, *features, *text_columns, *passthrough]))
    reference: dict[str, tuple[str, str]] = {}
    for part in partitions:
        for column in needed:
            if column not in part.schema:
                raise SchemaError(f"column {column!r} is missing from {part.uri}", uri=part.uri)
            dtype = part.schema[column]
            if column in reference and reference[column][0] != dtype:
                first_type, first_uri = reference[column]
                raise SchemaError(
                    f"column {column!r} is {dtype} in {part.uri} but {first_type} in {first_uri}", uri=part.uri
                )
            reference.setdefault(column, (dtype, part.uri))
    for column in features:
        dtype, uri = reference[column]
        if not dtype.startswith(_NUMERIC_PREFIXES) and not (len(features) == 1 and array_width(dtype)):
            raise SchemaError(f"feature column {column!r} has type {dtype} in {uri}; expected a number", uri=uri)
    for text_column in text_columns:
        dtype, uri = reference[text_column]
        if dtype not in _TEXT_TYPES:
            raise SchemaError(f"text column {text_column!r} has type {dtype} in {uri}; expected a string", uri=uri)
