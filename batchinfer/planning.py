"""Listing partitions and planning shards, from Parquet footers and the partitions' content.

A partition is a file whose footer says it is Parquet, whatever its name (Spark writes `part-00000`).
Its fingerprint comes from its content: on object stores the store's checksum of the bytes (the ETag),
on a local disk a hash of its bytes, taken when the file is new or was written since the output's
manifest recorded it. A touch or a copy keeps it; a rewrite changes it (BENCHMARKS.md, "Fingerprints").

A shard is a run of whole row groups of one partition, about `shard_rows` rows. Its id hashes the
partition URI, the partition fingerprint and the row range, so ids stay stable while the input is
unchanged and a marker stays valid when unrelated partitions change.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import posixpath
import re
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer.errors import InputError, SchemaError
from batchinfer.partitions import PartitionFilter, arrow_type, hive_segments, typed_value
from batchinfer.storage import FileInfo, Storage, hash_file

log = logging.getLogger(__name__)

MAGIC = b"PAR1"
# One read of a file's last 64 KiB holds the footer of most files; a larger footer takes a second read.
TAIL_BYTES = 64 << 10


@dataclass(frozen=True)
class Partition:
    """One input Parquet file and what its footer says."""

    uri: str
    size: int
    version: str
    num_rows: int
    row_groups: tuple[int, ...]
    schema: dict[str, str] = field(default_factory=dict)
    content: str = ""  # the store's checksum, a hash of a local file's bytes, else a digest of the footer
    stamp: str = ""  # FileInfo.stamp when the footer was read
    relative: str = ""  # the path under the input folder
    hive: tuple[tuple[str, str | None], ...] = ()  # `key=value` folders above it

    @property
    def fingerprint(self) -> str:
        return _digest(f"{self.size}|{self.content or self.version}")

    @property
    def part(self) -> str:
        """Its merged part under predictions/: its own path under the input, so no other partition renames it."""
        name = self.relative or posixpath.basename(self.uri)
        return name if name.endswith(".parquet") else f"{name}.parquet"

    def columns(self, types: dict[str, str] | None = None) -> dict[str, str]:
        """The file's columns and its partition columns, by name and Arrow type."""
        own = dict(self.schema)
        for name, _ in self.hive:
            own.setdefault(name, str(arrow_type(types or {}, name)))
        return own


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
    part: str = ""  # the partition's merged part (Partition.part)
    hive: tuple[tuple[str, str | None], ...] = ()  # the partition's `key=value` folders

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "hive": [list(pair) for pair in self.hive]}  # dataclasses.asdict is much slower

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        fields = cls.__dataclass_fields__
        values = {k: data[k] for k in fields if k in data}
        values["hive"] = tuple(tuple(pair) for pair in values.get("hive") or ())
        return cls(**values)


def _digest(text: str, size: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def read_footer(storage: Storage, info: FileInfo) -> bytes | None:
    """The file's Parquet footer (metadata, its length, the magic), or None when the file is not Parquet."""
    if info.size < 12:
        return None
    start = max(info.size - TAIL_BYTES, 0)
    tail = storage.read_range(info.uri, start, info.size)
    if tail[-4:] != MAGIC:
        return None
    length = struct.unpack("<I", tail[-8:-4])[0]
    if length + 12 > info.size:
        return None
    if length + 8 > len(tail):
        tail = storage.read_range(info.uri, info.size - length - 8, info.size)
    return tail[-(length + 8) :]


def read_partition(storage: Storage, info: FileInfo, *, named: bool = True) -> Partition | None:
    """Read one file's footer. A file that is not Parquet fails with its name, unless `named` is False
    (no `.parquet` in its name) and it does not start like Parquet either: then it is not input (None)."""
    uri = info.uri
    try:
        footer = read_footer(storage, info)
        if footer is None:
            if not named and storage.read_range(uri, 0, 4) != MAGIC:
                return None
            with storage.open(uri) as handle:  # pyarrow's own words for what is wrong
                pq.ParquetFile(handle)
            raise ValueError("Parquet magic bytes not found in footer")
        meta = pq.ParquetFile(pa.BufferReader(MAGIC + footer)).metadata
        schema = meta.schema.to_arrow_schema()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise InputError(f"{uri} is not a readable Parquet file ({_reason(exc)})", uri=uri) from exc
    row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    types = {name: str(schema.field(name).type) for name in schema.names}
    content = info.checksum or _local_content(storage, uri, footer)
    return Partition(
        uri=uri,
        size=info.size,
        version=info.version,
        num_rows=meta.num_rows,
        row_groups=row_groups,
        schema=types,
        content=content,
        stamp=info.stamp,
        relative=info.relative,
        hive=hive_segments(info.relative, uri),
    )


# New local files are hashed a few at a time: reading from disk, more requests in flight finish sooner.
HASH_THREADS = 4


def _local_content(storage: Storage, uri: str, footer: bytes) -> str:
    """A hash of every byte on a local disk: a rewrite of one value can keep the size and the footer, whose
    statistics are only each row group's bounds. A store without checksums has only its footer to go by."""
    if storage.is_local:
        return hash_file(storage.path(uri))
    return f"footer:{hashlib.sha256(footer).hexdigest()}"


def current_fingerprint(storage: Storage, part: Partition) -> str:
    """The partition's fingerprint as its file is now ("" when it is no longer Parquet)."""
    storage.invalidate(part.uri)
    try:
        info = storage.info(part.uri)
        if info.stamp and info.stamp == part.stamp and info.size == part.size:
            return part.fingerprint  # not written since it was planned (see KnownFooters)
        found = read_partition(storage, replace(info, relative=part.relative))
    except InputError:  # gone, or no longer Parquet
        return ""
    return found.fingerprint if found else ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


@dataclass(frozen=True)
class KnownFooters:
    """What an earlier run read in the footers of its partitions (its manifest), by URI.

    A file whose size and stamp (the store's checksum; on a local disk its inode and its modification
    and change times, which any write and `utime` update) are the ones recorded is the same file, and
    its footer is not read again.
    """

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    schemas: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | None) -> KnownFooters:
        manifest = manifest or {}
        entries = {e["uri"]: e for e in manifest.get("partitions") or [] if isinstance(e, dict) and e.get("uri")}
        schemas = manifest.get("schemas") if isinstance(manifest.get("schemas"), dict) else {}
        return cls(entries, schemas)

    def partition(self, info: FileInfo) -> Partition | None:
        entry = self.entries.get(info.uri)
        if not entry or not info.stamp or entry.get("stamp") != info.stamp or entry.get("size") != info.size:
            return None
        rows, schema, content = entry.get("row_group_rows"), self.schemas.get(entry.get("schema")), entry.get("content")
        if not isinstance(rows, list) or not isinstance(schema, dict) or not content:
            return None
        return Partition(
            uri=info.uri,
            size=info.size,
            version=info.version,
            num_rows=sum(rows),
            row_groups=tuple(rows),
            schema=dict(schema),
            content=content,
            stamp=info.stamp,
            relative=info.relative,
            hive=hive_segments(info.relative, info.uri),
        )


