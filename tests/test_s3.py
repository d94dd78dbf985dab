"""The same job on S3 (moto's server over HTTP, through s3fs) gives the local run's predictions and layout."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import s3fs

from tests.conftest import run_job

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("prefect_server")]

JOB = {"model": "mlp", "shard_rows": 6_000, "batch_size": 512, "devices": "cpu", "passthrough": ["f00"]}


def read_predictions(fs: s3fs.S3FileSystem | None, folder: str) -> pl.DataFrame:
    """The merged parts of an output, local or on S3, sorted by key."""
    if fs is None:
        return pl.read_parquet(f"{folder}/predictions/*.parquet").sort("id")
    parts = sorted(fs.glob(f"{folder.removeprefix('s3://')}/predictions/*.parquet"))
    return pl.concat([pl.read_parquet(io.BytesIO(fs.cat_file(p))) for p in parts]).sort("id")


def test_s3_job_matches_the_local_job(tabular: dict, s3_bucket: tuple[str, dict], tmp_path: Path) -> None:
    """Input, checkpoint and output on S3: same keys and probabilities as the local run, and a complete layout."""
    bucket, options = s3_bucket
    secret = f"s3-secret-{uuid.uuid4().hex}"  # moto accepts any secret; this one must never be written out
    options = {**options, "secret": secret}
    fs = s3fs.S3FileSystem(**options)
    fs.put(tabular["input"].rstrip("/") + "/", f"{bucket}/input/", recursive=True)
    fs.put_file(tabular["checkpoint"], f"{bucket}/models/mlp.safetensors")

    local = str(tmp_path / "local")
    assert run_job(input_uri=tabular["input"], output_uri=local, checkpoint=tabular["checkpoint"], **JOB)["ok"]
    output = f"{bucket}/output"
    report = run_job(
        input_uri=f"{bucket}/input",
        output_uri=output,
        checkpoint=f"{bucket}/models/mlp.safetensors",
        storage_options=options,
        **JOB,
    )
    assert report["ok"] and report["rows_out"] == 20_000

    fs.invalidate_cache()
    expected, got = read_predictions(None, local), read_predictions(fs, output)
    assert got.columns == expected.columns == ["id", "prediction", "probabilities", "f00"]
    assert got["id"].to_list() == expected["id"].to_list() == list(range(20_000))
    assert got["prediction"].to_list() == expected["prediction"].to_list()
    assert np.array_equal(np.stack(got["probabilities"].to_list()), np.stack(expected["probabilities"].to_list()))
    assert got["f00"].to_list() == expected["f00"].to_list()

    root = output.removeprefix("s3://")
    manifest_text = fs.cat_file(f"{root}/manifest.json").decode()
    manifest = json.loads(manifest_text)
    assert manifest["state"] == "succeeded" and manifest["validation"]["ok"]
    assert all(p["uri"].startswith(f"{bucket}/input/") for p in manifest["partitions"])
    ids = {s["shard_id"] for s in manifest["shards"]}
    assert len(ids) == len(manifest["shards"]) == 4
    assert {Path(p).name for p in fs.ls(root)} == {"shards", "markers", "predictions", "manifest.json", "_SUCCESS"}
    assert {Path(p).name for p in fs.ls(f"{root}/shards")} == {f"{i}.parquet" for i in ids}
    assert {Path(p).name for p in fs.ls(f"{root}/markers")} == {f"{i}.json" for i in ids}
    assert sorted(Path(p).name for p in fs.ls(f"{root}/predictions")) == [f"part-{i:05d}.parquet" for i in range(4)]
    for shard in manifest["shards"]:
        marker = json.loads(fs.cat_file(f"{root}/markers/{shard['shard_id']}.json"))
        assert marker["rows_in"] == marker["rows_out"] == shard["num_rows"]
        assert secret not in json.dumps(marker)

    assert secret not in manifest_text
    assert manifest["config"]["input"]["storage_options"]["secret"] == "***"
    assert (
        manifest["config"]["input"]["storage_options"]["client_kwargs"]["endpoint_url"]
        == options["client_kwargs"]["endpoint_url"]
    )
