"""Bad input ends in one clear line naming the file, column or value, and a non-zero exit.

Most cases are refused before Prefect starts (exit 2); the few that only scoring
can find (bad feature values, a model returning the wrong shape) run the real
flow and end with exit 1. Committed output is never damaged by a refused run.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from batchinfer.demo import FEATURE_NAMES, tabular_frame
from batchinfer.models.base import resolve_model
from batchinfer.models.checkpoints import ALLOW_PICKLE_ENV
from batchinfer.models.mlp import MLP, save_checkpoint
from cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from tests.conftest import S3Server, free_port

ROWS_PER_PART = 150


# -- helpers ----------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run `batchinfer ARGV` in this process; return the exit code and the one stderr line."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    if code == EXIT_OK:
        assert not lines, err
        return code, out
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    return code, lines[0]


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The line of a run refused as bad input (exit 2)."""
    code, line = cli(capsys, *argv)
    assert code == EXIT_BAD_INPUT, line
    assert line.startswith("batchinfer: error: "), line
    return line.removeprefix("batchinfer: error: ")


def write(folder: Path, name: str, frame: pl.DataFrame, row_group_size: int = 50) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    frame.write_parquet(path, row_group_size=row_group_size)
    return path


def parts(start: int = 0) -> list[pl.DataFrame]:
    return [tabular_frame(ROWS_PER_PART, seed=p, start_id=start + p * ROWS_PER_PART) for p in range(2)]


