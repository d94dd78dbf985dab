"""Properties over random partition layouts: planning covers every row once; validation misses no damage.

Layouts vary the number of files, their row-group sizes (including empty row
groups and files with none), and the shard size. Each property is checked on
real Parquet files where it matters.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchinfer.config import make_config
from batchinfer.errors import ConfigError, SchemaError
from batchinfer.layout import Layout, check_shard_id
from batchinfer.merge import merge_and_validate
from batchinfer.models.mlp import MLP, save_checkpoint
from batchinfer.pipeline import check_keys, prepare, run_shard
from batchinfer.planning import Partition, list_partitions, plan_shards
from batchinfer.reader import iter_shard
from batchinfer.storage import Storage

# Run after a Prefect test server started in the same session, the core's log records meet Prefect's
# API handler outside any flow run, which warns once per record; here that is noise.
pytestmark = pytest.mark.filterwarnings("ignore:Logger 'batchinfer:UserWarning")

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A layout: per file, its row-group sizes ([] = a file with no row groups at all).
row_group_sizes = st.lists(st.integers(min_value=0, max_value=40), min_size=0, max_size=5)
layouts = st.lists(row_group_sizes, min_size=1, max_size=8)


def check_coverage(partitions: list[Partition], shard_rows: int) -> list:
    """Plan and check that shards tile each partition's rows exactly, in whole row groups."""
    shards = plan_shards(partitions, shard_rows)
    assert len({s.shard_id for s in shards}) == len(shards)
    for index, part in enumerate(partitions):
        mine = [s for s in shards if s.partition_index == index]
        starts = np.cumsum([0, *part.row_groups])
        at = 0
        for position, shard in enumerate(mine):
            check_shard_id(shard.shard_id)
            assert shard.partition_uri == part.uri and shard.num_rows > 0
            assert shard.row_start == at, "a gap or an overlap between shards"
            assert starts[shard.rg_stop] - starts[shard.rg_start] == shard.num_rows
            assert starts[shard.rg_start] == shard.row_start
            if position < len(mine) - 1:
                assert shard.num_rows >= shard_rows, "only a partition's last shard may be short"
            at += shard.num_rows
        assert at == part.num_rows, "rows left out of every shard"
    return shards


@FAST
@given(layout=layouts, shard_rows=st.integers(min_value=1, max_value=120), names=st.lists(st.text(), min_size=8))
def test_planning_covers_every_row_once(layout, shard_rows, names):
    """Pure planning, any partition names: every row in exactly one shard, ids safe as file names."""
    partitions = [
        Partition(
            uri=f"s3://bucket/{names[i]}",
            size=100 + i,
            version="v",
            num_rows=sum(sizes),
            row_groups=tuple(sizes),
        )
        for i, sizes in enumerate(layout)
    ]
    for shard in check_coverage(partitions, shard_rows):
        root = "s3://bucket/out"
        for path in (Layout(root).shard(shard.shard_id), Layout(root).marker(shard.shard_id)):
            assert posixpath.dirname(posixpath.dirname(path)) == root


def write_layout(
    folder: Path, layout: list[list[int]], duplicate: tuple[int, int] | None = None, order: Any = "ascending"
) -> list[int]:
    """One Parquet file per entry (`id` plus two float features); return every key written, in order.

    `duplicate` = (a, b): the b-th key written repeats the a-th (when both exist). `order`: "ascending",
    "descending", or a `random.Random` that shuffles the keys.
    """
    total = sum(sum(sizes) for sizes in layout)
    keys = list(range(1000, 1000 + total))
    if order == "descending":
        keys.reverse()
    elif not isinstance(order, str):
        order.shuffle(keys)
    if duplicate and duplicate[0] < duplicate[1] < total:
        keys[duplicate[1]] = keys[duplicate[0]]
    schema = pa.schema([("id", pa.int64()), ("x0", pa.float32()), ("x1", pa.float32())])
    at = 0
    for index, sizes in enumerate(layout):
        with pq.ParquetWriter(folder / f"part-{index:03d}.parquet", schema) as writer:
            for size in sizes:
                ids = np.array(keys[at : at + size], dtype=np.int64)
                x = (ids % 97).astype(np.float32) / 97
                writer.write_table(pa.table({"id": ids, "x0": x, "x1": 1 - x}, schema=schema), row_group_size=size or 1)
                at += size
    return keys


