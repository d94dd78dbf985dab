"""Deployments as users meet them: `prefect deploy` of deployments/prefect.yaml against a real server,
a process worker, runs started through the API the UI uses, the schedule, and the UI's Retry button.

One `prefect server start` on loopback (its own PREFECT_HOME) serves the whole file; the worker is
`prefect worker start` in a subprocess, killed at the end (it ignores SIGTERM for many seconds).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchinfer.config import GROUPS, PRECISIONS, ComputeConfig
from cli.main import build_parser, main, serve_parameters
from tests.prefect_stack import PREFECT, ROOT

server = pytest.mark.prefect_server  # the tests below that talk to `prefect server start`

FLOW = "batch-inference"
LOCAL_POOL = "batchinfer-local"
K8S_TEMPLATE = ROOT / "deployments" / "k8s" / "gpu-base-job-template.json"


@pytest.fixture(scope="module")
def deployed(stack, tabular, tmp_path_factory):
    """The README's commands: create the pools, deploy every deployment in prefect.yaml, start a worker."""
    nightly = tmp_path_factory.mktemp("nightly")
    pools = [
        ["work-pool", "create", LOCAL_POOL, "--type", "process"],
        ["work-pool", "create", "batchinfer-gpu-k8s", "--type", "kubernetes", "--base-job-template", str(K8S_TEMPLATE)],
        ["work-pool", "create", "batchinfer-gpu-docker", "--type", "process"],
    ]
    # Independent commands, each mostly Python start-up: run them side by side.
    procs = [
        subprocess.Popen([PREFECT, *argv], cwd=ROOT, env=stack.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for argv in pools
    ]
    for argv, proc in zip(pools, procs, strict=True):
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
        assert proc.returncode == 0, f"prefect {' '.join(argv)} failed:\n{output[-3000:]}"
    nightly_env = {
        "BATCHINFER_NIGHTLY_INPUT": tabular["input"],
        "BATCHINFER_NIGHTLY_OUTPUT": str(nightly / "out"),
        "BATCHINFER_NIGHTLY_CHECKPOINT": tabular["checkpoint"],
        "BATCHINFER_DASK_SCHEDULER": "tcp://10.0.0.5:8786",
    }
    stack.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all", extra_env=nightly_env)
    stack.start("worker", [PREFECT, "worker", "start", "--pool", LOCAL_POOL])
    yield {"nightly": nightly_env}
    # `prefect worker start` lets SIGTERM wait for many seconds; nothing of it needs to survive.
    stack.stop("worker", sig=signal.SIGKILL)


def deployment(client: Any, name: str) -> Any:
    return client.read_deployment_by_name(f"{FLOW}/{name}")


def run_params(tabular: dict, output: Path, **groups: dict) -> dict[str, dict]:
    params = {
        "input": {"uri": tabular["input"]},
        "model": {"model": "mlp", "checkpoint": tabular["checkpoint"]},
        "compute": {"devices": "cpu", "shard_rows": 5_000},
        "output": {"uri": str(output)},
    }
    for group, values in groups.items():
        params[group] = {**params[group], **values}
    return params


def artifacts(client: Any, run_id: Any, key: str) -> list[Any]:
    """Every version of a keyed artifact the run published, newest first."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    return client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[key])
        ),
        sort=ArtifactSort.CREATED_DESC,
    )


def table_rows(artifact: Any) -> list[dict[str, Any]]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def report_counts(markdown: str) -> dict[str, int]:
    """The counts row of the report: rows, rows out, error rows, shards, run, skipped, failed."""
    header = "| rows | rows out | error rows | shards | run | skipped | failed |"
    lines = markdown.splitlines()
    values = lines[lines.index(header) + 2].strip("| ").split(" | ")
    names = ["rows", "rows_out", "rows_error", "shards", "run", "skipped", "failed"]
    return dict(zip(names, (int(v) for v in values), strict=True))


def markers(output: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((output / "markers").glob("*.json"))}


def retry_like_the_ui(client: Any, run_id: Any) -> None:
    """What the UI's Retry button sends (prefect/server/ui, `retryFlowRun`): POST /flow_runs/{id}/set_state
    with a Scheduled state named AwaitingRetry, message "Retry from the UI", force false."""
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import State

    result = client.set_flow_run_state(
        run_id, State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"), force=False
    )
    assert result.status == SetStateStatus.ACCEPT, result.details


# -- the parameter form ------------------------------------------------------------


@server
def test_stored_schema_keeps_groups_descriptions_bounds_and_enums(stack, deployed):
    from prefect.utilities.callables import parameter_schema

    from flows.batch_inference import batch_inference

    with stack.client() as client:
        stored = deployment(client, "score-on-demand")
    assert stored.enforce_parameter_schema
    schema = stored.parameter_openapi_schema
    # What the server keeps is exactly what the flow declares: nothing was lost on the way.
    assert schema == parameter_schema(batch_inference).model_dump_for_openapi()

    top = schema["properties"]
    assert sorted(top, key=lambda name: top[name]["position"]) == ["input", "model", "output", "compute"]
    assert all(top[name]["description"] for name in top)
    assert sorted(schema["required"]) == ["input", "model", "output"]
    assert top["compute"]["default"] == ComputeConfig().model_dump(mode="json")  # the form shows each default

    definitions = schema["definitions"]
    for group, model in GROUPS.items():
        stored_group = definitions[top[group].get("$ref", "").rsplit("/", 1)[-1]]
        assert stored_group["additionalProperties"] is False, group  # a misspelt key is refused
        assert stored_group["description"]
        assert set(stored_group["properties"]) == set(model.model_fields), group
        for name, field in model.model_fields.items():
            prop = stored_group["properties"][name]
            assert prop["description"] == field.description and prop["title"] == field.title, (group, name)

    compute = definitions["ComputeConfig"]["properties"]
    assert compute["batch_size"]["minimum"] == 0 and compute["batch_size"]["default"] == 0  # auto
    assert compute["shard_rows"]["minimum"] == 1
    assert compute["cpu_threads"]["anyOf"][0]["minimum"] == 1
    output = definitions["OutputConfig"]["properties"]
    for ratio in ("min_success_ratio", "max_error_ratio"):
        assert (output[ratio]["minimum"], output[ratio]["maximum"]) == (0.0, 1.0)
    precision = definitions["ModelConfig"]["properties"]["precision"]
    assert precision["enum"] == list(PRECISIONS) and precision["default"] == "fp32"
    assert definitions["InputConfig"]["properties"]["uri"]["minLength"] == 1


BAD_PARAMETERS = [
    ({"compute": {"batch_size": -1}}, "compute.batch_size", "less than the minimum of 0"),
    ({"model": {"model": "mlp", "precision": "fp64"}}, "model.precision", "'fp64' is not one of"),
    ({"output": {"uri": "/tmp/out", "min_success_ratio": 1.5}}, "output.min_success_ratio", "maximum"),
    ({"compute": {"batchsize": 64}}, "compute", "batchsize"),
    ({"input": {"uri": ""}}, "input.uri", "should be non-empty"),
    ({"input": {"key_column": "id"}}, "input", "'uri' is a required property"),
]


@server
def test_server_refuses_bad_parameters_when_the_run_is_created(stack, deployed, tabular, tmp_path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    good = {"input": {"uri": tabular["input"]}, "output": {"uri": str(tmp_path / "out")}}
    with stack.client() as client:
        on_demand = deployment(client, "score-on-demand")
        runs_of = DeploymentFilter(id=DeploymentFilterId(any_=[on_demand.id]))
        before = len(client.read_flow_runs(deployment_filter=runs_of))
        for bad, field, reason in BAD_PARAMETERS:
            with pytest.raises(PrefectHTTPStatusError) as caught:
                client.create_flow_run_from_deployment(on_demand.id, parameters={**good, **bad})
            assert caught.value.response.status_code == 409, bad
            detail = caught.value.response.json()["detail"]
            assert f"field '{field}'" in detail and reason in detail, (bad, detail)
        assert len(client.read_flow_runs(deployment_filter=runs_of)) == before  # nothing was created

        # The same request with good values is accepted (scheduled for tomorrow, so no worker takes it).
        tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        accepted = client.create_flow_run_from_deployment(
            on_demand.id, parameters={**good, "compute": {"batch_size": 64}}, state=Scheduled(scheduled_time=tomorrow)
        )
        assert accepted.parameters["compute"] == {"batch_size": 64}
        client.delete_flow_run(accepted.id)


# -- schedules and GPU templates -----------------------------------------------------


@server
def test_the_cluster_deployment_runs_on_the_scheduler_given_at_deploy_time(stack, deployed):
    with stack.client() as client:
        cluster = deployment(client, "score-on-cluster")
    compute = cluster.parameters["compute"]
    assert (compute["engine"], compute["engine_address"]) == ("dask", deployed["nightly"]["BATCHINFER_DASK_SCHEDULER"])


@server
def test_a_late_scheduled_run_scores_the_day_before_its_scheduled_time(stack, deployed, tmp_path):
    """`{yesterday}` is the day before the run's scheduled time, not before the day it happens to start."""
    import numpy as np
    from prefect.states import Scheduled

    from tests.core_helpers import GOOD_MODEL, write_features

    scheduled = dt.datetime.now(dt.UTC).replace(hour=2, minute=0, second=0, microsecond=0) - dt.timedelta(days=5)
    days = [(scheduled - dt.timedelta(days=n)).date() for n in (2, 1, 0)] + [dt.datetime.now(dt.UTC).date()]
    data = tmp_path / "data"
    for n, day in enumerate(days):
        write_features(data / f"date={day}" / "p.parquet", np.arange(n * 100, n * 100 + 100), 50)
    params = {
        "input": {"uri": str(data), "partitions": "date={yesterday}", "passthrough": ["date"]},
        "model": {"model": GOOD_MODEL},
        "compute": {"devices": "cpu"},
        "output": {"uri": str(tmp_path / "scores" / "date={yesterday}")},
    }
    with stack.client() as client:
        on_demand = deployment(client, "score-on-demand")
        run = client.create_flow_run_from_deployment(
            on_demand.id, parameters=params, state=Scheduled(scheduled_time=scheduled)
        )
        run = stack.wait_for_run(client, run.id, logs=("worker",))
    assert run.state_name == "Completed", (run.state.message, stack.tail("worker"))
    day = days[1]
    assert [p.name for p in (tmp_path / "scores").iterdir()] == [f"date={day}"]
    got = pl.read_parquet(tmp_path / "scores" / f"date={day}" / "predictions" / "**" / "*.parquet")
    assert got["date"].unique().to_list() == [str(day)] and got.height == 100


@server
def test_nightly_schedule_is_registered_and_runs_are_scheduled(stack, deployed):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with stack.client() as client:
        nightly = deployment(client, "nightly-incremental")
        [schedule] = nightly.schedules
        assert schedule.active
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
        # The placeholders took the values in the environment of `prefect deploy`.
        env = deployed["nightly"]
        assert nightly.parameters["input"] == {"uri": env["BATCHINFER_NIGHTLY_INPUT"]}
        assert nightly.parameters["output"] == {"uri": env["BATCHINFER_NIGHTLY_OUTPUT"]}
        assert nightly.parameters["model"]["checkpoint"] == env["BATCHINFER_NIGHTLY_CHECKPOINT"]
        assert nightly.global_concurrency_limit is not None and nightly.global_concurrency_limit.limit == 1

        # The server's scheduler fills in the coming nights by itself (it looks every few seconds).
        scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
        runs_of = DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id]))
        deadline = time.monotonic() + 60
        runs = []
        while time.monotonic() < deadline and not runs:
            runs = client.read_flow_runs(flow_run_filter=scheduled, deployment_filter=runs_of)
            time.sleep(0.5)
    assert runs, "no scheduled runs of the nightly deployment appeared within 60 s"
    now = dt.datetime.now(dt.UTC)
    starts = sorted(run.expected_start_time.astimezone(dt.UTC) for run in runs)
    assert all(start > now and (start.hour, start.minute) == (2, 0) for start in starts), starts
    assert len(set(starts)) == len(starts)
    assert all(run.parameters == nightly.parameters for run in runs)


