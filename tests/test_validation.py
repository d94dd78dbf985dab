"""Merge-and-validate refuses a bad result: a lost key, a repeated key, a NaN prediction, a model emitting NaN.

Each failure names the shard and the check, the merged predictions are not
committed, `_SUCCESS` is not written, and the flow ends Failed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinfer.config import make_config
from batchinfer.errors import BatchInferError, ShardFailedError
from batchinfer.layout import Layout
from batchinfer.merge import RunReport, merge_and_validate
from batchinfer.pipeline import Plan, prepare, run_shard
from batchinfer.planning import Shard
from cli.main import RunFailed
from tests.conftest import run_job
from tests.core_helpers import GOOD_MODEL, prepare_started, score_pending, write_features
from tests.models_for_validation import NAN_KEY, SHORT_KEY

NAN_MODEL = "tests.models_for_validation:nan_for_one_key"
ROWS_PER_PARTITION = 400
TAMPERED_ROW = 5


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Two partitions of 400 rows in row groups of 100: four shards at shard_rows=200."""
    for p in range(2):
        ids = np.arange(p * ROWS_PER_PARTITION, (p + 1) * ROWS_PER_PARTITION)
        write_features(tmp_path / "data" / f"part-{p:05d}.parquet", ids, 100)
    return tmp_path / "data"


def job(data: Path, output: Path, model: str = GOOD_MODEL, shard_rows: int = 200) -> dict:
    """Four shards by default; the flow tests use two (fewer tasks, same checks)."""
    return {
        "input_uri": str(data),
        "output_uri": str(output),
        "model": model,
        "shard_rows": shard_rows,
        "devices": "cpu",
    }


def drop_row(table: pa.Table) -> pa.Table:
    keep = np.ones(table.num_rows, dtype=bool)
    keep[TAMPERED_ROW] = False
    return table.filter(pa.array(keep))


def duplicate_row(table: pa.Table) -> pa.Table:
    return pa.concat_tables([table, table.slice(TAMPERED_ROW, 1)])


def nan_probability(table: pa.Table) -> pa.Table:
    values = table.column("probabilities").to_pylist()
    values[TAMPERED_ROW][0] = float("nan")
    column = pa.array(values, type=pa.list_(pa.float32()))
    return table.set_column(table.schema.get_field_index("probabilities"), "probabilities", column)


def probabilities_off(table: pa.Table) -> pa.Table:
    values = table.column("probabilities").to_pylist()
    values[TAMPERED_ROW] = [v * 0.9 for v in values[TAMPERED_ROW]]
    column = pa.array(values, type=pa.list_(pa.float32()))
    return table.set_column(table.schema.get_field_index("probabilities"), "probabilities", column)


def wrong_prediction(table: pa.Table) -> pa.Table:
    predictions = table.column("prediction").to_numpy().copy()
    predictions[TAMPERED_ROW] = (predictions[TAMPERED_ROW] + 1) % 3
    return table.set_column(table.schema.get_field_index("prediction"), "prediction", pa.array(predictions))


def tamper(output: Path, shard_id: str, change: Callable[[pa.Table], pa.Table]) -> object:
    """Rewrite a committed shard file in place; return the key of the tampered row."""
    path = Path(Layout(str(output)).shard(shard_id))
    table = pq.read_table(path)
    key = table.column("id")[TAMPERED_ROW].as_py()
    pq.write_table(change(table), path)
    return key


def assert_refused(output: Path, report: RunReport, shard_id: str, expected: str) -> None:
    """Failed with a line naming the shard and the check, and nothing that looks like a finished result."""
    assert not report.ok
    assert shard_id in report.first_failure and expected in report.first_failure, report.first_failure
    assert not (output / "_SUCCESS").exists()
    assert not list((output / "predictions").glob("*.parquet"))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["state"] in ("invalid", "failed") and not manifest["validation"]["ok"]
    assert manifest["validation"]["failures"][0] == report.first_failure


def scored(data: Path, output: Path) -> Plan:
    plan = prepare_started(**job(data, output))
    score_pending(plan)
    return plan


def test_untampered_shards_validate(data: Path, tmp_path: Path) -> None:
    """The baseline the tampering tests start from passes, so their failures come from the tampering."""
    output = tmp_path / "out"
    report = merge_and_validate(scored(data, output))
    assert report.ok and report.rows_out == 2 * ROWS_PER_PARTITION
    assert (output / "_SUCCESS").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (drop_row, "keys check failed: key {key!r} is missing"),
        (duplicate_row, "keys check failed: key {key!r} appears twice"),
        (nan_probability, "finite check failed: key {key!r} has NaN/inf"),
        (probabilities_off, "probabilities check failed: key {key!r} sums to 0.900000"),
        (wrong_prediction, "prediction check failed: key {key!r} is not the argmax"),
    ],
    ids=["missing-key", "duplicated-key", "nan-prediction", "sum-not-one", "not-argmax"],
)
def test_tampered_shard_fails_validation(
    data: Path, tmp_path: Path, change: Callable[[pa.Table], pa.Table], expected: str
) -> None:
    output = tmp_path / "out"
    plan = scored(data, output)
    victim = plan.shards[2].shard_id
    key = tamper(output, victim, change)
    assert_refused(output, merge_and_validate(plan), victim, expected.format(key=key))


