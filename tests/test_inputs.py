"""Inputs as other tools store them: Hive-style folders as columns, Parquet files without the suffix, and
partitions known by their content, so that a touch or a copy reruns nothing and a rewrite is always seen."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer.errors import ConfigError
from batchinfer.planning import list_partitions
from batchinfer.storage import Storage
from cli.main import main
from tests.conftest import run_job
from tests.core_helpers import GOOD_MODEL, feature_table, run_core, write_features

COUNTRIES = {"DE": range(0, 300), "FR": range(300, 500), "US": range(500, 900)}


def hive_input(root: Path) -> Path:
    """Three `country=` folders of features, the key unique across them."""
    for country, ids in COUNTRIES.items():
        write_features(root / "data" / f"country={country}" / "part-00000.parquet", np.array(ids), 100)
    return root / "data"


def job(data: Path | str, output: Path | str, **extra) -> dict:
    return {"input_uri": str(data), "output_uri": str(output), "model": GOOD_MODEL, "devices": "cpu", **extra}


def markers(output: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (output / "markers").glob("*.json")}


def predictions(output: Path) -> pl.DataFrame:
    return pl.read_parquet(f"{output}/predictions/**/*.parquet").sort("id")


@pytest.mark.usefixtures("prefect_server")
def test_hive_folders_become_columns_and_a_filter_scores_only_the_folders_it_selects(tmp_path, capsys):
    data = hive_input(tmp_path)
    output = tmp_path / "out"
    argv = ["run", "--input", str(data), "--output", str(output), "--model", GOOD_MODEL, "--devices", "cpu"]
    assert main([*argv, "--passthrough", "country"]) == 0, capsys.readouterr().err
    got = predictions(output)
    assert got.columns == ["id", "prediction", "probabilities", "country"]
    expected = {i: country for country, ids in COUNTRIES.items() for i in ids}
    assert got["country"].to_list() == [expected[i] for i in got["id"].to_list()]
    # Parts keep the input's folders: adding a country renames nothing, and readers see the same layout.
    assert sorted(p.relative_to(output / "predictions").as_posix() for p in (output / "predictions").rglob("*")) == [
        "country=DE",
        "country=DE/part-00000.parquet",
        "country=FR",
        "country=FR/part-00000.parquet",
        "country=US",
        "country=US/part-00000.parquet",
    ]

    selected = tmp_path / "selected"
    filtered = [*argv[:4], str(selected), *argv[5:], "--partitions", "country=DE|FR", "--passthrough", "country"]
    assert main(filtered) == 0, capsys.readouterr().err
    assert "500 rows" in capsys.readouterr().out
    got = predictions(selected)
    assert sorted(set(got["country"].to_list())) == ["DE", "FR"] and got.height == 500
    assert {Path(m["partition_uri"]).parent.name for m in markers(selected).values()} == {"country=DE", "country=FR"}


def test_a_partition_filter_lists_no_folder_it_refuses(tmp_path, monkeypatch):
    """`date>=...` is decided on the folder's name: a refused folder is never listed, however much it holds."""
    for day in ("2026-10-30", "2026-10-31", "2026-11-01", "2026-11-02"):
        for country in ("DE", "FR"):
            write_features(tmp_path / f"date={day}" / f"country={country}" / "p.parquet", np.arange(3), 3)
    listed: list[str] = []
    scandir = os.scandir

    def spy(path):
        listed.append(Path(path).relative_to(tmp_path).as_posix())
        return scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    found = list_partitions(
        Storage(str(tmp_path)),
        str(tmp_path),
        partitions="date>=2026-11-01,country=DE",
        partition_types={"date": "date32"},
    )
    monkeypatch.undo()
    assert [p.relative for p in found] == [
        "date=2026-11-01/country=DE/p.parquet",
        "date=2026-11-02/country=DE/p.parquet",
    ]
    assert sorted(listed) == [".", "date=2026-11-01", "date=2026-11-01/country=DE", "date=2026-11-02",
                              "date=2026-11-02/country=DE"]  # fmt: skip
    assert [p.hive for p in found][0] == (("date", "2026-11-01"), ("country", "DE"))


