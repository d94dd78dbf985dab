"""Credentials given through storage options or the environment never leave the process.

A real run on the local S3 server; then every output object, everything the
Prefect server stored (flow and task runs, logs, artifacts, its database file),
the captured logs and the terminal are searched for the secret strings.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from batchinfer.config import hold_secrets, make_config, redact, release_secrets
from batchinfer.demo import FEATURE_NAMES, tabular_frame
from batchinfer.errors import ConfigError
from batchinfer.models.mlp import MLP, save_checkpoint
from cli.main import EXIT_BAD_INPUT, EXIT_OK, main

pytestmark = [pytest.mark.s3]


def _secret(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out + err


def _find(secrets: list[str], blobs: dict[str, bytes | str]) -> list[str]:
    """Where any secret occurs: 'place: secret-label' for each hit."""
    hits = []
    for where, blob in blobs.items():
        data = blob.encode() if isinstance(blob, str) else blob
        hits += [f"{where}: {s.split('-')[0]}" for s in secrets if s.encode() in data]
    return hits


@pytest.fixture
def s3_job(s3_bucket, tmp_path) -> dict[str, Any]:
    """Two partitions (one row NaN, so an errors file is written) and an MLP checkpoint, all in the bucket."""
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for index in range(2):
        frame = tabular_frame(120, seed=index, start_id=index * 120)
        if index:
            nan_at_130 = pl.when(pl.col("id") == 130).then(float("nan")).otherwise(pl.col("f01"))
            frame = frame.with_columns(nan_at_130.cast(pl.Float32).alias("f01"))
        buffer = io.BytesIO()
        frame.write_parquet(buffer, row_group_size=60)
        fs.pipe(f"{bucket}/in/part-{index}.parquet".removeprefix("s3://"), buffer.getvalue())
    torch.manual_seed(0)
    local = tmp_path / "mlp.safetensors"
    save_checkpoint(MLP([len(FEATURE_NAMES), 8, 4]), str(local), FEATURE_NAMES)
    fs.put_file(str(local), f"{bucket}/models/mlp.safetensors".removeprefix("s3://"))
    return {"bucket": bucket, "endpoint": options["client_kwargs"]["endpoint_url"], "fs": fs}


def _run_args(job: dict[str, Any], output: str, options: dict[str, Any]) -> list[str]:
    bucket = job["bucket"]
    return [
        "run",
        "--input",
        f"{bucket}/in",
        "--output",
        output,
        "--model",
        "mlp",
        "--checkpoint",
        f"{bucket}/models/mlp.safetensors",
        "--devices",
        "cpu",
        "--shard-rows",
        "1000",
        "--max-error-ratio",
        "0.1",
        "--storage-options",
        json.dumps(options),
    ]


def _objects(fs: Any, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {f"s3://{path}": fs.cat_file(path) for path in fs.find(prefix.removeprefix("s3://"))}


def _prefect_records() -> dict[str, bytes | str]:
    """Everything the test Prefect server keeps: runs with their parameters, logs, artifacts, the database."""
    import prefect.settings
    from prefect.client.orchestration import get_client

    found: dict[str, bytes | str] = {}
    with get_client(sync_client=True) as client:
        found["flow runs"] = "\n".join(r.model_dump_json() for r in client.read_flow_runs(limit=200))
        found["task runs"] = "\n".join(r.model_dump_json() for r in client.read_task_runs(limit=200))
        found["artifacts"] = "\n".join(a.model_dump_json() for a in client.read_artifacts(limit=200))
        logs, offset = [], 0
        while batch := client.read_logs(limit=200, offset=offset):
            logs += [entry.model_dump_json() for entry in batch]
            offset += len(batch)
        found["logs"] = "\n".join(logs)
    url = prefect.settings.get_current_settings().server.database.connection_url.get_secret_value()
    database = Path(url.split(":///", 1)[1])
    for path in database.parent.glob(database.name + "*"):  # the file and its -wal / -shm companions
        found[f"database {path.name}"] = path.read_bytes()
    return found


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_secrets_never_reach_outputs_logs_artifacts_or_messages(s3_job, capsys, caplog, monkeypatch, request):
    option_secret, token, env_secret = _secret("optsecret"), _secret("optoken"), _secret("envsecret")
    secrets = [option_secret, token, env_secret]
    caplog.set_level(logging.DEBUG, logger="batchinfer")
    caplog.set_level(logging.INFO, logger="prefect")
    # Prefect's logging setup may stop `batchinfer` records from reaching the root logger (an extra
    # logger gets Prefect's handlers): listen on the logger itself, whatever ran before in this process.
    core = logging.getLogger("batchinfer")
    core.addHandler(caplog.handler)
    request.addfinalizer(lambda: core.removeHandler(caplog.handler))
    terminal: dict[str, bytes | str] = {}

    # 1. Credentials in --storage-options (one nested inside client_kwargs).
    options = {
        "key": "AKIAOPTIONSKEY",
        "secret": option_secret,
        "client_kwargs": {"endpoint_url": s3_job["endpoint"], "aws_session_token": token},
    }
    out1 = f"{s3_job['bucket']}/out-options"
    code, text = _cli(capsys, *_run_args(s3_job, out1, options))
    assert code == EXIT_OK, text
    terminal["run with options"] = text
    code, text = _cli(capsys, "status", "--output", out1, "--storage-options", json.dumps(options))
    assert code == EXIT_OK and "2/2 shards done" in text, text
    terminal["status"] = text

    # 2. Credentials from the environment only.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    out2 = f"{s3_job['bucket']}/out-env"
    env_options = {"client_kwargs": {"endpoint_url": s3_job["endpoint"]}, "skip_instance_cache": True}
    code, text = _cli(capsys, *_run_args(s3_job, out2, env_options))
    assert code == EXIT_OK, text
    terminal["run with environment"] = text

    # 3. Refusals whose messages could quote the options.
    for label, args in {
        "malformed json": [*_run_args(s3_job, out1, options)[:-1], json.dumps(options)[:-1]],
        "missing bucket": _run_args(s3_job, "s3://no-such-bucket-here/out", options),
        "bad parameter": [*_run_args(s3_job, out1, options), "--batch-size", "0"],
    }.items():
        code, text = _cli(capsys, *args)
        assert code == EXIT_BAD_INPUT and text.count("\n") == 1, text
        terminal[label] = text

    outputs = {**_objects(s3_job["fs"], out1), **_objects(s3_job["fs"], out2)}
    names = {path.rsplit("/", 2)[-2] for path in outputs}
    assert {"shards", "markers", "errors", "predictions"} <= names and any(p.endswith("manifest.json") for p in outputs)
    manifest = json.loads(outputs[f"{out1}/manifest.json"])
    assert manifest["config"]["input"]["storage_options"]["secret"] == "***"
    assert manifest["config"]["input"]["storage_options"]["client_kwargs"]["aws_session_token"] == "***"

    records = _prefect_records()
    logs = {"captured log records": "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)}
    hits = _find(secrets, {**terminal, **outputs, **records, **logs})
    assert not hits, f"a secret leaked: {hits}"
    # The searches had something to search: the server recorded the runs' parameters (with
    # placeholders where the credentials were), their logs and artifacts.
    assert '"storage_options"' in str(records["flow runs"]) and "***held:" in str(records["flow runs"])
    assert records["logs"] and records["artifacts"] and logs["captured log records"]


def test_held_secrets_round_trip_in_process_and_drop_elsewhere():
    options = {"key": "AKIA1", "secret": "s-1", "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "t"}}
    held = hold_secrets(options)
    assert "s-1" not in json.dumps(held) and '"t"' not in json.dumps(held)
    assert held["client_kwargs"]["endpoint_url"] == "http://x"
    assert release_secrets(held) == options
    # What another process would see: placeholders it cannot resolve are dropped, so the
    # filesystem uses the credentials of its own environment rather than a wrong literal.
    foreign = json.loads(json.dumps(held).replace("***held:", "***held:0"))
    assert release_secrets(foreign) == {"client_kwargs": {"endpoint_url": "http://x"}}
    assert release_secrets(redact(options)) == {"client_kwargs": {"endpoint_url": "http://x"}}


def test_config_errors_never_echo_storage_options():
    secret = _secret("cfgsecret")
    with pytest.raises(ConfigError) as caught:
        make_config(input_uri="in", output_uri="out", model="mlp", storage_options=[secret])
    assert secret not in str(caught.value) and "--storage-options" in str(caught.value)