def test_input_changed_during_the_run_fails_validation(data: Path, tmp_path: Path) -> None:
    """Uniqueness rests on the input planned: a partition rewritten mid-run is refused, not merged."""
    output = tmp_path / "out"
    plan = scored(data, output)
    victim = data / "part-00001.parquet"
    ids = np.arange(0, ROWS_PER_PARTITION + 1)  # now repeats the first partition's keys
    write_features(victim, ids, 100)
    report = merge_and_validate(plan)
    assert not report.ok and report.first_failure.startswith(f"{victim}: input changed during the run")
    assert not (output / "_SUCCESS").exists()
    assert not list((output / "predictions").glob("*.parquet"))


def nan_shard(plan: Plan) -> Shard:
    """The shard holding the row the NaN model spoils (keys start at 0 in the first partition)."""
    return next(s for s in plan.shards if s.partition_index == 0 and s.row_start <= NAN_KEY < s.row_start + s.num_rows)


def test_model_emitting_nan_fails_its_shard(data: Path, tmp_path: Path) -> None:
    """A NaN from the model is deterministic: the shard fails at once, commits nothing, and the run fails."""
    output = tmp_path / "out"
    plan = prepare_started(**job(data, output, NAN_MODEL))
    victim = nan_shard(plan)
    with pytest.raises(ShardFailedError, match=rf"shard {victim.shard_id}: .*NaN.*first key {NAN_KEY}"):
        run_shard(plan.config, plan.settings, victim)
    layout = Layout(str(output))
    assert not Path(layout.marker(victim.shard_id)).exists()
    assert not Path(layout.shard(victim.shard_id)).exists()
    results = {s.shard_id: run_shard(plan.config, plan.settings, s).to_dict() for s in plan.shards if s != victim}
    assert_refused(output, merge_and_validate(plan, results), victim.shard_id, "no marker")


def test_probabilities_off_fail_the_shard_when_it_is_committed(data: Path, tmp_path: Path) -> None:
    """The value checks run as the shard is written: a shard whose probabilities do not sum to 1 commits nothing."""
    output = tmp_path / "out"
    plan = prepare_started(**job(data, output, "tests.models_for_validation:short_for_one_key"))
    victim = next(
        s for s in plan.shards if s.partition_index == 0 and s.row_start <= SHORT_KEY < s.row_start + s.num_rows
    )
    expected = f"{victim.partition_uri}: probabilities check failed: key {SHORT_KEY} sums to 0.900000"
    with pytest.raises(ShardFailedError) as failure:
        run_shard(plan.config, plan.settings, victim)
    assert str(failure.value) == expected
    layout = Layout(str(output))
    assert not Path(layout.marker(victim.shard_id)).exists()
    assert not Path(layout.shard(victim.shard_id)).exists()


@pytest.mark.usefixtures("prefect_server")
def test_flow_fails_when_the_model_emits_nan(data: Path, tmp_path: Path) -> None:
    """Through Prefect the failed shard does not stop the others, but the run ends Failed, naming it."""
    output = tmp_path / "out"
    victim = nan_shard(prepare(make_config(**job(data, output, NAN_MODEL, shard_rows=400)))).shard_id
    with pytest.raises((RunFailed, BatchInferError)) as failure:
        run_job(**job(data, output, NAN_MODEL, shard_rows=400))
    assert victim in str(failure.value) and "NaN" in str(failure.value)
    assert not (output / "_SUCCESS").exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["state"] == "failed"
    assert {s["shard_id"]: s["state"] for s in manifest["shards"]}[victim] == "failed"
    assert sorted(p.stem for p in (output / "markers").glob("*.json")) == sorted(
        s["shard_id"] for s in manifest["shards"] if s["shard_id"] != victim
    )