def test_a_filter_that_selects_nothing_says_why_in_one_line(tmp_path, capsys):
    data = hive_input(tmp_path)
    argv = ["run", "--input", str(data), "--output", str(tmp_path / "out"), "--model", GOOD_MODEL, "--devices", "cpu"]
    assert main([*argv, "--partitions", "country=XX"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"batchinfer: error: no Parquet files selected by --partitions 'country=XX' under {data}"
    )
    assert main([*argv, "--partitions", "contry=DE"]) == 2  # a misspelt column
    assert capsys.readouterr().err.strip() == (
        f"batchinfer: error: --partitions 'contry=DE' names 'contry', which no `key=value` folder under {data} "
        "has (its partition columns: country)"
    )
    # A column below a folder the filter skips is not a misspelling: the plain line, not a wrong guess.
    assert main([*argv, "--partitions", "country=XX,part=1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"batchinfer: error: no Parquet files selected by --partitions 'country=XX,part=1' under {data}"
    )
    assert not (tmp_path / "out").exists()


def test_partition_types_type_the_passed_through_column(tmp_path):
    for year in (2025, 2026):
        write_features(tmp_path / "data" / f"year={year}" / "p.parquet", np.arange(year * 100, year * 100 + 50), 25)
    output = tmp_path / "out"
    _, report = run_core(**job(tmp_path / "data", output, passthrough=["year"], partition_types="year=int64"))
    assert report.ok, report.failures
    table = pq.read_table(output / "predictions" / "year=2026" / "p.parquet")
    assert table.schema.field("year").type == pa.int64()
    assert set(table.column("year").to_pylist()) == {2026}
    with pytest.raises(ConfigError, match="--partitions: partition value 'twenty' of 'year' is not a valid int64"):
        run_core(**job(tmp_path / "data", tmp_path / "other", partitions="year>=twenty", partition_types="year=int64"))


@pytest.mark.usefixtures("prefect_server")
def test_a_nightly_filter_scores_the_day_before_the_run(tmp_path, capsys):
    """`--partitions date={yesterday}` and an output named after the same day: each night its own folder."""
    today = dt.datetime.now(dt.UTC).date()
    days = [today - dt.timedelta(days=n) for n in (2, 1, 0)]
    for n, day in enumerate(days):
        write_features(tmp_path / "data" / f"date={day}" / "p.parquet", np.arange(n * 100, n * 100 + 100), 50)
    out = tmp_path / "scores" / "date={yesterday}"
    argv = ["run", "--input", str(tmp_path / "data"), "--output", str(out), "--model", GOOD_MODEL, "--devices", "cpu"]
    assert main([*argv, "--partitions", "date={yesterday}", "--passthrough", "date"]) == 0, capsys.readouterr().err
    day = tmp_path / "scores" / f"date={days[1]}"
    assert predictions(day)["date"].unique().to_list() == [str(days[1])]
    manifest = json.loads((day / "manifest.json").read_text())
    assert manifest["config"]["input"]["partitions"] == f"date={days[1]}"  # what the run scored, for reruns
    from batchinfer.partitions import expand_dates

    assert expand_dates("{today-7:%Y/%m/%d}", dt.date(2026, 3, 2)) == "2026/02/23"


@pytest.mark.usefixtures("prefect_server")
def test_spark_files_without_the_suffix_are_scored_and_what_lies_beside_them_is_not(tmp_path, capsys):
    data = tmp_path / "spark"
    data.mkdir()
    for n in range(2):
        pq.write_table(feature_table(np.arange(n * 200, n * 200 + 200)), data / f"part-0000{n}-6f1c-4e2b.c000")
        (data / f".part-0000{n}-6f1c-4e2b.c000.crc").write_bytes(b"crc\x00\x01")
    (data / "_SUCCESS").write_bytes(b"")
    (data / "_committed_4242").write_text('{"added": []}')
    (data / "part-00000.crc").write_bytes(b"PAR1 is not a Parquet file")
    (data / "README").write_text("exported by spark\n")
    output = tmp_path / "out"
    argv = ["run", "--input", str(data), "--output", str(output), "--model", GOOD_MODEL, "--devices", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    assert predictions(output)["id"].to_list() == list(range(400))
    assert sorted(p.name for p in (output / "predictions").iterdir()) == [
        "part-00000-6f1c-4e2b.c000.parquet",
        "part-00001-6f1c-4e2b.c000.parquet",
    ]
    manifest = json.loads((output / "manifest.json").read_text())
    assert [Path(p["uri"]).name for p in manifest["partitions"]] == [
        "part-00000-6f1c-4e2b.c000",
        "part-00001-6f1c-4e2b.c000",
    ]


def test_a_broken_file_without_the_suffix_is_an_error_not_skipped(tmp_path, capsys):
    """A file that starts like Parquet but has no footer is a damaged partition: skipping it would lose rows."""
    data = tmp_path / "spark"
    data.mkdir()
    pq.write_table(feature_table(np.arange(100)), data / "part-00000")
    whole = (data / "part-00000").read_bytes()
    pq.write_table(feature_table(np.arange(100, 200)), data / "part-00001")
    (data / "part-00001").write_bytes((data / "part-00001").read_bytes()[: len(whole) // 2])
    argv = ["plan", "--input", str(data), "--model", GOOD_MODEL, "--devices", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"batchinfer: error: {data / 'part-00001'} is not a readable Parquet file (Parquet magic bytes not "
                   "found in footer. Either the file is corrupted or this is not a parquet file.)"]  # fmt: skip


def uncompressed(path: Path, ids: np.ndarray, shift: float) -> None:
    """Fixed-width columns, no compression and no dictionary: a rewrite with other values has the same size."""
    pq.write_table(feature_table(ids, shift), path, row_group_size=100, compression="none", use_dictionary=False)


def test_a_touch_or_a_copy_reruns_nothing_and_a_same_size_rewrite_is_rescored(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for n in range(3):
        uncompressed(data / f"part-{n}.parquet", np.arange(n * 200, n * 200 + 200), 0.0)
    output = tmp_path / "out"
    plan, report = run_core(**job(data, output))
    assert report.ok and len(plan.shards) == 3
    first = markers(output)

    later = dt.datetime.now().timestamp() + 3600
    os.utime(data / "part-0.parquet", (later, later))  # a touch
    shutil.copy(data / "part-1.parquet", tmp_path / "copy.parquet")  # a copy, put back (a sync)
    shutil.move(tmp_path / "copy.parquet", data / "part-1.parquet")
    plan, report = run_core(**job(data, output))
    assert report.ok and report.shards_run == 0 and report.shards_skipped == 3
    assert markers(output) == first

    victim = data / "part-2.parquet"
    size, stat = victim.stat().st_size, victim.stat()
    before = predictions(output).filter(pl.col("id") >= 400)
    uncompressed(victim, np.arange(400, 600), 1.5)  # other values, same size, the old time put back
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    plan, report = run_core(**job(data, output))
    assert report.ok and report.shards_run == 1 and report.shards_skipped == 2
    (rescored,) = plan.pending
    assert rescored.partition_uri == str(victim)
    after = predictions(output).filter(pl.col("id") >= 400)
    assert after["id"].to_list() == before["id"].to_list()
    assert after["probabilities"].to_list() != before["probabilities"].to_list()
    assert sorted(markers(output)) == sorted(s.shard_id for s in plan.shards)  # the stale marker is gone


def test_one_value_rewritten_inside_its_column_range_is_rescored(tmp_path):
    """A rewrite that keeps the size, the footer (row groups, sizes, min/max statistics) and the time."""
    data = tmp_path / "data"
    write_features(data / "part-0.parquet", np.arange(0, 300), 100)
    output = tmp_path / "out"
    plan, report = run_core(**job(data, output))
    assert report.ok and report.shards_run == 1

    victim = data / "part-0.parquet"
    stat, footer = victim.stat(), victim.read_bytes()[-2048:]
    table = pq.read_table(victim)
    x1 = table.column("x1").to_numpy().copy()
    x1[150] = (x1[149] + x1[151]) / 2  # inside the row group's min and max
    pq.write_table(table.set_column(2, "x1", pa.array(x1)), victim, row_group_size=100)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.read_bytes()[-2048:] == footer
    before = predictions(output)
    plan, report = run_core(**job(data, output))
    assert report.ok and report.shards_run == 1 and report.shards_skipped == 0
    after = predictions(output)
    assert after.filter(pl.col("id") != 150).equals(before.filter(pl.col("id") != 150))
    assert after.filter(pl.col("id") == 150)["probabilities"].to_list() != (
        before.filter(pl.col("id") == 150)["probabilities"].to_list()
    )


@pytest.mark.s3
@pytest.mark.usefixtures("prefect_server")
def test_on_s3_a_re_put_of_the_same_bytes_reruns_and_rewrites_nothing(tmp_path, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    data = tmp_path / "data"
    for n in range(3):
        write_features(data / f"part-{n}.parquet", np.arange(n * 200, n * 200 + 200), 100)
    fs.put(f"{data}/", f"{bucket}/in/", recursive=True)
    settings = job(f"{bucket}/in", f"{bucket}/out", storage_options=options)
    assert run_job(**settings)["ok"]
    root = f"{bucket.removeprefix('s3://')}/out"
    fs.invalidate_cache()
    parts = fs.ls(f"{root}/predictions")
    assert len(parts) == 3
    for part in parts:  # a tag on each part object: a part copied again from its shard loses it
        fs.setxattr(part, kept="yes")

    fs.put(f"{data}/", f"{bucket}/in/", recursive=True)  # the same bytes again, as a sync would
    report = run_job(**settings)
    assert report["ok"] and report["shards_run"] == 0 and report["shards_skipped"] == 3
    fs.invalidate_cache()
    assert [fs.metadata(part).get("kept") for part in parts] == ["yes"] * 3

    changed = io.BytesIO()
    pq.write_table(feature_table(np.arange(200, 400), shift=2.0), changed, row_group_size=100)
    fs.pipe_file(f"{bucket.removeprefix('s3://')}/in/part-1.parquet", changed.getvalue())
    report = run_job(**settings)
    assert report["ok"] and report["shards_run"] == 1 and report["shards_skipped"] == 2