@FAST
@given(layout=layouts, shard_rows=st.integers(min_value=1, max_value=60))
def test_shards_read_back_every_key_once(layout, shard_rows):
    """On real files: reading each planned shard yields each written key exactly once."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = write_layout(Path(tmp), layout)
        storage = Storage(tmp)
        partitions = list_partitions(storage, tmp)
        assert [p.row_groups for p in partitions] == [tuple(sizes) for sizes in layout]
        shards = check_coverage(partitions, shard_rows)
        read = []
        for shard in shards:
            batches = list(iter_shard(storage, shard, ["id"], chunk_rows=7))
            got = [k for b in batches for k in b.column(0).to_pylist()]
            assert len(got) == shard.num_rows
            read += got
        assert sorted(read) == sorted(keys) and len(read) == len(set(read))


@FAST
@given(
    layout=layouts.filter(lambda files: sum(map(sum, files)) >= 2),
    pair=st.tuples(st.integers(0, 200), st.integers(0, 200)),
    order=st.one_of(st.sampled_from(["ascending", "descending"]), st.randoms(use_true_random=False)),
)
def test_key_check_rejects_exactly_the_layouts_with_a_repeated_key(layout, pair, order):
    """Keys in order (checked without a sort where their ranges are apart) or shuffled (sorted hashes)."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = sorted(pair)
        keys = write_layout(Path(tmp), layout, duplicate=(a, b), order=order)
        storage = Storage(tmp)
        partitions = list_partitions(storage, tmp)
        if len(set(keys)) == len(keys):
            check_keys(storage, partitions, "id")
        else:
            with pytest.raises(SchemaError, match=rf"^key column 'id' is not unique: {keys[b]} appears "):
                check_keys(storage, partitions, "id")


# -- merge-and-validate against damaged shards ------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("props") / "mlp.safetensors"
    save_checkpoint(MLP([2, 4, 3]), str(path), ["x0", "x1"])
    return str(path)


def _scored(folder: Path, layout: list[list[int]], shard_rows: int, checkpoint: str):
    (folder / "in").mkdir()
    write_layout(folder / "in", layout)
    config = make_config(
        input_uri=str(folder / "in"),
        output_uri=str(folder / "out"),
        model="mlp",
        checkpoint=checkpoint,
        devices="cpu",
        shard_rows=shard_rows,
        batch_size=16,
    )
    plan = prepare(config)
    results = {s.shard_id: run_shard(config, plan.settings, s).to_dict() for s in plan.pending}
    return plan, results


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def _set_rows_out(out: Path, shard_id: str, rows: int) -> None:
    marker = out / "markers" / f"{shard_id}.json"
    data = json.loads(marker.read_text())
    data["rows_out"] = rows
    marker.write_text(json.dumps(data))


DAMAGE = ["drop a row", "repeat a row", "repeat a row of another shard", "change a key", "lose a marker"]


