"""Listing and shard planning: shards tile each partition exactly, in whole row groups, named by content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer.planning import Partition, Shard, list_partitions, plan_shards
from batchinfer.reader import iter_shard
from batchinfer.storage import Storage
from tests.core_helpers import GOOD_MODEL, feature_table, run_core, write_features

# (rows, row group size) per partition: uneven sizes, a partial last row group, one tiny partition.
LAYOUT = [(1_000, 128), (450, 100), (37, 10)]
SHARD_ROWS = 300


def write_dataset(folder: Path) -> list[Path]:
    paths, start = [], 0
    for index, (rows, group) in enumerate(LAYOUT):
        paths.append(write_features(folder / f"part-{index:05d}.parquet", np.arange(start, start + rows), group))
        start += rows
    return paths


def plan(folder: Path | str, shard_rows: int = SHARD_ROWS) -> tuple[list[Partition], list[Shard]]:
    partitions = list_partitions(Storage(str(folder)), str(folder))
    return partitions, plan_shards(partitions, shard_rows)


@pytest.fixture
def dataset(tmp_path: Path) -> list[Path]:
    return write_dataset(tmp_path)


def of(shards: list[Shard], index: int) -> list[Shard]:
    return sorted((s for s in shards if s.partition_index == index), key=lambda s: s.row_start)


@pytest.mark.usefixtures("dataset")
def test_shards_tile_each_partition_without_gaps_or_overlap(tmp_path: Path) -> None:
    """Row and row-group ranges are contiguous from 0 to the end, so every row is scored exactly once."""
    partitions, shards = plan(tmp_path)
    assert [p.num_rows for p in partitions] == [rows for rows, _ in LAYOUT]
    for index, part in enumerate(partitions):
        own = of(shards, index)
        assert sum(s.num_rows for s in own) == part.num_rows
        assert [s.row_start for s in own] == list(np.cumsum([0] + [s.num_rows for s in own[:-1]]))
        assert [s.rg_start for s in own] == [0] + [s.rg_stop for s in own[:-1]]
        assert own[-1].rg_stop == len(part.row_groups)
        for shard in own:
            assert shard.num_rows == sum(part.row_groups[shard.rg_start : shard.rg_stop])
            assert shard.row_start == sum(part.row_groups[: shard.rg_start])


def test_reading_every_shard_yields_each_input_row_once(tmp_path: Path, dataset: list[Path]) -> None:
    """The rows actually read per shard, concatenated, are the partition's rows in order: no overlap, no gap."""
    partitions, shards = plan(tmp_path)
    storage = Storage(str(tmp_path))
    for index, path in enumerate(dataset):
        keys: list[int] = []
        for shard in of(shards, index):
            read = [k for b in iter_shard(storage, shard, ["id"], 64) for k in b.column("id").to_pylist()]
            assert len(read) == shard.num_rows
            keys.extend(read)
        assert keys == pq.read_table(path, columns=["id"]).column("id").to_pylist()


@pytest.mark.usefixtures("dataset")
def test_shards_are_whole_row_groups_of_about_shard_rows(tmp_path: Path) -> None:
    """A shard closes at the first row group that reaches shard_rows; only a partition's last shard is smaller."""
    partitions, shards = plan(tmp_path)
    for index, part in enumerate(partitions):
        own = of(shards, index)
        for shard in own[:-1]:
            assert shard.num_rows >= SHARD_ROWS
            assert shard.num_rows - part.row_groups[shard.rg_stop - 1] < SHARD_ROWS
        assert own[-1].num_rows <= SHARD_ROWS + max(part.row_groups)
    # 1,000 rows in groups of 128: 3 groups (384 rows) reach 300, so shards of 384, 384 and the rest, 232.
    assert [s.num_rows for s in of(shards, 0)] == [384, 384, 232]