def write_parts(folder: Path, frames: list[pl.DataFrame]) -> list[Path]:
    return [write(folder, f"part-{i:05d}.parquet", frame) for i, frame in enumerate(frames)]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under a folder and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Two good partitions of 64 float32 features and an MLP checkpoint that names them."""
    root = tmp_path_factory.mktemp("bad-input")
    write_parts(root / "good", parts())
    torch.manual_seed(0)
    model = MLP([len(FEATURE_NAMES), 16, 10])
    save_checkpoint(model, str(root / "mlp.safetensors"), FEATURE_NAMES)
    return {"root": root, "good": str(root / "good"), "checkpoint": str(root / "mlp.safetensors"), "model": model}


def mlp_args(data: dict, input_uri: str, output: str, *extra: str) -> list[str]:
    return [
        "run",
        "--input",
        input_uri,
        "--output",
        output,
        "--model",
        "mlp",
        "--checkpoint",
        data["checkpoint"],
        "--devices",
        "cpu",
        *extra,
    ]


# -- input ------------------------------------------------------------------------


def test_input_missing(data, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert refused(capsys, *mlp_args(data, str(missing), str(tmp_path / "out"))) == f"input {missing} does not exist"
    assert not (tmp_path / "out").exists()


def test_input_empty_folder(data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = refused(capsys, *mlp_args(data, str(tmp_path / "empty"), str(tmp_path / "out")))
    assert line == f"no Parquet files under {tmp_path / 'empty'}"


def test_input_without_parquet_files(data, tmp_path, capsys):
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "rows.csv").write_text("id,f00\n1,0.5\n")
    (folder / "_SUCCESS").write_text("")
    assert refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out"))) == f"no Parquet files under {folder}"


def test_file_that_is_not_parquet(data, tmp_path, capsys):
    folder = tmp_path / "in"
    write_parts(folder, parts())
    bad = folder / "part-00002.parquet"
    bad.write_text("id,f00\n1,0.5\n" * 20)
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line.startswith(f"{bad} is not a readable Parquet file (")
    assert "magic bytes" in line


def test_truncated_parquet_file(data, tmp_path, capsys):
    folder = tmp_path / "in"
    paths = write_parts(folder, parts())
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) // 2])
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line.startswith(f"{paths[1]} is not a readable Parquet file (")


def test_parquet_footer_intact_but_data_corrupt(data, tmp_path, capsys):
    """Planning reads only footers; the key check reads data pages and names the file."""
    folder = tmp_path / "in"
    paths = write_parts(folder, parts())
    raw = bytearray(paths[0].read_bytes())
    raw[4:2000] = b"\xff" * 1996  # first data pages (the key column), footer untouched
    paths[0].write_bytes(bytes(raw))
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line.startswith(f"{paths[0]} is corrupt or unreadable (")


def test_partitions_with_disagreeing_schemas(data, tmp_path, capsys):
    folder = tmp_path / "in"
    first, second = parts()
    paths = write_parts(folder, [first, second.with_columns(pl.col("f05").cast(pl.Float64))])
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line == f"column 'f05' is double in {paths[1]} but float in {paths[0]}"


# -- columns ----------------------------------------------------------------------


def test_key_column_missing(data, capsys, tmp_path):
    line = refused(capsys, *mlp_args(data, data["good"], str(tmp_path / "out"), "--key-column", "row_id"))
    assert line == f"column 'row_id' is missing from {data['good']}/part-00000.parquet"


@pytest.mark.parametrize(
    ("passthrough", "expected"),
    [
        ("id", "'id' is the key column, which every output row holds already (got 'id')"),
        (
            "f00,prediction",
            "'prediction' is the name of an output column (prediction, probabilities, label, labels, predictions, embedding, output) "
            "(got 'f00,prediction')",
        ),
        ("f00,f01,f00", "'f00' is listed twice (got 'f00,f01,f00')"),
    ],
    ids=["key", "output-column", "twice"],
)
def test_passthrough_that_would_overwrite_a_column(data, tmp_path, capsys, passthrough, expected):
    """Caught before planning: otherwise the column would silently replace another in every shard."""
    out = tmp_path / "out"
    line = refused(capsys, *mlp_args(data, data["good"], str(out), "--passthrough", passthrough))
    assert line == f"--passthrough: {expected}"
    assert not out.exists()


def test_key_column_null(data, tmp_path, capsys):
    folder = tmp_path / "in"
    first, second = parts()
    ids = second["id"].to_list()
    ids[7] = None
    paths = write_parts(folder, [first, second.with_columns(pl.Series("id", ids, pl.Int64))])
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line == f"key column 'id' has 1 null value(s) in {paths[1]} (first at row 7)"


def test_key_duplicated_within_a_partition(data, tmp_path, capsys):
    folder = tmp_path / "in"
    first, second = parts()
    ids = first["id"].to_list()
    ids[120] = ids[3]
    paths = write_parts(folder, [first.with_columns(pl.Series("id", ids, pl.Int64)), second])
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line == f"key column 'id' is not unique: {ids[3]} appears twice in {paths[0]}"


def test_key_duplicated_across_partitions(data, tmp_path, capsys):
    folder = tmp_path / "in"
    first, second = parts()
    ids = second["id"].to_list()
    ids[40] = 12
    paths = write_parts(folder, [first, second.with_columns(pl.Series("id", ids, pl.Int64))])
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line == f"key column 'id' is not unique: 12 appears in {paths[0]} and {paths[1]}"


def test_feature_column_missing_from_one_partition(data, tmp_path, capsys):
    folder = tmp_path / "in"
    first, second = parts()
    paths = write_parts(folder, [first, second.drop("f10")])
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line == f"column 'f10' is missing from {paths[1]}"


def test_feature_named_on_the_command_line_missing(data, capsys, tmp_path):
    line = refused(
        capsys,
        "plan",
        "--input",
        data["good"],
        "--model",
        "tests.test_bad_input:wrong_shape",
        "--features",
        "f00,f01,zz",
    )
    assert line == f"feature column 'zz' is missing from {data['good']}/part-00000.parquet"


def test_feature_column_of_wrong_type(data, tmp_path, capsys):
    folder = tmp_path / "in"
    frames = [f.with_columns(pl.col("f03").cast(pl.String)) for f in parts()]
    paths = write_parts(folder, frames)
    line = refused(capsys, *mlp_args(data, str(folder), str(tmp_path / "out")))
    assert line.startswith("feature column 'f03' has type ")
    assert line.endswith(f"string in {paths[0]}; expected a number")


def test_text_column_of_wrong_type(tmp_path, capsys):
    path = write(tmp_path / "in", "part-0.parquet", pl.DataFrame({"id": [1, 2], "text": [3, 4]}))
    line = refused(capsys, "plan", "--input", str(tmp_path / "in"), "--model", "minilm", "--text-column", "text")
    assert line == f"text column 'text' has type int64 in {path}; expected a string"


# -- model ------------------------------------------------------------------------


def test_checkpoint_missing(data, tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")
    args = mlp_args(data, data["good"], str(tmp_path / "out"))
    args[args.index(data["checkpoint"])] = missing
    assert refused(capsys, *args) == f"checkpoint {missing} does not exist"


def _with_checkpoint(data: dict, output: str, checkpoint: Path, *extra: str) -> list[str]:
    args = mlp_args(data, data["good"], output, *extra)
    args[args.index(data["checkpoint"])] = str(checkpoint)
    return args


def test_checkpoint_truncated(data, tmp_path, capsys):
    whole = Path(data["checkpoint"]).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    line = refused(capsys, *_with_checkpoint(data, str(tmp_path / "out"), cut))
    assert line.startswith(f"checkpoint {cut} is not a valid safetensors file (truncated or corrupt: ")


def test_checkpoint_of_another_architecture(data, tmp_path, capsys):
    other = tmp_path / "encoder.safetensors"
    save_file({"encoder.weight": torch.zeros(8, 64), "decoder.weight": torch.zeros(64, 8)}, str(other))
    line = refused(capsys, *_with_checkpoint(data, str(tmp_path / "out"), other))
    assert line == f"checkpoint {other} is not an MLP checkpoint (unexpected tensors: decoder.weight, encoder.weight)"


def test_checkpoint_whose_layers_do_not_chain(data, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    tensors = {
        "layers.0.weight": torch.zeros(16, 64),
        "layers.0.bias": torch.zeros(16),
        "layers.1.weight": torch.zeros(10, 32),
        "layers.1.bias": torch.zeros(10),
    }
    save_file(tensors, str(broken))
    line = refused(capsys, *_with_checkpoint(data, str(tmp_path / "out"), broken, "--features", "f*"))
    assert line == (f"checkpoint {broken}: layers.1.weight expects 32 inputs but layers.0 gives 16 (shape mismatch)")


def test_checkpoint_for_another_input_width(data, tmp_path, capsys):
    """No feature names recorded: the width still has to match the columns given."""
    narrow = tmp_path / "narrow.safetensors"
    state = {k: v.contiguous() for k, v in MLP([32, 16, 10]).state_dict().items()}
    save_file(state, str(narrow))
    line = refused(capsys, *_with_checkpoint(data, str(tmp_path / "out"), narrow, "--features", "f*"))
    assert line == (
        f"checkpoint {narrow} takes 32 features (layers.0.weight is [16, 32]) but 64 feature columns "
        f"were given (shape mismatch)"
    )


def test_pickle_checkpoint_is_refused_without_opt_in(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    pickled = tmp_path / "mlp.pt"
    torch.save(data["model"].state_dict(), pickled)
    line = refused(capsys, *_with_checkpoint(data, str(tmp_path / "out"), pickled, "--features", "f*"))
    assert line == (
        f"checkpoint {pickled} is a pickle file; pickles can run code when loaded, so batchinfer refuses them. "
        f"Convert it to safetensors, or set {ALLOW_PICKLE_ENV}=1 to load it with torch.load(weights_only=True)"
    )


def test_pickle_checkpoint_with_opt_in_loads_the_same_weights(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    pickled = tmp_path / "mlp.pt"
    torch.save(data["model"].state_dict(), pickled)
    code, out = cli(
        capsys, "plan", "--input", data["good"], "--model", "mlp", "--checkpoint", str(pickled), "--features", "f*"
    )
    assert code == EXIT_OK and "2 partitions" in out
    spec = resolve_model(
        "mlp", checkpoint=str(pickled), precision="fp32", features=None, text_column=None, storage_options={}
    )
    x = torch.randn(5, 64)
    with torch.inference_mode():
        expected = torch.softmax(data["model"](x), dim=1)
        got = spec.load(torch.device("cpu")).predict(x)
    assert torch.equal(got, expected)


class Booby:
    """Unpickling this runs code: it opens (and so creates) a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_that_runs_code_is_refused_even_with_opt_in(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    trap = tmp_path / "code-ran"
    pickled = tmp_path / "evil.pt"
    torch.save({**data["model"].state_dict(), "payload": Booby(trap)}, pickled)
    line = refused(capsys, *_with_checkpoint(data, str(tmp_path / "out"), pickled))
    assert line == (
        f"checkpoint {pickled} could not be loaded with weights_only=True: "
        "Unsupported global: GLOBAL io.open was not an allowed global by default"
    )
    assert not trap.exists(), "the pickle's code ran"


class _Custom:
    input_kind = "features"
    output_kind = "classifier"

    def __init__(self, fn):
        self.fn = fn

    def load(self, device):
        return self

    def predict(self, batch):
        return self.fn(batch)


def wrong_shape() -> _Custom:
    return _Custom(lambda x: torch.full((x.shape[0], 3, 2), 1 / 6))


def wrong_dtype() -> _Custom:
    return _Custom(lambda x: torch.ones((x.shape[0], 3), dtype=torch.int64))


def test_custom_model_that_does_not_import(data, tmp_path, capsys):
    args = mlp_args(data, data["good"], str(tmp_path / "out"))
    args[args.index("mlp")] = "no_such_package.models:build"
    line = refused(capsys, *args)
    assert line == (
        "--model 'no_such_package.models:build': module 'no_such_package.models' does not import "
        "(No module named 'no_such_package')"
    )


def test_custom_model_without_the_factory(data, tmp_path, capsys):
    args = mlp_args(data, data["good"], str(tmp_path / "out"))
    args[args.index("mlp")] = "tests.test_bad_input:nothing_here"
    line = refused(capsys, *args)
    assert (
        line
        == "--model 'tests.test_bad_input:nothing_here': module 'tests.test_bad_input' has no attribute 'nothing_here'"
    )


CLASSIFIER = ("--output-kind", "classifier")  # an exported file's logits, read as class scores


def _scripted(path: Path, width: int) -> Path:
    torch.jit.save(torch.jit.script(torch.nn.Linear(width, 3)), str(path))
    return path


def _run_exported(data: dict, tmp_path: Path, model: Path, features: str) -> list[str]:
    """`batchinfer run` with an exported model: its check runs before Prefect starts (`plan` runs no model)."""
    out = str(tmp_path / "out")
    return ["run", "--input", data["good"], "--output", out, "--model", str(model), "--features", features, *CLASSIFIER]


def test_torchscript_file_that_does_not_match_the_features(data, tmp_path, capsys):
    model = _scripted(tmp_path / "linear8.pt", 8)
    line = refused(capsys, *_run_exported(data, tmp_path, model, "f*"))
    assert line == (
        f"{model} does not accept a [rows, 64] float32 input as --features declares "
        "(RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x64 and 8x3))"
    )


def test_torchscript_file_that_matches_the_features(data, capsys, tmp_path):
    """The same check passes when the globbed columns give the width the model takes."""
    model = _scripted(tmp_path / "linear8.pt", 8)
    code, out = cli(
        capsys, "plan", "--input", data["good"], "--model", str(model), "--features", "f0[0-7]", *CLASSIFIER
    )
    assert code == EXIT_OK and out.startswith(f"2 partitions, 2 shards, {2 * ROWS_PER_PART} rows")


def test_torch_export_file_that_does_not_match_the_features(data, tmp_path, capsys):
    program = torch.export.export(torch.nn.Linear(8, 3), (torch.zeros(2, 8),))
    path = tmp_path / "linear8.pt2"
    torch.export.save(program, str(path))
    line = refused(capsys, *_run_exported(data, tmp_path, path, "f*"))
    assert line == (
        f"{path} does not accept a [rows, 64] float32 input as --features declares (Guard failed: input.size()[1] == 8)"
    )


def test_torch_export_file_with_a_fixed_batch_size(data, tmp_path, capsys):
    """Exported for batches of exactly 2 rows: refused up front, not at the first batch of another size."""
    program = torch.export.export(torch.nn.Linear(8, 3), (torch.zeros(2, 8),))
    path = tmp_path / "batch2.pt2"
    torch.export.save(program, str(path))
    line = refused(capsys, *_run_exported(data, tmp_path, path, "f0[0-7]"))
    assert line == (
        f"{path} does not accept a [rows, 8] float32 input as --features declares (Guard failed: input.size()[0] == 2)"
    )


def test_model_file_that_is_not_a_model(data, tmp_path, capsys):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a model at all")
    line = refused(capsys, *_run_exported(data, tmp_path, path, "f*"))
    assert line.startswith(f"{path} is not a loadable torch.export program (")


# -- output -----------------------------------------------------------------------


def test_output_equal_to_input(data, capsys):
    line = refused(capsys, *mlp_args(data, data["good"], data["good"]))
    assert line == f"--output {data['good']} is inside --input {data['good']}; pick another output"


def test_output_inside_input(data, capsys):
    inside = data["good"] + "/predictions"
    line = refused(capsys, *mlp_args(data, data["good"], inside))
    assert line == f"--output {inside} is inside --input {data['good']}; pick another output"
    assert not Path(inside).exists()


def test_input_inside_output(data, capsys):
    parent = str(Path(data["good"]).parent)
    line = refused(capsys, *mlp_args(data, data["good"], parent))
    assert line == f"--input {data['good']} is inside --output {parent}; pick another output"


# -- parameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--batch-size", "0", "--batch-size: must be a positive number of rows, or 'auto' (got 0)"),
        ("--batch-size", "-8", "--batch-size: must be a positive number of rows, or 'auto' (got -8)"),
        ("--batch-size", "many", "argument --batch-size: must be a whole number, got 'many'"),
        ("--shard-rows", "-1", "--shard-rows: must be at least 1 (got -1)"),
        ("--shard-rows", "0", "--shard-rows: must be at least 1 (got 0)"),
        (
            "--precision",
            "fp8",
            "argument --precision: invalid choice: 'fp8' (choose from 'fp32', 'bf16', 'fp16', 'int8')",
        ),
        (
            "--storage-options",
            '{"key": "k", "secret": "hunter2"',
            "--storage-options is not valid JSON: Expecting ',' delimiter at line 1 column 33",
        ),
        ("--storage-options", '["hunter2"]', "--storage-options must be a JSON object, e.g. '{\"anon\": false}'"),
    ],
)
def test_bad_parameter(data, tmp_path, capsys, flag, value, expected):
    assert refused(capsys, *mlp_args(data, data["good"], str(tmp_path / "out"), flag, value)) == expected
    assert not (tmp_path / "out").exists()