def render_job(base_job_template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """What a worker makes of a pool's template and a deployment's job variables (Prefect's own templating)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    values = BaseJobConfiguration._get_base_config_defaults(base_job_template["variables"]["properties"])
    values.update(job_variables)
    return apply_values(base_job_template["job_configuration"], values)


@server
def test_gpu_deployments_request_gpus_and_pin_devices(stack, deployed, tabular, tmp_path):
    from prefect.exceptions import PrefectHTTPStatusError

    with stack.client() as client:
        pool = client.read_work_pool("batchinfer-gpu-k8s")
        k8s = deployment(client, "score-on-gpu-k8s")
        docker = deployment(client, "score-on-gpu-docker")
        assert pool.type == "kubernetes" and k8s.work_pool_name == "batchinfer-gpu-k8s"
        # The server checks a run's job variables against the pool's template too.
        with pytest.raises(PrefectHTTPStatusError) as caught:
            client.create_flow_run_from_deployment(
                k8s.id, parameters=run_params(tabular, tmp_path), job_variables={"gpu_count": 0}
            )
        assert caught.value.response.status_code == 422 and "gpu_count" in caught.value.response.text

    job = render_job(pool.base_job_template, k8s.job_variables)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["image"] == k8s.job_variables["image"] and "{{" not in json.dumps(job)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "batchinfer"
    # Containers run the code the image holds, not the deploying machine's checkout.
    for container_deployment in (k8s, docker):
        step = container_deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == "/opt/batchinfer"
    assert docker.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


# -- runs ------------------------------------------------------------------------------


@server
def test_custom_run_through_the_api_scores_and_publishes_progress(stack, deployed, tabular, tmp_path):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    output = tmp_path / "out"
    params = run_params(tabular, output, input={"passthrough": ["f00"]}, compute={"batch_size": 256})
    with stack.client() as client:
        on_demand = deployment(client, "score-on-demand")
        run = client.create_flow_run_from_deployment(on_demand.id, parameters=params)
        run = stack.wait_for_run(client, run.id, logs=("worker",))
        assert run.state_name == "Completed", (run.state.message, stack.tail("worker"))
        assert run.parameters["compute"] == {"devices": "cpu", "shard_rows": 5_000, "batch_size": 256}

        progress = artifacts(client, run.id, "batchinfer-progress")
        [table] = artifacts(client, run.id, "batchinfer-shards")
        [report] = artifacts(client, run.id, "batchinfer-report")
        deadline, core_lines = time.monotonic() + 20, []
        while time.monotonic() < deadline and not core_lines:  # logs are shipped in batches
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            core_lines = [log.message for log in logs if log.name == "batchinfer.runner"]
            time.sleep(0.5)

    # The outputs follow the custom parameters.
    predictions = pl.read_parquet(f"{output}/predictions/*.parquet")
    assert predictions.height == predictions["id"].n_unique() == 20_000
    assert predictions.columns == ["id", "prediction", "probabilities", "f00"]
    assert (output / "_SUCCESS").exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["config"]["compute"]["batch_size"] == 256 and manifest["config"]["input"]["passthrough"] == ["f00"]

    # The run's page: progress at 100 %, one table row per shard, the report with where the output lives.
    assert [artifact.type for artifact in progress] == ["progress"] and float(progress[0].data) == 100.0
    rows = table_rows(table)
    assert len(rows) == len(manifest["shards"]) == 4
    assert {row["state"] for row in rows} == {"done"} and sum(row["rows"] for row in rows) == 20_000
    assert all(row["device"] == "cpu" and row["rows/s"] > 0 for row in rows)
    assert report.type == "markdown" and "succeeded" in report.data and str(output) in report.data
    assert report_counts(report.data) == {
        "rows": 20_000,
        "rows_out": 20_000,
        "rows_error": 0,
        "shards": 4,
        "run": 4,
        "skipped": 0,
        "failed": 0,
    }
    # The core's own log lines reach the run's log in the UI.
    assert any(re.search(r"shard \w+ done on cpu: \d+ rows", line) for line in core_lines), core_lines


@server
def test_ui_retry_of_a_failed_run_reruns_only_the_failed_shard(stack, deployed, tabular, tmp_path):
    output, flag = tmp_path / "out", tmp_path / "fail-partition-2"
    flag.write_text("10000 10001")  # the first row of partition 2 (ids 10000..14999)
    params = run_params(tabular, output, model={"model": "tests.flaky_model:factory", "checkpoint": None})
    with stack.client() as client:
        on_demand = deployment(client, "score-on-demand")
        # Per-run job variables reach the flow process's environment (the same path as CUDA_VISIBLE_DEVICES).
        run = client.create_flow_run_from_deployment(
            on_demand.id, parameters=params, job_variables={"env": {"BATCHINFER_TEST_FLAG": str(flag)}}
        )
        run = stack.wait_for_run(client, run.id, logs=("worker",))
        assert run.state_name == "Failed", (run.state_name, run.state.message)
        assert "flagged rows 10000..10001" in (run.state.message or ""), run.state.message
        first = markers(output)
        assert len(first) == 3 and not (output / "_SUCCESS").exists()
        [failed_report] = artifacts(client, run.id, "batchinfer-report")
        assert report_counts(failed_report.data)["failed"] == 1

        flag.unlink()
        retry_like_the_ui(client, run.id)
        run = stack.wait_for_run(client, run.id, logs=("worker",))
        assert run.state_name == "Completed", (run.state.message, stack.tail("worker"))
        assert run.run_count == 2

        report = artifacts(client, run.id, "batchinfer-report")[0]
        table = artifacts(client, run.id, "batchinfer-shards")[0]
        tasks = stack.wait_for_task_runs(client, run.id, count=5, prefix="shard-")  # 4, then the failed one again

    after = markers(output)
    [rerun] = set(after) - set(first)
    assert {k: after[k] for k in first} == first  # the three finished shards were not touched
    assert after[rerun]["shard"]["partition_uri"].endswith("part-00002.parquet")
    assert after[rerun]["started_at"] > max(m["finished_at"] for m in first.values())
    assert report_counts(report.data) == {
        "rows": 20_000,
        "rows_out": 20_000,
        "rows_error": 0,
        "shards": 4,
        "run": 1,
        "skipped": 3,
        "failed": 0,
    }
    states = {row["shard"]: row["state"] for row in table_rows(table)}
    assert states == {**{shard: "skipped (already done)" for shard in first}, rerun: "done"}
    # Task runs: the failed shard ran twice (failed, then completed); every other shard once.
    shard_runs = sorted(t.name for t in tasks if t.name.startswith("shard-"))
    assert shard_runs == sorted([f"shard-{s}" for s in first] + [f"shard-{rerun}"] * 2)
    assert pl.read_parquet(f"{output}/predictions/*.parquet").height == 20_000
    assert (output / "_SUCCESS").exists()


@server
def test_served_runs_may_point_only_under_the_allowed_prefixes(stack, tabular, tmp_path):
    """Anyone who can start a run in the UI chooses its paths and model; `batchinfer serve --allow-*` bounds
    them, and every run of the deployment is checked against the bounds in its own process."""
    from tests.prefect_stack import BATCHINFER

    allowed = tmp_path / "allowed"
    argv = [
        BATCHINFER, "serve", "--name", "restricted",
        "--allow-input", tabular["input"], "--allow-output", str(allowed),
        "--allow-model", "mlp", "--allow-model", str(Path(tabular["checkpoint"]).parent),
    ]  # fmt: skip
    stack.start("serve-restricted", argv)
    try:
        with stack.client() as client:
            restricted = stack.wait_for_deployment(client, f"{FLOW}/restricted", "serve-restricted")
            outside = client.create_flow_run_from_deployment(
                restricted.id, parameters=run_params(tabular, tmp_path / "outside")
            )
            inside = client.create_flow_run_from_deployment(
                restricted.id, parameters=run_params(tabular, allowed / "out")
            )
            outside = stack.wait_for_run(client, outside.id, logs=("serve-restricted",))
            inside = stack.wait_for_run(client, inside.id, logs=("serve-restricted",))
    finally:
        stack.stop("serve-restricted", sig=signal.SIGINT, grace=10)
    assert outside.state_name == "Failed"
    assert f"--output {tmp_path / 'outside'} is not allowed here (BATCHINFER_ALLOWED_OUTPUT allows {allowed})" in (
        outside.state.message or ""
    ), outside.state.message
    assert not (tmp_path / "outside").exists()
    assert inside.state_name == "Completed", inside.state.message
    assert (allowed / "out" / "_SUCCESS").exists()


# -- `batchinfer serve` up-front checks (no server needed) --------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ('{"compute": {"batch_size": -1}}', "--params: compute.batch_size: Input should be greater than or equal to 0"),
        ('{"model": {"model": "mlp", "precision": "fp64"}}', "--params: model.precision: Input should be"),
        ('{"inptu": {"uri": "x"}}', "--params: unknown group 'inptu'"),
        ("{not json", "--params is not valid JSON"),
    ],
)
def test_serve_refuses_bad_defaults_before_serving(params, message, capsys):
    assert main(["serve", "--params", params]) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_schedule_without_input_model_and_output(capsys):
    assert main(["serve", "--cron", "0 2 * * *", "--input", "s3://b/in/"]) == 2
    assert "--cron needs default model, output" in capsys.readouterr().err


def test_serve_defaults_merge_shortcuts_into_groups():
    args = build_parser().parse_args(
        [
            "serve",
            "--params",
            '{"compute": {"batch_size": "64"}}',
            "--input",
            "s3://b/in/",
            "--model",
            "mlp",
            "--checkpoint",
            "s3://b/m.safetensors",
            "--output",
            "s3://b/out/",
        ]
    )
    assert serve_parameters(args) == {
        "compute": {"batch_size": 64},
        "input": {"uri": "s3://b/in/"},
        "output": {"uri": "s3://b/out/"},
        "model": {"model": "mlp", "checkpoint": "s3://b/m.safetensors"},
    }


def test_container_files_agree_with_prefect_yaml():
    """The Docker worker serves the pool its deployment names, with GPUs, and the image holds the code
    where the container deployments' pull step looks for it."""
    import yaml

    deployments = ROOT / "deployments"
    spec = yaml.safe_load((deployments / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    compose = yaml.safe_load((deployments / "docker" / "compose.yaml").read_text())
    [service] = compose["services"].values()
    command = service["command"]
    assert command[command.index("--pool") + 1] == by_name["score-on-gpu-docker"]["work_pool"]["name"]
    [gpus] = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["capabilities"] == ["gpu"]
    workdir = re.search(r"^WORKDIR (\S+)$", (deployments / "docker" / "Dockerfile").read_text(), re.M).group(1)
    for name in ("score-on-gpu-k8s", "score-on-gpu-docker"):
        [step] = by_name[name]["pull"]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
    entrypoint = {d["entrypoint"] for d in spec["deployments"]}
    assert entrypoint == {"flows/batch_inference.py:batch_inference"}
    assert (ROOT / "flows" / "batch_inference.py").exists()