def schema_digest(schema: dict[str, str]) -> str:
    return _digest(json.dumps(schema, sort_keys=True))


def list_partitions(
    storage: Storage,
    input_uri: str,
    *,
    partitions: str | None = None,
    partition_types: dict[str, str] | None = None,
    known: KnownFooters | None = None,
) -> list[Partition]:
    """All Parquet partitions under the input URI that the partition filter selects, sorted by URI.

    Footers are read for the files `known` does not hold as they are now.
    """
    selected = PartitionFilter(partitions, partition_types)
    files = storage.list_files(input_uri, keep_folder=selected.folder_may_hold if selected else None)
    if selected:
        listed = files
        files = [f for f in files if selected.selects(hive_segments(f.relative, f.uri), f.uri)]
        if not files:
            _no_such_partition_column(selected, listed, partitions, input_uri)
    known = known or KnownFooters()
    found = [known.partition(info) for info in files]
    # Only the files the manifest does not hold as they are now are read, and hashed, a few at a time.
    new = [info for info, part in zip(files, found, strict=True) if part is None]
    read = iter(
        storage.map(
            lambda i: read_partition(storage, i, named=i.uri.endswith(".parquet")), new, local_threads=HASH_THREADS
        )
    )
    found = [part if part is not None else next(read) for part in found]
    result = [part for part in found if part is not None]
    skipped = len(files) - len(result)
    if skipped:
        log.info("%d file(s) under %s are not Parquet (no Parquet footer); skipped", skipped, input_uri)
    if not result:
        chosen = f" selected by --partitions {partitions!r}" if selected else ""
        raise InputError(f"no Parquet files{chosen} under {input_uri}", uri=input_uri)
    _check_part_names(result)
    for part in result:  # a bad value fails here, naming its file, rather than in a shard
        for name, value in part.hive:
            typed_value(name, value, partition_types or {}, part.uri)
    return result


def _no_such_partition_column(selected: PartitionFilter, listed: list[FileInfo], text: str | None, uri: str) -> None:
    """A filter that selects nothing because it names a column no folder has: say which (a misspelling)."""
    have = selected.folder_keys | {name for f in listed for name, _ in hive_segments(f.relative, f.uri)}
    missing = [column for column in selected.terms if column not in have]
    if missing and not selected.pruned:  # a pruned folder may hold the column further down
        found = ", ".join(sorted(have)) if have else "none"
        raise InputError(
            f"--partitions {text!r} names {', '.join(map(repr, missing))}, which no `key=value` folder under {uri} "
            f"has (its partition columns: {found})",
            uri=uri,
        )


def _check_part_names(partitions: list[Partition]) -> None:
    seen: dict[str, str] = {}
    for part in partitions:
        if part.part in seen:
            raise InputError(
                f"{seen[part.part]} and {part.uri} would both be predictions/{part.part}; rename one of them",
                uri=part.uri,
            )
        seen[part.part] = part.uri


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
        part=part.part,
        hive=part.hive,
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
    partition_types: dict[str, str] | None = None,
) -> None:
    """Every partition has every needed column, with usable types that agree across partitions.

    Partition columns (`key=value` folders) count as columns; the key is never one (one value per file).
    """
    needed = list(dict.fromkeys([key_column, *features, *text_columns, *passthrough]))
    reference: dict[str, tuple[str, str]] = {}
    checked: set[tuple[Any, ...]] = set()
    for part in partitions:
        layout = (tuple(part.schema.items()), tuple(name for name, _ in part.hive))
        if layout in checked:  # a thousand partitions usually share one schema: check it once
            continue
        checked.add(layout)
        columns = part.columns(partition_types)
        hive = {name for name, _ in part.hive}
        for column in needed:
            if column not in columns:
                raise SchemaError(f"column {column!r} is missing from {part.uri}", uri=part.uri)
            if column in hive and column in part.schema:
                raise SchemaError(
                    f"column {column!r} is both in {part.uri} and in its path ({column}=...); rename one of them",
                    uri=part.uri,
                )
            if column == key_column and column in hive:
                raise SchemaError(
                    f"key column {key_column!r} is a partition column of {part.uri}: one value for all its rows",
                    uri=part.uri,
                )
            dtype = columns[column]
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