# -- S3 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_with_auth(tmp_path_factory):
    """A second moto S3 server that checks credentials.

    Users: `admin` (everything), `reader` (get and list only), `nobody` (no rights). Bucket `data`
    holds one partition under `in/`. Returns a function giving --storage-options JSON for a user or
    for an explicit key and secret.
    """
    import boto3

    server = S3Server(free_port(), tmp_path_factory.mktemp("moto-auth"))
    server.start()
    try:
        endpoint = server.endpoint
        iam = boto3.client("iam", endpoint_url=endpoint)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="data")
        body = io.BytesIO()
        tabular_frame(10).write_parquet(body)
        s3.put_object(Bucket="data", Key="in/part-0.parquet", Body=body.getvalue())
        policies = {
            "admin": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            "reader": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
            "nobody": None,
        }
        keys = {}
        for user, statements in policies.items():
            iam.create_user(UserName=user)
            if statements:
                document = json.dumps({"Version": "2012-10-17", "Statement": statements})
                iam.put_user_policy(UserName=user, PolicyName="policy", PolicyDocument=document)
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        # From now on every request must be signed by a known key whose policy allows it.
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request, timeout=10).close()

        def options(user: str | None = None, key: str = "", secret: str = "") -> str:
            if user:
                key, secret = keys[user]["AccessKeyId"], keys[user]["SecretAccessKey"]
            return json.dumps({"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint}})

        yield options
    finally:
        server.stop()


def _plan_s3(uri: str, options: str) -> list[str]:
    return ["plan", "--input", uri, "--model", "tests.test_bad_input:wrong_shape", "--features", "f*",
            "--storage-options", options]  # fmt: skip


@pytest.mark.s3
def test_s3_bucket_missing(s3_with_auth, capsys):
    line = refused(capsys, *_plan_s3("s3://no-such-bucket/in", s3_with_auth("admin")))
    assert line == "input s3://no-such-bucket/in: the bucket 'no-such-bucket' does not exist"


@pytest.mark.s3
def test_s3_output_bucket_missing(data, s3_server, capsys, tmp_path):
    options = json.dumps(s3_server.options())
    line = refused(capsys, *mlp_args(data, data["good"], "s3://no-such-bucket/out", "--storage-options", options))
    assert line == "--output s3://no-such-bucket/out: the bucket 'no-such-bucket' does not exist"


@pytest.mark.s3
def test_s3_unknown_access_key(s3_with_auth, capsys):
    secret = "wrong-secret-5b1e"
    line = refused(capsys, *_plan_s3("s3://data/in", s3_with_auth(key="AKIANOSUCHKEY000", secret=secret)))
    assert line == "listing s3://data/in failed: the access key id is not known to the server (check the credentials)"


@pytest.mark.s3
def test_s3_wrong_secret(s3_with_auth, capsys):
    admin = json.loads(s3_with_auth("admin"))
    line = refused(capsys, *_plan_s3("s3://data/in", s3_with_auth(key=admin["key"], secret="not-the-secret-7c2d")))
    assert line == (
        "listing s3://data/in failed: the secret key does not match the access key id (check the credentials)"
    )
    assert admin["secret"] not in line


@pytest.mark.s3
def test_s3_access_denied(s3_with_auth, capsys):
    line = refused(capsys, *_plan_s3("s3://data/in", s3_with_auth("nobody")))
    assert line == "listing s3://data/in failed: access denied (the credentials lack permission for it)"


@pytest.mark.s3
def test_s3_good_credentials_reach_the_data(s3_with_auth, capsys):
    """The same server and bucket with the admin's keys: the refusals above are about the keys."""
    code, out = cli(capsys, *_plan_s3("s3://data/in", s3_with_auth("admin")))
    assert code == EXIT_OK and out.startswith("1 partitions, 1 shards, 10 rows")


# -- found while scoring: these run the real flow ---------------------------------


@pytest.mark.s3
@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_s3_output_not_writable(data, s3_with_auth, capsys):
    """Read access is not write access: the first write fails with one line, and nothing is left behind."""
    options = s3_with_auth("reader")
    code, line = cli(capsys, *mlp_args(data, "s3://data/in", "s3://data/out", "--storage-options", options))
    assert code == EXIT_BAD_INPUT
    assert line == (
        "batchinfer: error: writing s3://data/out/.batchinfer.lock failed: access denied "
        "(the credentials lack permission for it)"
    )
    admin = json.loads(s3_with_auth("admin"))
    import s3fs

    fs = s3fs.S3FileSystem(key=admin["key"], secret=admin["secret"], client_kwargs=admin["client_kwargs"])
    assert fs.find("data/out") == []


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_bad_feature_values_fail_or_go_to_errors(data, tmp_path, capsys):
    folder = tmp_path / "in"
    first, second = parts()
    f03, f07, f10 = second["f03"].to_list(), second["f07"].to_list(), second["f10"].to_list()
    f03[5], f07[10], f10[20] = float("nan"), float("inf"), None
    second = second.with_columns(
        pl.Series("f03", f03, pl.Float32), pl.Series("f07", f07, pl.Float32), pl.Series("f10", f10, pl.Float32)
    )
    paths = write_parts(folder, [first, second])
    bad_ids = [ROWS_PER_PART + 5, ROWS_PER_PART + 10, ROWS_PER_PART + 20]
    shard_rows = ("--shard-rows", str(ROWS_PER_PART))

    out = tmp_path / "out"
    code, line = cli(capsys, *mlp_args(data, str(folder), str(out), *shard_rows))
    assert code == EXIT_FAILED
    assert line.startswith("batchinfer: run failed: shard ") and line.endswith(
        f"{paths[1]}: 3 of {ROWS_PER_PART} rows cannot be scored (e.g. column 'f03' is NaN); --max-error-ratio is 0.0"
    )
    assert not (out / "_SUCCESS").exists() and not list((out / "errors").glob("*.parquet"))
    good_shard = tree_digest(out / "shards")
    assert len(good_shard) == 1 and len(list((out / "markers").glob("*.json"))) == 1, "the good shard was committed"

    # A tolerant ratio on the same output: the committed shard is kept as it is, the other is scored.
    code, summary = cli(capsys, *mlp_args(data, str(folder), str(out), *shard_rows, "--max-error-ratio", "0.05"))
    assert code == EXIT_OK and "(1 run, 1 already done)" in summary
    assert tree_digest(out / "shards").items() >= good_shard.items()
    errors = pl.read_parquet(out / "errors" / "*.parquet").sort("id")
    assert errors.to_dicts() == [
        {"id": bad_ids[0], "reason": "column 'f03' is NaN"},
        {"id": bad_ids[1], "reason": "column 'f07' is inf"},
        {"id": bad_ids[2], "reason": "column 'f10' is null"},
    ]
    merged = pl.read_parquet(out / "predictions" / "*.parquet")
    assert merged.height == 2 * ROWS_PER_PART - 3 and not set(bad_ids) & set(merged["id"].to_list())
    assert (out / "_SUCCESS").exists()


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_text_nulls_empty_and_very_long(tmp_path, capsys):
    long_text = "parquet shards " * 4_000
    texts = ["short sentence", "", None, long_text, "another one", "parquet shards " * 400]
    write(tmp_path / "in", "part-0.parquet", pl.DataFrame({"id": list(range(6)), "text": texts}))
    args = ["run", "--input", str(tmp_path / "in"), "--model", "minilm", "--text-column", "text", "--devices", "cpu"]

    code, line = cli(capsys, *args, "--output", str(tmp_path / "strict"))
    assert code == EXIT_FAILED
    assert line.endswith("1 of 6 rows cannot be scored (e.g. text column 'text' is null); --max-error-ratio is 0.0")

    out = tmp_path / "tolerant"
    code, _ = cli(capsys, *args, "--output", str(out), "--max-error-ratio", "0.2", "--batch-size", "2")
    assert code == EXIT_OK
    assert pl.read_parquet(out / "errors" / "*.parquet").to_dicts() == [
        {"id": 2, "reason": "text column 'text' is null"}
    ]
    got = {r["id"]: np.array(r["embedding"]) for r in pl.read_parquet(out / "predictions" / "*.parquet").to_dicts()}
    assert sorted(got) == [0, 1, 3, 4, 5]
    for vector in got.values():
        assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-3
    # Both long texts are cut to the model's 256 tokens, so they embed alike.
    assert np.abs(got[3] - got[5]).max() < 1e-5
    assert np.abs(got[0] - got[3]).max() > 1e-2


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("wrong_shape", "the model returned shape ({n}, 3, 2) for {n} rows; expected [{n}, width]"),
        ("wrong_dtype", "the model returned dtype torch.int64; expected floating point"),
    ],
)
def test_custom_model_with_wrong_output(data, tmp_path, capsys, factory, expected):
    out = tmp_path / "out"
    one_file = data["good"] + "/part-00000.parquet"
    args = mlp_args(data, one_file, str(out), "--features", "f*", "--batch-size", "64")
    args[args.index("mlp")] = f"tests.test_bad_input:{factory}"
    code, line = cli(capsys, *args)
    assert code == EXIT_FAILED
    assert line.startswith("batchinfer: run failed: shard ")
    assert line.endswith(expected.format(n=64))
    assert not (out / "_SUCCESS").exists() and not list((out / "markers").glob("*.json"))


@pytest.mark.prefect_server
@pytest.mark.usefixtures("prefect_server")
def test_output_holding_another_run_is_refused_unless_overwrite(data, tmp_path, capsys):
    out, one_file = tmp_path / "out", data["good"] + "/part-00000.parquet"
    code, _ = cli(capsys, *mlp_args(data, one_file, str(out)))
    assert code == EXIT_OK
    before = tree_digest(out)

    line = refused(capsys, *mlp_args(data, one_file, str(out), "--passthrough", "f00"))
    assert line == (
        f"--output {out} holds a run with another configuration (model, batch size, columns or input differ); "
        f"use --overwrite to replace it or pick a new output"
    )
    assert tree_digest(out) == before, "a refused run changed committed output"

    code, _ = cli(capsys, *mlp_args(data, one_file, str(out), "--passthrough", "f00", "--overwrite"))
    assert code == EXIT_OK
    assert pl.read_parquet(out / "predictions" / "*.parquet").columns == ["id", "prediction", "probabilities", "f00"]
    assert json.loads((out / "manifest.json").read_text())["config"]["input"]["passthrough"] == ["f00"]
