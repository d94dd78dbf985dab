"""Nothing lost, nothing leaked, no false success: one test (or a few) per fault of the safety review.

1 two runs into one output; 2 a damaged or deleted shard; 3 credentials under any name; 4 relative paths;
5 a stricter error policy on a rerun; 6 a stale missing_keys.parquet; 7 one huge text cell; 8 an
unreachable Prefect API; 9 output symlinks; 10 a full disk; 11 duplicate NaN keys; 12 the batch size;
13 models are code. The kill campaign is tests/test_kills.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from batchinfer.config import hold_secrets, make_config, redact, release_secrets
from batchinfer.demo import tabular_frame
from batchinfer.errors import BatchInferError, ConfigError
from batchinfer.merge import merge_and_validate
from batchinfer.pipeline import start_run
from cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, build_parser, main, serve_parameters
from tests.conftest import ROOT, free_port, python_path, run_job
from tests.core_helpers import prepare_started, score_pending
from tests.faulty_models import FEATURES
from tests.test_rerun import _assert_all_end, _children, cli_env
from tests.test_secrets import _find, _prefect_records

CONTROLLED = "tests.faulty_models:factory"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`batchinfer ARGV` in this process: the exit code, stdout and stderr (never a traceback)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def mlp_job(tabular: dict, output: Path | str, **extra: Any) -> dict[str, Any]:
    settings = dict(
        input_uri=tabular["input"],
        output_uri=str(output),
        model="mlp",
        checkpoint=tabular["checkpoint"],
        devices="cpu",
        shard_rows=5_000,
        batch_size=1024,
    )
    return {**settings, **extra}


def mlp_args(tabular: dict, output: Path | str, *extra: str) -> list[str]:
    return [
        "run",
        "--input",
        tabular["input"],
        "--output",
        str(output),
        "--model",
        "mlp",
        "--checkpoint",
        tabular["checkpoint"],
        "--devices",
        "cpu",
        "--shard-rows",
        "5000",
        "--batch-size",
        "1024",
        *extra,
    ]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture
def data(tabular, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(tabular["input"], target)
    return target


# -- 1. one run at a time per output ------------------------------------------------------


def _slow_run(tabular: dict, output: Path, tmp_path: Path) -> subprocess.Popen:
    """`batchinfer run` of the controlled model in a subprocess, about 3 s per shard (4 shards)."""
    control = tmp_path / "control-a"
    control.mkdir()
    (control / "sleep").write_text("0.3")
    argv = [sys.executable, "-m", "cli", "run", "--input", tabular["input"], "--output", str(output)]
    argv += ["--model", CONTROLLED, "--features", ",".join(FEATURES), "--devices", "cpu"]
    argv += ["--shard-rows", "5000", "--batch-size", "500"]
    env = cli_env(control)
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list((output / "markers").glob("*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_a_second_run_into_a_held_output_is_refused_at_once(tabular, tmp_path, capsys):
    """Run A (the controlled model) is scoring; run B (the MLP, --overwrite) is refused at once with one line
    naming A, whether it comes through the CLI or straight to the flow (a deployment's run); A then ends
    with its own results, and B changed nothing."""
    from flows.batch_inference import batch_inference

    output = tmp_path / "out"
    first = _slow_run(tabular, output, tmp_path)
    try:
        code, _, err = cli(capsys, *mlp_args(tabular, output, "--overwrite"))
        assert first.poll() is None  # refused while A runs: B does not wait for A
        line = one_line(err)
        assert code == EXIT_BAD_INPUT, err
        assert line.startswith(f"batchinfer: error: --output {output} is in use by flow run '"), line
        assert f"(pid {first.pid} on " in line and line.endswith("wait for that run to end or pick another output")
        code, out, _ = cli(capsys, "status", "--output", str(output))
        assert code == EXIT_OK and "run state: running (flow run '" in out and f"pid {first.pid}" in out

        config = make_config(**mlp_job(tabular, output, overwrite=True))
        state = batch_inference(**config.parameters(), return_state=True)
        assert state.is_failed()
        assert f"(pid {first.pid} on " in str(state.result(raise_on_failure=False))
    finally:
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert "validation passed" in out
    widths = pl.read_parquet(output / "predictions" / "*.parquet")["probabilities"].list.len().unique().to_list()
    assert widths == [3]  # the controlled model's three classes, not the MLP's ten
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["config"]["model"]["model"] == CONTROLLED and manifest["state"] == "succeeded"
    assert (output / "_SUCCESS").exists()


def _lease(fs: Any, output: str, **info: Any) -> None:
    fs.pipe_file(f"{output.removeprefix('s3://')}/.batchinfer.lock", json.dumps(info).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.s3
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_s3_lease_refuses_a_live_holder_and_takes_over_an_ended_one(tabular, s3_bucket):
    """On S3 the output's lock is a lease object: a live holder's lease refuses the run with its name; one
    that ran out, or whose process on this host is gone, is taken over; the run gives its lease back."""
    import socket

    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    output = f"{bucket}/out"
    now = time.time()
    _lease(fs, output, run="flow run 'elsewhere'", pid=4242, host="other-host", since=now, expires=now + 300)
    with pytest.raises(BatchInferError) as refused:
        run_job(**mlp_job(tabular, output, storage_options=options))
    assert str(refused.value).startswith(f"--output {output} is in use by flow run 'elsewhere' (pid 4242 on other-host")
    assert not fs.exists(f"{output.removeprefix('s3://')}/manifest.json")

    _lease(fs, output, run="flow run 'expired'", pid=4242, host="other-host", since=now - 600, expires=now - 1)
    assert run_job(**mlp_job(tabular, output, storage_options=options))["ok"]
    fs.invalidate_cache()
    assert not fs.exists(f"{output.removeprefix('s3://')}/.batchinfer.lock")  # given back

    host = socket.gethostname()
    _lease(fs, output, run="flow run 'killed'", pid=_dead_pid(), host=host, since=now, expires=now + 300)
    assert run_job(**mlp_job(tabular, output, storage_options=options))["ok"]


@pytest.mark.s3
def test_a_run_whose_lease_was_taken_over_marks_nothing_as_succeeded(tabular, s3_bucket, monkeypatch):
    """A holder too slow to renew loses its lease; merge-and-validate checks the hold before `_SUCCESS`."""
    import s3fs

    from batchinfer import outputlock

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    output = f"{bucket}/out"
    monkeypatch.setattr(outputlock, "LEASE_SECONDS", 0.4)
    plan = prepare_started(**mlp_job(tabular, output, storage_options=options))
    score_pending(plan)
    with outputlock.hold_output(output, options, run="this run", run_id=plan.run_id):
        _lease(fs, output, run="flow run 'thief'", pid=1, host="h", since=time.time(), expires=time.time() + 60)
        time.sleep(0.5)  # two renewals: the first finds the lease changed
        report = merge_and_validate(plan)
    assert not report.ok and "lost its hold on --output" in report.first_failure
    fs.invalidate_cache()
    assert not fs.exists(f"{output.removeprefix('s3://')}/_SUCCESS")


def test_success_only_while_the_manifest_and_markers_are_this_runs(tabular, tmp_path, monkeypatch):
    """Before `_SUCCESS`: the manifest must still be this run's and no merged marker rewritten since it was
    read. Here another run (one that ignored the lock) started in between, or rewrote a marker."""
    from batchinfer import faults

    output = tmp_path / "out"
    plan = prepare_started(**mlp_job(tabular, output))
    score_pending(plan)
    other = prepare_started(**mlp_job(tabular, output))  # a second run records itself in the manifest
    report = merge_and_validate(plan)
    assert not report.ok and "manifest.json was written by another run" in report.first_failure
    assert not (output / "_SUCCESS").exists()
    assert json.loads((output / "manifest.json").read_text())["run_id"] == other.run_id  # left as it was

    start_run(plan)  # this run again; now a marker changes while it merges
    marker = next((output / "markers").glob("*.json"))

    def rewrite(name: str) -> None:
        if name == "merge.validated":
            data = json.loads(marker.read_text())
            marker.write_text(json.dumps({**data, "run_id": "another"}))

    monkeypatch.setattr(faults, "point", rewrite)
    report = merge_and_validate(plan)
    assert not report.ok and "its marker changed while this run merged it" in report.first_failure
    assert marker.stem in report.first_failure and not (output / "_SUCCESS").exists()
    assert not list((output / "predictions").glob("*.parquet"))


# -- 2. a damaged or deleted shard is scored again -----------------------------------------------


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_deleted_shard_files_are_scored_again(tabular, tmp_path):
    """Users delete shards/ once predictions/ exists: the next run scores those shards again and passes."""
    output = tmp_path / "out"
    assert run_job(**mlp_job(tabular, output))["ok"]
    parts = files(output / "predictions")
    shutil.rmtree(output / "shards")
    report = run_job(**mlp_job(tabular, output))
    assert report["ok"] and report["shards_run"] == 4 and report["shards_skipped"] == 0
    assert files(output / "predictions") == parts


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_a_corrupt_shard_loses_its_marker_and_is_scored_again_in_the_same_run(tabular, tmp_path, caplog):
    output = tmp_path / "out"
    assert run_job(**mlp_job(tabular, output, shard_rows=2_500))["ok"]
    parts = files(output / "predictions")
    victim = sorted((output / "shards").glob("*.parquet"))[3]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    caplog.set_level(logging.WARNING, logger="batchinfer")
    report = run_job(**mlp_job(tabular, output, shard_rows=2_500))
    assert report["ok"] and report["shards_run"] == 1 and report["shards_skipped"] == 7
    assert victim.read_bytes() == good and files(output / "predictions") == parts
    said = [r.getMessage() for r in caplog.records if "scored again" in r.getMessage()]
    assert said and victim.stem in said[0] and "output file is not valid Parquet" in said[0]


# -- 3. credentials, whatever their name ---------------------------------------------------------

EXAMPLES = {
    "api_key": "apikey",
    "account_key": "accountkey",
    "connection_string": "connstring",
    "private_key": "privatekey",
    "passphrase": "passphrase",
}


def _secret_options() -> tuple[dict[str, Any], list[str]]:
    secrets = {name: f"{label}-{uuid.uuid4().hex}" for name, label in EXAMPLES.items()}
    header, password = f"bearer-{uuid.uuid4().hex}", f"urlpw-{uuid.uuid4().hex}"
    options = {
        **secrets,
        "client_kwargs": {"endpoint_url": f"http://user:{password}@127.0.0.1:9", "region_name": "eu-west-1"},
        "headers": {"Authorization": f"Bearer {header}"},
        "anon": False,
    }
    return options, [*secrets.values(), header, password]


def test_storage_options_are_masked_unless_their_name_is_known_harmless():
    options, secrets = _secret_options()
    shown = redact(options)
    assert not [s for s in secrets if s in json.dumps(shown)]
    assert shown["client_kwargs"] == {"endpoint_url": "***", "region_name": "eu-west-1"}
    assert shown["anon"] is False and shown["headers"] == "***" and shown["api_key"] == "***"
    plain = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "key": {"$env": "MY_KEY"}}
    assert redact(plain) == plain  # a plain endpoint and a reference to a variable hold nothing secret
    held = hold_secrets(options)
    assert not [s for s in secrets if s in json.dumps(held)]
    assert release_secrets(held) == options


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_credentials_under_any_name_never_reach_the_manifest_prefect_or_the_terminal(tabular, tmp_path, capsys, caplog):
    options, secrets = _secret_options()
    caplog.set_level(logging.DEBUG, logger="batchinfer")
    output = tmp_path / "out"
    code, out, err = cli(capsys, *mlp_args(tabular, output, "--storage-options", json.dumps(options)))
    assert code == EXIT_OK, err
    written = {str(p): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    records = _prefect_records()
    logs = {"log records": "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)}
    hits = _find(secrets, {"terminal": out + err, **written, **records, **logs})
    assert not hits, f"a secret leaked: {hits}"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["config"]["input"]["storage_options"]["api_key"] == "***"


@pytest.mark.s3
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_credentials_named_by_environment_variable_or_secret_block(tabular, s3_bucket, tmp_path, capsys, monkeypatch):
    """Storage options may name where a credential lives instead of holding it: {"$env": NAME} or a Prefect
    Secret block {"$secret": NAME}. Only the names are recorded, and a rerun finds the credentials again."""
    from prefect.blocks.system import Secret

    bucket, options = s3_bucket
    key, secret = f"envkey-{uuid.uuid4().hex}", f"blocksecret-{uuid.uuid4().hex}"
    monkeypatch.setenv("TEST_S3_KEY", key)
    block = f"s3-secret-{uuid.uuid4().hex[:8]}"
    Secret(value=secret).save(block)
    named = {"key": {"$env": "TEST_S3_KEY"}, "secret": {"$secret": block}, "client_kwargs": options["client_kwargs"]}
    output = f"{bucket}/out"
    code, out, err = cli(capsys, *mlp_args(tabular, output, "--storage-options", json.dumps(named)))
    assert code == EXIT_OK, err
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    manifest = json.loads(fs.cat_file(f"{output.removeprefix('s3://')}/manifest.json"))
    assert manifest["config"]["input"]["storage_options"] == named
    code, rerun_out, err = cli(capsys, "rerun", "--output", output, "--storage-options", json.dumps(options))
    assert code == EXIT_OK and "0 run, 4 already done" in rerun_out, err
    outputs = {p: fs.cat_file(p) for p in fs.find(output.removeprefix("s3://"))}
    flow_runs = {k: v for k, v in _prefect_records().items() if k in ("flow runs", "task runs", "logs", "artifacts")}
    assert not _find([key, secret], {"terminal": out + err, **outputs, **flow_runs})
    monkeypatch.delenv("TEST_S3_KEY")
    code, _, err = cli(capsys, *mlp_args(tabular, f"{bucket}/other", "--storage-options", json.dumps(named)))
    assert code == EXIT_BAD_INPUT
    assert one_line(err) == (
        "batchinfer: error: --storage-options names the environment variable TEST_S3_KEY, which is not set"
    )


def test_serve_refuses_credentials_in_clear_in_the_deployment():
    params = {"input": {"uri": "s3://b/in", "storage_options": {"account_key": "k-1"}}}
    args = build_parser().parse_args(["serve", "--params", json.dumps(params)])
    with pytest.raises(ConfigError) as refused:
        serve_parameters(args)
    assert str(refused.value).startswith(
        "--params: input.storage_options.account_key would be stored in clear in the deployment"
    )
    assert "k-1" not in str(refused.value)
    named = {"input": {"uri": "s3://b/in", "storage_options": {"account_key": {"$env": "ACCOUNT_KEY"}}}}
    args = build_parser().parse_args(["serve", "--params", json.dumps(named)])
    assert serve_parameters(args)["input"]["storage_options"] == {"account_key": {"$env": "ACCOUNT_KEY"}}


# -- 4. relative paths -------------------------------------------------------------------------


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_rerun_from_another_folder_after_a_run_given_relative_paths(tabular, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tabular["input"], work / "in")
    shutil.copy(tabular["checkpoint"], work / "mlp.safetensors")
    monkeypatch.chdir(work)
    args = ["run", "--input", "in", "--output", "out", "--model", "mlp", "--checkpoint", "mlp.safetensors"]
    code, _, err = cli(capsys, *args, "--devices", "cpu", "--shard-rows", "5000")
    assert code == EXIT_OK, err
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["config"]["input"]["uri"] == str(work / "in")
    assert manifest["config"]["output"]["uri"] == str(work / "out")
    assert manifest["config"]["model"]["checkpoint"] == str(work / "mlp.safetensors")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = cli(capsys, "rerun", "--output", str(work / "out"))
    assert code == EXIT_OK, err
    assert "0 run, 4 already done" in out and not list((tmp_path / "elsewhere").iterdir())


# -- 5. the error policy is the run's ----------------------------------------------------------


def _with_nan_rows(source: str, target: Path, ids: list[int]) -> Path:
    target.mkdir()
    for path in sorted(Path(source).glob("*.parquet")):
        frame = pl.read_parquet(path)
        nan = pl.when(pl.col("id").is_in(ids)).then(float("nan")).otherwise(pl.col("f03")).cast(pl.Float32)
        frame.with_columns(nan.alias("f03")).write_parquet(target / path.name, row_group_size=1_000)
    return target


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_a_stricter_error_policy_holds_on_a_rerun(tabular, tmp_path, capsys):
    data = _with_nan_rows(tabular["input"], tmp_path / "data", [5001, 5002, 5003])
    output = tmp_path / "out"
    job = {**mlp_job(tabular, output), "input_uri": str(data)}
    assert run_job(**job, max_error_ratio=0.01)["ok"]
    args = mlp_args(tabular, output)
    args[2] = str(data)
    code, _, err = cli(capsys, *args)  # the default --max-error-ratio 0
    assert code == EXIT_FAILED, err
    line = one_line(err)
    assert line.startswith("batchinfer: run failed: shard ") and "part-00001.parquet rows 0+5000" in line
    assert line.endswith("3 of 5000 rows cannot be scored (see errors/); --max-error-ratio is 0.0")
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["state"] == "failed" and manifest["config"]["output"]["max_error_ratio"] == 0.0
    assert not (output / "_SUCCESS").exists()
    report = run_job(**job, max_error_ratio=0.01)
    assert report["ok"] and report["shards_run"] == 0 and report["rows_error"] == 3


# -- 6. missing_keys.parquet -------------------------------------------------------------------


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_a_completed_partial_result_drops_its_missing_keys(tabular, tmp_path):
    data = _with_nan_rows(tabular["input"], tmp_path / "data", [5001])
    output = tmp_path / "out"
    job = {**mlp_job(tabular, output), "input_uri": str(data)}
    partial = run_job(**job, min_success_ratio=0.75)
    assert partial["ok"] and partial["missing_keys"] == 5_000 and (output / "missing_keys.parquet").exists()
    complete = run_job(**job, max_error_ratio=0.01)
    assert complete["ok"] and complete["missing_keys"] == 0
    assert not (output / "missing_keys.parquet").exists()
    assert json.loads((output / "manifest.json").read_text())["validation"]["missing_keys_file"] is None


# -- 7. one huge text cell ---------------------------------------------------------------------


class _Recording:
    """A tokenizer, recording the longest text it was handed."""

    def __init__(self, inner: Any):
        self.inner, self.longest = inner, 0

    def _saw(self, *texts: Any) -> None:
        for text in texts:
            for one in [text] if isinstance(text, str) else text or []:
                self.longest = max(self.longest, len(one))

    def encode_batch(self, texts: list[str], **options: Any) -> Any:
        self._saw(texts)
        return self.inner.encode_batch(texts, **options)

    def encode(self, text: str, **options: Any) -> Any:
        self._saw(text)
        return self.inner.encode(text, **options)

    def __call__(self, text: Any, pair: Any = None, **options: Any) -> Any:
        self._saw(text, pair)
        return self.inner(text, pair, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


HUGE = " ".join(f"word{i % 97} punct, café" for i in range(150_000))  # over 2.5 MB
SPACED = "start" + " " * 300_000 + " end" * 400  # a cut of its first characters holds too few tokens


def test_a_huge_text_cell_is_cut_before_it_is_tokenized():
    """A 2.8 MB cell among short ones (MiniLM): the tokenizer never gets the huge cell whole, and the token ids
    are exactly the whole text's, truncated, also where a cut of the first characters would drop tokens."""
    from batchinfer.models import minilm

    predictor = minilm.MiniLMPredictor(minilm.model_dir(), "fp32", torch.device("cpu"))
    texts = ["a short one", HUGE, "", SPACED, "another short one"]
    expected = [encoding.ids for encoding in predictor._fast.encode_batch(texts)]
    recording = _Recording(predictor._fast)
    predictor._fast = recording
    assert predictor.tokenize(texts) == expected
    assert len(HUGE) > 2_500_000 and recording.longest == len(SPACED) < len(HUGE) // 5


def test_a_huge_text_cell_is_cut_before_a_hugging_face_tokenizer_too(tmp_path):
    """The same for a Hugging Face classifier (64 positions), alone and in text pairs. Its cut is 2,048
    characters, so smaller cells show it; the expected ids tokenize the pairs whole, which costs the
    tokenizer memory quadratic in their length (gigabytes at MiniLM's sizes)."""
    from batchinfer.models.base import resolve_model
    from tests import hf_models

    folder = hf_models.save_classifier(tmp_path / "cls", num_labels=2)
    options = dict(checkpoint=None, precision="fp32", features=None, text_column="text", storage_options={})
    predictor = resolve_model(f"hf:{folder}", **options).load(torch.device("cpu"))
    tokenizer = predictor.tokenizer
    huge = " ".join(f"word{i % 97} punct, café" for i in range(8_000))  # 150 KB
    spaced = "start" + " " * 20_000 + " end" * 400
    texts = ["a short one", huge, spaced]
    pairs = [("a question", huge), (huge, "an answer"), (spaced, huge), ("short", "pair")]

    def whole(batch: list[Any]) -> list[list[int]]:
        first = [b[0] if isinstance(b, tuple) else b for b in batch]
        second = [b[1] for b in batch] if isinstance(batch[0], tuple) else None
        ids = tokenizer(first, second, truncation=True, max_length=predictor.max_length)["input_ids"]
        return [list(row) for row in ids]

    expected = whole(texts), whole(pairs)
    recording = _Recording(tokenizer)
    predictor.tokenizer = recording
    got = [t.ids for t in predictor.tokenize(texts)], [t.ids for t in predictor.tokenize(pairs)]
    assert got == expected
    assert recording.longest == len(spaced) < len(huge) // 5


# -- 8. an unreachable Prefect API -------------------------------------------------------------


def test_an_unreachable_prefect_api_is_one_line_and_exit_2(tabular, tmp_path):
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PYTHONPATH": python_path(), "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "h")}
    argv = [sys.executable, "-m", "cli", *mlp_args(tabular, tmp_path / "out")]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    line = one_line(done.stderr)
    assert line.startswith(f"batchinfer: error: the Prefect API at {api} does not answer (")
    assert line.endswith("start that server, or unset PREFECT_API_URL to run on an embedded one")
    assert not (tmp_path / "out" / "manifest.json").exists()