def damage(out: Path, shards: list, kind: str, pick: int) -> tuple[str, Any]:
    """Damage the committed output; return the shard id damaged and a key involved."""
    victim = shards[pick % len(shards)]
    path = out / "shards" / f"{victim.shard_id}.parquet"
    table = pq.read_table(path)
    row = pick % table.num_rows
    key = table.column("id")[row].as_py()
    if kind == "lose a marker":
        (out / "markers" / f"{victim.shard_id}.json").unlink()
        return victim.shard_id, key
    if kind == "drop a row":
        table = pa.concat_tables([table.slice(0, row), table.slice(row + 1)])
    elif kind == "repeat a row":
        table = pa.concat_tables([table, table.slice(row, 1)])
    elif kind == "repeat a row of another shard":
        donor = shards[(pick + 1) % len(shards)]
        extra = pq.read_table(out / "shards" / f"{donor.shard_id}.parquet").slice(0, 1)
        key = extra.column("id")[0].as_py()
        table = pa.concat_tables([table, extra.cast(table.schema)])
    elif kind == "change a key":
        other = table.column("id")[(row + 1) % table.num_rows].as_py()
        ids = table.column("id").to_pylist()
        ids[row] = other if other != key else key + 10_000
        table = table.set_column(0, "id", pa.array(ids, pa.int64()))
    _rewrite(path, table)
    _set_rows_out(out, victim.shard_id, table.num_rows)  # the marker agrees: only the keys tell
    return victim.shard_id, key


@SLOW
@given(
    layout=layouts.filter(lambda files: sum(map(sum, files)) >= 2),
    shard_rows=st.integers(min_value=1, max_value=50),
    kind=st.sampled_from(DAMAGE),
    pick=st.integers(min_value=0, max_value=1000),
)
def test_merge_and_validate_rejects_any_lost_or_repeated_row(checkpoint, layout, shard_rows, kind, pick):
    with tempfile.TemporaryDirectory() as tmp:
        plan, results = _scored(Path(tmp), layout, shard_rows, checkpoint)
        out = Path(tmp) / "out"
        if kind == "repeat a row of another shard" and len(plan.shards) < 2:
            kind = "repeat a row"
        shard_id, _ = damage(out, plan.shards, kind, pick)
        report = merge_and_validate(plan, results)
        assert not report.ok
        assert any(shard_id in line for line in report.failures), report.failures
        assert not (out / "_SUCCESS").exists()
        assert not list((out / "predictions").glob("part-*.parquet")), "damaged shards were merged"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["state"] in ("invalid", "failed") and not manifest["validation"]["ok"]


@SLOW
@given(layout=layouts.filter(lambda files: sum(map(sum, files)) >= 1), shard_rows=st.integers(1, 50))
def test_merge_and_validate_accepts_an_undamaged_run(checkpoint, layout, shard_rows):
    """The control for the test above: the same runs, undamaged, pass with every row once."""
    with tempfile.TemporaryDirectory() as tmp:
        plan, results = _scored(Path(tmp), layout, shard_rows, checkpoint)
        report = merge_and_validate(plan, results)
        assert report.ok, report.failures
        out = Path(tmp) / "out"
        merged = pq.read_table(out / "predictions").column("id").to_pylist()
        assert sorted(merged) == list(range(1000, 1000 + plan.total_rows))
        assert (out / "_SUCCESS").exists()


# -- names under the output prefix --------------------------------------------------


@FAST
@given(shard_id=st.text(max_size=40) | st.from_regex(r"[0-9a-f./\\]{14,18}", fullmatch=True))
def test_no_shard_id_names_a_path_outside_its_folder(shard_id):
    root = "/data/out"
    layout = Layout(root)
    for name, method in (("shards", layout.shard), ("markers", layout.marker), ("errors", layout.errors)):
        try:
            path = method(shard_id)
        except ConfigError as exc:
            assert str(exc).startswith("invalid shard id ")
            continue
        assert posixpath.normpath(path) == path and posixpath.dirname(path) == f"{root}/{name}"
        assert posixpath.basename(path).split(".")[0] == shard_id


@pytest.mark.parametrize(
    "shard_id", ["../../../etc/passwd", "0123456789abcdef/../x", "0123456789abcdef\n", "ABCDEF0123456789"]
)
def test_hostile_shard_ids_are_refused(shard_id):
    with pytest.raises(ConfigError, match="expected 16 hexadecimal digits"):
        Layout("/data/out").marker(shard_id)
