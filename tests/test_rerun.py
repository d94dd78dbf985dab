"""Rerun only what failed, and lose nothing under faults.

Each fault is followed by a rerun that must end with merged predictions identical to
a clean run's, with the shards finished before the fault not recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from batchinfer.errors import InputError
from cli.main import SERVER_SETTINGS, RunFailed, main
from tests.conftest import ROOT, free_port, python_path, run_job
from tests.faulty_models import FEATURES
from tests.proxy import Proxy

MODEL = "tests.faulty_models:factory"
pytestmark = pytest.mark.usefixtures("prefect_server")


def job(input_uri: str, output: str | Path, **extra) -> dict:
    settings = dict(
        input_uri=input_uri,
        output_uri=str(output),
        model=MODEL,
        features=FEATURES,
        devices="cpu",
        shard_rows=5_000,
        batch_size=500,
    )
    return {**settings, **extra}


@pytest.fixture
def data(tabular, tmp_path) -> Path:
    """A private copy of the tabular input (tests change it)."""
    target = tmp_path / "data"
    shutil.copytree(tabular["input"], target)
    return target


@pytest.fixture(scope="module")
def clean(tabular, tmp_path_factory) -> Path:
    """A clean run of the controlled model over the tabular input: the reference."""
    folder = tmp_path_factory.mktemp("clean")
    os.environ["BATCHINFER_TEST_CONTROL"] = str(folder)
    run_job(**job(tabular["input"], folder / "out"))
    return folder / "out"


def cli_args(data: Path, output: Path) -> list[str]:
    """`batchinfer run` arguments for the same job as `job()`."""
    return [
        "run",
        "--input",
        str(data),
        "--output",
        str(output),
        "--model",
        MODEL,
        "--features",
        ",".join(FEATURES),
        "--devices",
        "cpu",
        "--shard-rows",
        "5000",
        "--batch-size",
        "500",
    ]


def merged(output: Path | str, **options) -> pl.DataFrame:
    return pl.read_parquet(f"{output}/predictions/*.parquet", **options).sort("id")


def markers(output: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (output / "markers").glob("*.json")}


def assert_same_as_clean(output: Path, clean: Path) -> None:
    assert (output / "_SUCCESS").exists()
    assert merged(output).equals(merged(clean))

    def by_slice(folder: Path) -> dict[tuple[str, int], bytes]:
        return {
            (Path(m["partition_uri"]).name, m["shard"]["row_start"]): (folder / "shards" / f"{k}.parquet").read_bytes()
            for k, m in markers(folder).items()
        }

    assert by_slice(output) == by_slice(clean)  # every shard file has the same bytes as a clean run's


def assert_committed_whole(output: Path) -> None:
    """A reader never sees a marker without its data, nor _SUCCESS over an incomplete run."""
    for shard_id, marker in markers(output).items():
        assert (output / "shards" / f"{shard_id}.parquet").exists()
        assert pl.read_parquet(output / "shards" / f"{shard_id}.parquet").height == marker["rows_out"]
    assert not (output / "_SUCCESS").exists()


def test_shard_failing_once_then_rerun(data, tmp_path, control, clean):
    output = tmp_path / "out"
    (control / "fail").write_text("value 6000 6001 once")
    with pytest.raises(RunFailed, match="injected failure"):
        run_job(**job(str(data), output))
    assert_committed_whole(output)
    before = markers(output)
    assert len(before) == 3
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["state"] == "failed"
    assert [s["state"] for s in manifest["shards"]].count("failed") == 1

    report = run_job(**job(str(data), output))
    assert report["ok"] and report["shards_run"] == 1 and report["shards_skipped"] == 3
    after = markers(output)
    assert all(after[k]["finished_at"] == v["finished_at"] for k, v in before.items())  # not recomputed
    assert_same_as_clean(output, clean)


def test_transient_errors_are_retried_deterministic_ones_are_not(data, tmp_path, control):
    (control / "fail").write_text("connection 0 1 once")
    report = run_job(**job(str(data), tmp_path / "a"))
    assert report["ok"]
    assert (control / "calls").read_text().split("\n")[0].startswith("connection")

    (control / "calls").unlink()
    (control / "fail").write_text("value 0 1")
    with pytest.raises(RunFailed):
        run_job(**job(str(data), tmp_path / "b"))
    assert (control / "calls").read_text().strip().splitlines() == ["value 0"]  # one attempt, no retries


def test_cli_rerun_uses_the_recorded_parameters(data, tmp_path, control, clean, capsys):
    output = tmp_path / "out"
    (control / "fail").write_text("value 12000 12001")
    assert main(cli_args(data, output)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "injected failure" in err[0]
    assert main(["status", "--output", str(output)]) == 0
    status = capsys.readouterr().out
    assert "3/4 shards done" in status and "failed" in status
    (control / "fail").unlink()
    assert main(["rerun", "--output", str(output)]) == 0
    assert "1 run, 3 already done" in capsys.readouterr().out
    assert_same_as_clean(output, clean)


def cli_env(control: Path) -> dict[str, str]:
    """A `batchinfer` process on its own embedded Prefect server, in the suite's Prefect home: one home
    for every run, as a user has (a killed run must not spoil the home for the runs after it)."""
    env = {**os.environ, "PYTHONPATH": python_path(), "BATCHINFER_TEST_CONTROL": str(control)}
    env.pop("PREFECT_API_URL", None)
    return env


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid`, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_all_end(pids: set[int], timeout: float = 15.0) -> None:
    """The embedded server and any pool workers of a stopped run end soon after it (none left orphaned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in pids if _alive(pid)]