# -- 9. output symlinks --------------------------------------------------------------------------


def test_an_output_that_is_a_symlink_into_the_input_is_refused(tabular, data, tmp_path, capsys):
    (data / "sub").mkdir()
    link = tmp_path / "out"
    link.symlink_to(data / "sub")
    code, _, err = cli(capsys, *mlp_args({**tabular, "input": str(data)}, link))
    assert code == EXIT_BAD_INPUT
    assert one_line(err) == f"batchinfer: error: --output {link} is inside --input {data}; pick another output"
    assert not list((data / "sub").iterdir())


def test_a_dangling_output_symlink_is_refused_up_front(tabular, tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere" / "out")
    code, _, err = cli(capsys, *mlp_args(tabular, link))
    assert code == EXIT_BAD_INPUT
    assert one_line(err) == (
        f"batchinfer: error: --output {link} is a symbolic link to {tmp_path / 'nowhere' / 'out'}, which does "
        f"not exist; create that folder or pick another output"
    )


# -- 10. a full disk ---------------------------------------------------------------------------

_IN_SMALL_DISK = """
set -u
out="$1"; copy="$2"; size="$3"; shift 3
mount -t tmpfs -o size="$size" tmpfs "$out" || exit 97
"$@" > "$copy.first.out" 2> "$copy.first.err"; echo $? > "$copy.first.rc"
cp -a "$out/." "$copy/"
mount -o remount,size=64m "$out"
"$@" > "$copy.second.out" 2> "$copy.second.err"; echo $? > "$copy.second.rc"
rm -rf "$copy.after"; mkdir "$copy.after"; cp -a "$out/." "$copy.after/"
"""


def test_a_full_disk_names_the_file_and_the_manifest_says_failed(tabular, tmp_path):
    """On a disk that holds the shards but not the merged parts: exit 1 with one line naming the file and the
    cause, the manifest says failed (not running), no `_SUCCESS`, no temporary file; with room again, the
    same command finishes and scores nothing twice. (A tmpfs of fixed size, mounted in a private mount
    namespace: `unshare`.)"""
    clean = tmp_path / "clean"
    env = cli_env(tmp_path)
    argv = [sys.executable, "-m", "cli", *mlp_args(tabular, clean, "--shard-rows", "2500")]
    assert subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=240).returncode == 0
    shards = sum(p.stat().st_size for p in (clean / "shards").iterdir())
    parts = sum(p.stat().st_size for p in (clean / "predictions").iterdir())
    size = f"{(shards + parts // 2) // 1024 + 64}k"  # the shards, markers and manifest fit; the parts do not

    output, copy = tmp_path / "out", tmp_path / "copy"
    output.mkdir()
    copy.mkdir()
    argv = [sys.executable, "-m", "cli", *mlp_args(tabular, output, "--shard-rows", "2500")]
    script = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _IN_SMALL_DISK, "sh"]
    done = subprocess.run([*script, str(output), str(copy), size, *argv], env=env, timeout=600)
    assert done.returncode == 0, done
    first_rc = int((tmp_path / "copy.first.rc").read_text())
    first_err = (tmp_path / "copy.first.err").read_text()
    assert first_rc == EXIT_FAILED, first_err
    line = one_line(first_err)
    assert line.startswith(f"batchinfer: run failed: writing {output}/predictions/part-0000"), line
    assert line.endswith("failed: no space left on device")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["state"] == "failed" and "no space left on device" in manifest["validation"]["failures"][0]
    assert not (copy / "_SUCCESS").exists() and not list(copy.rglob(".tmp-*"))

    assert int((tmp_path / "copy.second.rc").read_text()) == EXIT_OK, (tmp_path / "copy.second.err").read_text()
    assert "0 run, 8 already done" in (tmp_path / "copy.second.out").read_text()
    after = tmp_path / "copy.after"
    assert (after / "_SUCCESS").exists() and files(after / "predictions") == files(clean / "predictions")