@pytest.mark.usefixtures("prefect_server")
def test_flow_rerun_repairs_a_tampered_shard(data: Path, tmp_path: Path) -> None:
    """A rerun skips shards with markers but still validates them: a damaged committed shard loses its
    marker and is scored again in the same run, which then ends with the clean run's bytes."""
    output = tmp_path / "out"
    report = run_job(**job(data, output, shard_rows=400))
    assert report["ok"] and (output / "_SUCCESS").exists()
    clean = {p.name: p.read_bytes() for p in (output / "shards").glob("*.parquet")}
    manifest = json.loads((output / "manifest.json").read_text())
    victim = manifest["shards"][1]["shard_id"]
    key = tamper(output, victim, duplicate_row)
    report = run_job(**job(data, output, shard_rows=400))
    assert report["ok"] and report["shards_run"] == 1 and report["shards_skipped"] == 1
    assert {p.name: p.read_bytes() for p in (output / "shards").glob("*.parquet")} == clean
    assert (output / "_SUCCESS").exists()
    merged = pq.read_table(output / "predictions").column("id").to_pylist()
    assert sorted(merged) == sorted(set(merged)) and key in merged


def test_one_shard_parts_are_the_shard_files(data: Path, tmp_path: Path) -> None:
    """A partition scored as one shard: its merged part is that shard's file (a hard link on a local
    disk: no second write), byte for byte."""
    output = tmp_path / "out"
    plan = prepare_started(**job(data, output, shard_rows=ROWS_PER_PARTITION))
    score_pending(plan)
    assert merge_and_validate(plan).ok
    layout = Layout(str(output))
    assert len(plan.shards) == 2
    for shard in plan.shards:
        part, own = Path(layout.part(shard.part)), Path(layout.shard(shard.shard_id))
        assert part.read_bytes() == own.read_bytes()
        assert os.path.samefile(part, own)
    assert not [p for p in (output / "predictions").iterdir() if p.name.startswith(".")]  # no temporary left


def test_one_shard_parts_are_committed_only_when_every_shard_passes(data: Path, tmp_path: Path) -> None:
    """The first partition's shard is fine and the second is tampered with: no part at all is committed."""
    output = tmp_path / "out"
    plan = prepare_started(**job(data, output, shard_rows=ROWS_PER_PARTITION))
    score_pending(plan)
    victim = plan.shards[1].shard_id
    key = tamper(output, victim, drop_row)
    assert_refused(output, merge_and_validate(plan), victim, f"keys check failed: key {key!r} is missing")


def test_a_chunk_whose_rows_all_go_to_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that cannot be scored may fill a whole chunk: it adds error rows and no output rows, and the rest
    of the shard is scored and validated as usual."""
    import batchinfer.runner as runner

    monkeypatch.setattr(runner, "CHUNK_ROWS_FEATURES", 100)
    table = pa.table({"id": np.arange(300), "x0": np.arange(300, dtype=np.float32), "x1": np.ones(300, np.float32)})
    x1 = table.column("x1").to_numpy().copy()
    x1[100:200] = np.nan  # the second chunk, whole
    table = table.set_column(2, "x1", pa.array(x1))
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet", row_group_size=100)
    output = tmp_path / "out"
    plan = prepare_started(**job(tmp_path / "in", output, shard_rows=300), max_error_ratio=0.5)
    report = merge_and_validate(plan, score_pending(plan))
    assert report.ok, report.failures
    assert (report.rows_out, report.rows_error) == (200, 100)
    merged = pq.read_table(output / "predictions").sort_by("id")
    assert merged.column("id").to_pylist() == [*range(100), *range(200, 300)]
    assert np.allclose(np.array(merged.column("probabilities").to_pylist()).sum(axis=1), 1.0)
    errors = pq.read_table(output / "errors").column("id").to_pylist()
    assert sorted(errors) == list(range(100, 200))


def test_a_null_in_a_bool_feature_column_goes_to_errors(tmp_path: Path) -> None:
    """Bool features are scored as 0/1; a null among them is an error row like a null float, not a crash."""
    flags = [True, False, None, True, False, True]
    table = pa.table({"id": np.arange(6), "x0": np.arange(6, dtype=np.float32), "x1": pa.array(flags, pa.bool_())})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    output = tmp_path / "out"
    plan = prepare_started(**job(tmp_path / "in", output), max_error_ratio=0.2)
    report = merge_and_validate(plan, score_pending(plan))
    assert report.ok, report.failures
    errors = pq.read_table(output / "errors").to_pylist()
    assert errors == [{"id": 2, "reason": "column 'x1' is null"}]
    merged = pq.read_table(output / "predictions").sort_by("id")
    # The model's logits are [x1, -x1, 0]: softmax([1, -1, 0]) where the flag is set, a three-way tie where not.
    assert merged.column("id").to_pylist() == [0, 1, 3, 4, 5]
    e = np.exp(1.0)
    expected = {True: [e, 1 / e, 1.0] / (e + 1 / e + 1.0), False: np.full(3, 1 / 3)}
    got = np.array(merged.column("probabilities").to_pylist())
    assert np.allclose(got, [expected[flags[i]] for i in (0, 1, 3, 4, 5)], atol=1e-6)