@pytest.mark.parametrize(
    ("engine", "server"),
    [("local", "embedded"), ("processes", "embedded"), ("local", "running")],
    ids=["local", "processes", "running-server"],
)
def test_sigkill_mid_shard_then_the_same_command_finishes(data, tmp_path, control, clean, engine, server, request):
    """SIGKILL mid-shard, then the same command with the same Prefect home (embedded server, default tag), or
    against the same `prefect server start`: nothing of the killed run lives on, the rerun neither hangs nor
    recomputes what was committed, and it ends with a clean run's bytes."""
    output = tmp_path / "out"
    (control / "sleep").write_text("0.25")
    env = cli_env(control)
    if server == "running":
        stack = request.getfixturevalue("stack")
        env.update(PREFECT_API_URL=stack.api_url, PREFECT_HOME=str(stack.home))
    args = [sys.executable, "-m", "cli", *cli_args(data, output), "--engine", engine]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list((output / "markers").glob("*.json"))) < 1:
        time.sleep(0.05)
    time.sleep(0.6)  # well inside the next shard
    children = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_all_end(children)
    assert_committed_whole(output)
    before = markers(output)
    assert 1 <= len(before) < 4
    stale = output / "shards" / ".tmp-0123456789abcdef.parquet"  # what a writer killed mid-file leaves
    stale.write_bytes(b"PAR1 half a file")

    (control / "sleep").unlink()
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{4 - len(before)} run, {len(before)} already done" in done.stdout
    assert all(markers(output)[k]["finished_at"] == v["finished_at"] for k, v in before.items())
    assert not list((output / "shards").glob(".tmp-*"))
    assert_same_as_clean(output, clean)