# -- 11. NaN keys ----------------------------------------------------------------------------------


def test_duplicate_nan_keys_are_refused(tabular, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    frame = tabular_frame(500, seed=1).with_columns(pl.col("id").cast(pl.Float64))
    frame = frame.with_columns(pl.when(pl.col("id").is_in([3.0, 7.0])).then(float("nan")).otherwise("id").alias("id"))
    frame.write_parquet(data / "part-0.parquet")
    code, _, err = cli(capsys, *mlp_args({**tabular, "input": str(data)}, tmp_path / "out"))
    assert code == EXIT_BAD_INPUT
    assert one_line(err) == (
        f"batchinfer: error: key column 'id' is not unique: nan appears twice in {data / 'part-0.parquet'}"
    )


# -- 12. the batch size -------------------------------------------------------------------------


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_the_batch_size_is_part_of_the_output_fingerprint(tabular, tmp_path, capsys):
    """Probabilities differ in their last bits from one batch size to another, so a rerun at another batch
    size does not reuse the shards: it is refused as another configuration, or with --overwrite redone."""
    output = tmp_path / "out"
    assert run_job(**mlp_job(tabular, output, batch_size=7))["ok"]
    at_seven = pl.read_parquet(output / "predictions" / "*.parquet").sort("id")
    code, _, err = cli(capsys, *mlp_args(tabular, output, "--batch-size", "4096"))
    assert code == EXIT_BAD_INPUT
    assert one_line(err) == (
        f"batchinfer: error: --output {output} holds a run with another configuration (model, batch size, "
        f"columns or input differ); use --overwrite to replace it or pick a new output"
    )
    report = run_job(**mlp_job(tabular, output, batch_size=4096, overwrite=True))
    assert report["ok"] and report["shards_run"] == 4
    at_4096 = pl.read_parquet(output / "predictions" / "*.parquet").sort("id")
    assert at_4096["prediction"].equals(at_seven["prediction"])
    difference = np.abs(np.stack(at_4096["probabilities"].to_list()) - np.stack(at_seven["probabilities"].to_list()))
    assert difference.max() > 0  # what the fingerprint protects against: bytes differ


# -- 13. models are code -------------------------------------------------------------------------


class _Loud(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("THE MODEL'S CODE RAN")
        return self.linear(x)


def test_plan_runs_no_model_code(tabular, tmp_path, capfd, monkeypatch):
    """`plan` neither runs a TorchScript archive (its forward would print) nor imports a module:factory
    (its import would write a file)."""
    scripted = tmp_path / "loud.pt"
    torch.jit.save(torch.jit.script(_Loud()), str(scripted))
    module = f"loud_{uuid.uuid4().hex[:8]}"
    witness = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(f"open({str(witness)!r}, 'w').close()\ndef factory():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for model in (str(scripted), f"{module}:factory"):
        code = main(["plan", "--input", tabular["input"], "--model", model, "--features", "f*", "--shard-rows", "5000"])
        out, err = capfd.readouterr()
        assert code == EXIT_OK, err
        assert out.startswith("4 partitions, 4 shards, 20,000 rows") and "CODE RAN" not in out + err
    assert not witness.exists()


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_allowed_prefixes_restrict_what_a_run_may_point_at(tabular, tmp_path, capsys, monkeypatch):
    """Whoever runs a worker (or `batchinfer serve --allow-*`) sets the prefixes runs may use; a run outside
    them is refused with one line, before anything is read or written."""
    inside = tmp_path / "allowed"
    monkeypatch.setenv("BATCHINFER_ALLOWED_INPUT", tabular["input"])
    monkeypatch.setenv("BATCHINFER_ALLOWED_OUTPUT", f"{inside},s3://bucket/scores/")
    monkeypatch.setenv("BATCHINFER_ALLOWED_MODEL", f"mlp,{Path(tabular['checkpoint']).parent}")
    refusals = {
        "--output": (mlp_args(tabular, tmp_path / "elsewhere"), f"--output {tmp_path / 'elsewhere'} is not allowed"),
        "..": (mlp_args(tabular, f"{inside}/../escape"), f"--output {tmp_path / 'escape'} is not allowed"),
        "--model": (
            [
                "run",
                "--input",
                tabular["input"],
                "--output",
                str(inside / "a"),
                "--model",
                "minilm",
                "--text-column",
                "t",
            ],
            "--model minilm is not allowed here (BATCHINFER_ALLOWED_MODEL allows mlp, ",
        ),
    }
    for name, (args, expected) in refusals.items():
        code, _, err = cli(capsys, *args)
        assert code == EXIT_BAD_INPUT, name
        assert one_line(err).startswith(f"batchinfer: error: {expected}"), (name, err)
    assert not inside.exists()
    code, _, err = cli(capsys, *mlp_args(tabular, inside / "out"))
    assert code == EXIT_OK, err


# -- what killed processes leave in the system temp folder -----------------------------------------


def test_temp_files_of_killed_processes_are_removed_and_live_ones_kept(tmp_path):
    from batchinfer.storage import remove_orphaned_temps, temp_prefix

    code = (
        "import sys, tempfile, time; from batchinfer.storage import temp_prefix; "
        "tempfile.mkstemp(prefix=temp_prefix(), dir=sys.argv[1]); "
        "tempfile.mkdtemp(prefix=temp_prefix('model-'), dir=sys.argv[1]); print('ready', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": python_path()}
    victim = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    assert victim.stdout.readline().strip() == "ready"
    children = _children(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _assert_all_end(children)
    (tmp_path / f"{temp_prefix()}live.parquet").write_bytes(b"")  # this process is alive
    (tmp_path / "batchinfer-devices").mkdir()
    assert len(list(tmp_path.glob("batchinfer-*"))) == 4
    assert remove_orphaned_temps(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.glob("batchinfer-*")) == sorted(
        [f"{temp_prefix()}live.parquet", "batchinfer-devices"]
    )
