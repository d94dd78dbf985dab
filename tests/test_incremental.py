"""Nightly runs over a growing input cost what is new, and stay as strict as a full run.

What a run reads is observed by wrapping the functions that read keys and shard files (their results are
untouched): the key check reads new partitions and only the old ones whose key range overlaps them;
merge-and-validate reads no committed shard that is unchanged. Yet a key repeated between an old and a
new partition is refused, and a damaged committed shard is caught.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer import merge, pipeline, planning
from batchinfer.errors import SchemaError
from batchinfer.layout import Layout
from batchinfer.storage import Storage
from cli.main import main
from tests.core_helpers import GOOD_MODEL, run_core, write_features


def job(data: Path, output: Path, **extra) -> dict:
    return {"input_uri": str(data), "output_uri": str(output), "model": GOOD_MODEL, "devices": "cpu", **extra}


@pytest.fixture
def nights(tmp_path: Path) -> Path:
    """Three nights already scored: keys 0-299, 300-599, 600-899."""
    data = tmp_path / "data"
    for night in range(3):
        write_features(data / f"night={night}" / "p.parquet", np.arange(night * 300, night * 300 + 300), 100)
    _, report = run_core(**job(data, tmp_path / "out"))
    assert report.ok
    return data


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """What the run reads: input footers and key columns (by folder) and committed shard files (by shard id)."""
    seen: dict[str, list[str]] = {"keys": [], "shards": [], "footers": []}
    read_column, read_bytes, read_partition = pipeline._read_column, Storage.read_bytes, planning.read_partition

    def footer(storage, info, *args, **kwargs):
        seen["footers"].append(Path(getattr(info, "uri", info)).parent.name)
        return read_partition(storage, info, *args, **kwargs)

    def keys(storage, uri, column, row_groups=None):
        seen["keys"].append(Path(uri).parent.name)
        return read_column(storage, uri, column, row_groups)

    def data(storage, uri):
        if Path(uri).parent.name == "shards":
            seen["shards"].append(Path(uri).stem)
        return read_bytes(storage, uri)

    monkeypatch.setattr(pipeline, "_read_column", keys)
    monkeypatch.setattr(merge, "_read_column", keys)
    monkeypatch.setattr(Storage, "read_bytes", data)
    monkeypatch.setattr(planning, "read_partition", footer)
    return seen


def test_a_new_night_reads_only_what_is_new(nights: Path, tmp_path: Path, reads: dict) -> None:
    write_features(nights / "night=3" / "p.parquet", np.arange(900, 1200), 100)
    plan, report = run_core(**job(nights, tmp_path / "out"))
    assert report.ok and report.shards_run == 1 and report.shards_skipped == 3 and report.rows_out == 1200
    assert reads["footers"] == ["night=3"]  # planned; after scoring its stamp shows it was not written since
    assert reads["keys"] == ["night=3"]  # the key check; nothing else reads the input's keys
    assert reads["shards"] == []  # merge-and-validate took the committed shards from their markers
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [p["keys"] for p in manifest["partitions"]] == [[0, 299], [300, 599], [600, 899], [900, 1199]]


def test_a_key_repeated_between_an_old_and_a_new_partition_is_refused(
    nights: Path, tmp_path: Path, reads: dict
) -> None:
    """The new night repeats keys of night 1: found by the exact check of the partitions whose ranges overlap."""
    write_features(nights / "night=3" / "p.parquet", np.array([450, 451]), 100)
    with pytest.raises(SchemaError) as refused:
        run_core(**job(nights, tmp_path / "out"))
    night1, night3 = nights / "night=1" / "p.parquet", nights / "night=3" / "p.parquet"
    assert str(refused.value) == f"key column 'id' is not unique: 450 appears in {night1} and {night3}"
    assert sorted(set(reads["keys"])) == ["night=1", "night=3"]  # nights 0 and 2 cannot hold key 450


def test_string_keys_are_read_again_only_where_their_ranges_overlap(tmp_path: Path, reads: dict) -> None:
    def write(name: str, keys: list[str]) -> None:
        (data / name).mkdir(parents=True, exist_ok=True)
        x = np.arange(len(keys), dtype=np.float32)
        pq.write_table(pa.table({"id": keys, "x0": x, "x1": x / 10}), data / name / "p.parquet")

    data = tmp_path / "data"
    write("a", [f"user-{i:04d}" for i in range(0, 100, 2)])
    write("b", [f"user-{i:04d}" for i in range(1, 100, 2)])  # interleaved with a: no key twice
    assert run_core(**job(data, tmp_path / "out"))[1].ok
    write("c", [f"visit-{i:04d}" for i in range(50)])  # after every user- key
    reads["keys"].clear()
    assert run_core(**job(data, tmp_path / "out"))[1].ok
    assert reads["keys"] == ["c"]
    write("d", ["user-0097", "user-0200"])
    reads["keys"].clear()
    with pytest.raises(SchemaError, match=f"'user-0097' appears in {data / 'b' / 'p.parquet'} and "):
        run_core(**job(data, tmp_path / "out"))
    assert sorted(set(reads["keys"])) == ["a", "b", "d"]


def rewrite(path: Path, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def swap_two_losers(table: pa.Table) -> pa.Table:
    """Swap the two smallest probabilities of row 3: rows still sum to 1 and the argmax stands."""
    rows = table.column("probabilities").to_pylist()
    order = np.argsort(rows[3])
    rows[3][order[0]], rows[3][order[1]] = rows[3][order[1]], rows[3][order[0]] + 1e-3
    rows[3][order[2]] -= 1e-3
    column = pa.array(rows, type=pa.list_(pa.float32()))
    return table.set_column(table.schema.get_field_index("probabilities"), "probabilities", column)


def test_a_damaged_committed_shard_is_caught_even_where_its_values_look_fine(nights: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    plan, _ = run_core(**job(nights, output))
    victim = plan.shards[1]
    path = Path(Layout(str(output)).shard(victim.shard_id))
    rewrite(path, swap_two_losers)
    _, report = run_core(**job(nights, output))
    assert not report.ok and report.shards_run == 0
    assert report.first_failure.startswith(f"shard {victim.shard_id} ({victim.partition_uri}): output file changed ")
    assert not (output / "_SUCCESS").exists()


def test_a_byte_flipped_in_place_is_caught_and_a_touch_is_not_damage(nights: Path, tmp_path: Path, reads: dict) -> None:
    output = tmp_path / "out"
    plan, _ = run_core(**job(nights, output))
    first, second = (Path(Layout(str(output)).shard(s.shard_id)) for s in plan.shards[:2])
    later = first.stat().st_mtime + 60
    os.utime(first, (later, later))
    assert run_core(**job(nights, output))[1].ok
    assert reads["shards"] == []  # the touched file's bytes were hashed again, not decoded and checked

    raw = bytearray(second.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # same size, somewhere in the data
    second.write_bytes(bytes(raw))
    _, report = run_core(**job(nights, output))
    assert not report.ok and f"shard {plan.shards[1].shard_id} " in report.first_failure


def test_removing_or_adding_a_partition_renames_no_other_part(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name, start in (("b", 0), ("c", 100), ("d", 200)):
        write_features(data / f"{name}.parquet", np.arange(start, start + 100), 50)
    output = tmp_path / "out"
    assert run_core(**job(data, output))[1].ok
    parts = output / "predictions"
    kept = {name: (parts / f"{name}.parquet").stat().st_ino for name in ("b", "d")}

    (data / "c.parquet").unlink()
    write_features(data / "a.parquet", np.arange(300, 400), 50)  # sorts first
    assert run_core(**job(data, output))[1].ok
    assert sorted(p.name for p in parts.iterdir()) == ["a.parquet", "b.parquet", "d.parquet"]
    assert {name: (parts / f"{name}.parquet").stat().st_ino for name in ("b", "d")} == kept  # not even rewritten
    assert pq.read_table(parts / "d.parquet").column("id").to_pylist() == list(range(200, 300))


def test_a_part_of_several_shards_is_written_again_only_when_its_shards_change(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_features(data / "big.parquet", np.arange(0, 400), 100)
    write_features(data / "small.parquet", np.arange(400, 500), 100)
    output = tmp_path / "out"
    plan, report = run_core(**job(data, output, shard_rows=200))
    assert report.ok and len(plan.shards) == 3
    big = output / "predictions" / "big.parquet"
    stamp = big.stat().st_mtime_ns, big.stat().st_ino
    write_features(data / "more.parquet", np.arange(500, 600), 100)
    assert run_core(**job(data, output, shard_rows=200))[1].ok
    assert (big.stat().st_mtime_ns, big.stat().st_ino) == stamp
    big.write_bytes(big.read_bytes()[:-100])  # a damaged part is made again from its shards
    assert run_core(**job(data, output, shard_rows=200))[1].ok
    assert pq.read_table(big).column("id").to_pylist() == list(range(400))


def test_markers_without_commit_time_checks_are_rescored_not_trusted(nights: Path, tmp_path: Path) -> None:
    """Markers written before shards were checked at commit (and outputs named by position) are redone."""
    output = tmp_path / "out"
    for path in (output / "markers").glob("*.json"):
        marker = json.loads(path.read_text())
        for key in ("marker_version", "checks", "file", "errors_file"):
            marker.pop(key, None)
        path.write_text(json.dumps(marker))
    (output / "predictions" / "part-00000.parquet").write_bytes(b"an old part")
    _, report = run_core(**job(nights, output))
    assert report.ok and report.shards_run == 3
    assert sorted(
        p.relative_to(output / "predictions").as_posix() for p in (output / "predictions").rglob("*.parquet")
    ) == [f"night={n}/p.parquet" for n in range(3)]


def test_plan_with_an_output_says_what_a_run_would_do(nights: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    write_features(nights / "night=3" / "p.parquet", np.arange(900, 1000), 100)  # new
    write_features(nights / "night=0" / "p.parquet", np.arange(0, 300), 100, shift=1.0)  # changed
    (nights / "night=2" / "p.parquet").unlink()  # gone
    before = sorted(p.name for p in (output / "markers").iterdir())
    argv = ["plan", "--input", str(nights), "--model", GOOD_MODEL, "--devices", "cpu", "--output", str(output)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "at " + str(output) + ": 1 skipped as done, 1 scored, 1 rescored, 2 removed" in out, out
    lines = out.splitlines()
    assert any("night=0" in line for line in lines)
    assert sum("rescored (its input changed)" in line for line in lines) == 1
    assert sum("scored (not scored yet)" in line for line in lines) == 1
    assert sum("skipped as done (done)" in line for line in lines) == 1
    removed = [line for line in lines if "removed" in line and line.startswith("shard ")]
    assert len(removed) == 2 and any("night=2/p.parquet: its input is gone" in line for line in removed)
    assert any("night=0/p.parquet: its input changed" in line for line in removed)
    assert sorted(p.name for p in (output / "markers").iterdir()) == before  # plan writes nothing