@pytest.mark.parametrize("engine", ["local", "processes"])
def test_sigterm_mid_run_exits_143_with_one_line_and_leaves_nothing_running(data, tmp_path, control, engine):
    output = tmp_path / "out"
    (control / "sleep").write_text("0.5")
    env = cli_env(control)
    args = [sys.executable, "-m", "cli", *cli_args(data, output), "--engine", engine]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (control / "loads").exists():  # a shard is scoring
        time.sleep(0.05)
    children = _children(proc.pid)
    assert children, "the embedded server (and the pool's workers) run as child processes"
    [server] = [pid for pid in children if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    environ = dict(
        entry.split(b"=", 1) for entry in Path(f"/proc/{server}/environ").read_bytes().split(b"\0") if b"=" in entry
    )
    # The embedded server records task runs in batches, as cli.main.SERVER_SETTINGS asks.
    assert {k: environ.get(k.encode(), b"").decode() for k in SERVER_SETTINGS} == SERVER_SETTINGS
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (130, 143)
    lines = stderr.strip().splitlines()
    assert lines == ["batchinfer: terminated (SIGTERM); rerun the same command to finish the missing shards"]
    _assert_all_end(children)
    assert not (output / "_SUCCESS").exists()


def test_corrupt_partition_replaced_before_rerun(data, tmp_path, control, clean):
    output = tmp_path / "out"
    victim = data / "part-00002.parquet"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # truncated: no footer
    with pytest.raises(InputError, match="part-00002.parquet is not a readable Parquet file"):
        run_job(**job(str(data), output))
    assert not (output / "markers").exists()

    broken = bytearray(good)  # footer intact, data pages damaged: found while reading the shard
    broken[200:20_000] = bytes(19_800)
    victim.write_bytes(bytes(broken))
    with pytest.raises((RunFailed, InputError), match="part-00002.parquet"):
        run_job(**job(str(data), output))
    assert_committed_whole(output)
    done = markers(output)
    assert all("part-00002" not in m["partition_uri"] for m in done.values())

    victim.write_bytes(good)
    report = run_job(**job(str(data), output))
    assert report["ok"] and report["shards_run"] == 4 - len(done)
    assert_same_as_clean(output, clean)


def test_incremental_runs_follow_the_input(data, tmp_path, control):
    output = tmp_path / "out"
    extra = data.parent / "extra"
    extra.mkdir()
    shutil.move(data / "part-00003.parquet", extra / "part-00003.parquet")
    first = run_job(**job(str(data), output))
    assert first["ok"] and first["rows_out"] == 15_000

    shutil.move(extra / "part-00003.parquet", data / "part-00003.parquet")  # new data arrived
    second = run_job(**job(str(data), output))
    assert second["shards_run"] == 1 and second["shards_skipped"] == 3 and second["rows_out"] == 20_000

    from batchinfer.demo import tabular_frame

    tabular_frame(5_000, seed=99, start_id=0).write_parquet(data / "part-00000.parquet", row_group_size=1_000)
    third = run_job(**job(str(data), output))  # a changed partition is rescored
    assert third["shards_run"] == 1 and third["shards_skipped"] == 3
    (data / "part-00001.parquet").unlink()  # a removed partition leaves the result
    fourth = run_job(**job(str(data), output))
    assert fourth["ok"] and fourth["shards_run"] == 0 and fourth["rows_out"] == 15_000
    ids = merged(output)["id"]
    assert ids.n_unique() == 15_000 and not ids.is_between(5_000, 9_999).any()
    manifest = json.loads((output / "manifest.json").read_text())
    assert [Path(p["uri"]).name for p in manifest["partitions"]] == [
        "part-00000.parquet",
        "part-00002.parquet",
        "part-00003.parquet",
    ]
    assert len(list((output / "markers").glob("*.json"))) == 3  # stale shards were removed
    assert len(list((output / "predictions").glob("*.parquet"))) == 3


def test_partial_result_lists_what_is_missing(data, tmp_path, control):
    output = tmp_path / "out"
    (control / "fail").write_text("value 4000 4001")
    report = run_job(**job(str(data), output, min_success_ratio=0.75))
    assert report["ok"] and report["shards_failed"] == 1 and report["missing_keys"] == 5_000
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["state"] == "partial"
    assert list(manifest["validation"]["failed_shards"].values())[0].count("injected failure") == 1
    missing = pl.read_parquet(output / "missing_keys.parquet")["id"].sort()
    assert missing.to_list() == list(range(0, 5_000))
    assert (output / "_SUCCESS").exists()
    assert merged(output).height == 15_000


def test_s3_outage_mid_run_then_rerun(tabular, s3_bucket, s3_server, tmp_path, control, clean):
    import s3fs

    bucket, _ = s3_bucket
    proxy = Proxy(s3_server.port, free_port())
    proxy.start()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
    }
    fs = s3fs.S3FileSystem(**s3_server.options())
    fs.put(tabular["input"] + "/", f"{bucket}/data/", recursive=True)
    (control / "sleep").write_text("0.1")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = run_job(**job(f"{bucket}/data", f"{bucket}/out", storage_options=options))
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(fs.glob(f"{bucket}/out/markers/*.json")) < 1:
        fs.invalidate_cache()
        time.sleep(0.1)
    proxy.stop()
    time.sleep(3)
    proxy.start()
    thread.join(timeout=240)
    fs.invalidate_cache()
    if "error" in outcome:  # the outage outlasted the retries: the rerun finishes the job
        assert not fs.exists(f"{bucket}/out/_SUCCESS")
        outcome["report"] = run_job(**job(f"{bucket}/data", f"{bucket}/out", storage_options=options))
    proxy.stop()
    assert outcome["report"]["ok"]
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/out/_SUCCESS")
    local = tmp_path / "copy"
    fs.get(f"{bucket}/out/predictions/", str(local) + "/", recursive=True)
    assert pl.read_parquet(f"{local}/*.parquet").sort("id").equals(merged(clean))