def test_empty_row_groups_are_skipped_but_every_row_is_covered() -> None:
    """Zero-row groups, leading, inner or trailing, neither open a shard nor lose rows."""
    groups = (0, 100, 0, 250, 40, 0, 300, 0)
    part = Partition(uri="/data/p.parquet", size=1, version="1", num_rows=sum(groups), row_groups=groups)
    shards = plan_shards([part], 300)
    assert sum(s.num_rows for s in shards) == part.num_rows
    covered = {rg for s in shards for rg in range(s.rg_start, s.rg_stop)}
    assert {rg for rg, rows in enumerate(groups) if rows} <= covered
    assert all(s.num_rows > 0 for s in shards)
    spans = sorted((s.rg_start, s.rg_stop) for s in shards)
    assert all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.usefixtures("dataset")
def test_partition_smaller_than_shard_rows_is_one_shard(tmp_path: Path) -> None:
    partitions, shards = plan(tmp_path, shard_rows=10_000)
    assert len(shards) == len(partitions)
    for index, part in enumerate(partitions):
        (shard,) = of(shards, index)
        assert (shard.rg_start, shard.rg_stop, shard.row_start, shard.num_rows) == (
            0,
            len(part.row_groups),
            0,
            part.num_rows,
        )


@pytest.mark.usefixtures("dataset")
def test_ids_are_stable_and_change_only_with_the_partition_content(tmp_path: Path) -> None:
    """Same input, same ids; rewriting one file changes its shards' ids and no other partition's."""
    _, first = plan(tmp_path)
    _, again = plan(tmp_path)
    assert [s.shard_id for s in first] == [s.shard_id for s in again]
    assert len({s.shard_id for s in first}) == len(first)

    rows, group = LAYOUT[1]
    write_features(tmp_path / "part-00001.parquet", np.arange(1_000, 1_000 + rows), group, shift=1.0)
    _, changed = plan(tmp_path)
    assert [s.num_rows for s in changed] == [s.num_rows for s in first]  # same layout, new content
    for index in (0, 2):
        assert [s.shard_id for s in of(changed, index)] == [s.shard_id for s in of(first, index)]
    assert not {s.shard_id for s in of(changed, 1)} & {s.shard_id for s in of(first, 1)}


def test_listing_is_sorted_and_skips_hidden_and_underscore_files(tmp_path: Path) -> None:
    """Hidden files, `_` files and folders (temp files, _SUCCESS, _delta_log) and non-Parquet files are not input."""
    table = feature_table(np.arange(3))
    for name in ("b.parquet", "a.parquet", "sub/c.parquet", ".a.parquet", "_tmp.parquet", "_sub/d.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / name)
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not data")
    names = [Path(p.uri).relative_to(tmp_path).as_posix() for p in plan(tmp_path)[0]]
    assert names == ["a.parquet", "b.parquet", "sub/c.parquet"]
    globbed = list_partitions(Storage(str(tmp_path)), f"{tmp_path}/*.parquet")
    assert [Path(p.uri).name for p in globbed] == ["a.parquet", "b.parquet"]


def test_empty_partitions_give_no_shards_and_do_not_break_the_run(tmp_path: Path) -> None:
    """A 0-row file (with one empty row group, or none) plans no shard; the run scores the other rows."""
    data = tmp_path / "data"
    empty = pa.table(
        {"id": pa.array([], pa.int64()), "x0": pa.array([], pa.float32()), "x1": pa.array([], pa.float32())}
    )
    data.mkdir()
    pq.write_table(empty, data / "a-empty.parquet")  # pyarrow: one row group of 0 rows
    pl.from_arrow(empty).write_parquet(data / "c-empty.parquet")  # polars: no row group at all
    write_features(data / "b-rows.parquet", np.arange(250), 100)
    partitions, shards = plan(data, shard_rows=100)
    assert [p.num_rows for p in partitions] == [0, 250, 0]
    assert {s.partition_index for s in shards} == {1}

    output = tmp_path / "out"
    _, report = run_core(input_uri=str(data), output_uri=str(output), model=GOOD_MODEL, shard_rows=100)
    assert report.ok, report.failures
    assert (report.rows, report.rows_out, report.shards) == (250, 250, 3)
    merged = pl.read_parquet(output / "predictions" / "*.parquet")
    assert sorted(merged["id"].to_list()) == list(range(250))
    assert (output / "_SUCCESS").exists()
