"""The batch-inference flow: plan -> infer_shard mapped over the pending shards -> merge-and-validate.

Orchestration only: the work is in `batchinfer` behind the tasks in `tasks/`,
the scheduling in Prefect's task runner (flows/engines.py). Each shard task owns
its device on the host while it runs; the flow keeps no account of devices.
"""

# No `from __future__ import annotations`: `serve` hands the flow function to each run's process by
# value (cloudpickle), where string annotations such as "InputConfig" cannot be resolved and every
# run would fail parameter validation.

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.utilities.annotations import quote, unmapped

from batchinfer.config import ComputeConfig, InputConfig, ModelConfig, OutputConfig, RunConfig
from batchinfer.merge import RunReport
from batchinfer.outputlock import hold_output
from batchinfer.pipeline import Plan, check_targets, rescore
from batchinfer.planning import Shard
from batchinfer.runner import stop_shards
from flows.engines import one_gpu_per_shard, task_runner
from tasks.logs import core_logs_in_flow
from tasks.shards import infer_shard, merge_run, plan_run


def score_shards(plan: Plan, pending: list[Shard] | None = None) -> dict[str, dict[str, Any]]:
    """Map `infer_shard` over the pending shards on the run's task runner; a failed shard does not stop the rest."""
    logger = get_run_logger()
    pending = plan.pending if pending is None else pending
    results: dict[str, dict[str, Any]] = {}
    progress = create_progress_artifact(_percent(plan, results), key="batchinfer-progress", description="Shards")
    parameters = {
        "config": unmapped(plan.config),
        "settings": unmapped(plan.settings),
        "shard": pending,
        "run": unmapped(f"flow run {flow_run.name}"),
    }
    with task_runner(plan.config, len(plan.devices)) as runner, stopped_on_interrupt():
        with one_gpu_per_shard(plan.config, runner):
            futures = runner.map(infer_shard, parameters)
        shards = {future.task_run_id: shard for future, shard in zip(futures, pending, strict=True)}
        shown = _percent(plan, results)
        for future in as_completed(futures):
            shard = shards[future.task_run_id]
            future.wait()  # takes the final state from the future itself; the API's copy can lag behind
            state = future.state
            if state.is_completed():
                results[shard.shard_id] = future.result()
            else:
                reason = failure_reason(state)
                results[shard.shard_id] = {"shard_id": shard.shard_id, "state": "failed", "error": reason}
                logger.error("shard %s failed: %s", shard.shard_id, reason)
            percent = _percent(plan, results)
            if percent - shown >= 1 or len(results) == len(plan.pending):  # at most ~100 updates a run
                update_progress_artifact(progress, percent)
                shown = percent
    return results


@contextlib.contextmanager
def stopped_on_interrupt() -> Iterator[None]:
    """On an interrupt or a cancel (Prefect raises it here), stop the shards at once instead of waiting for them."""
    try:
        yield
    except BaseException:
        stop_shards()
        raise


def failure_reason(state: Any) -> str:
    """The failed task's own one-line message (the exception it raised), else Prefect's state message."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException) and str(exc).strip():
        return str(exc)
    return str(state.message or state.name)


def _percent(plan: Plan, results: dict[str, dict[str, Any]]) -> float:
    finished = len(plan.done) + len(results)
    return round(100.0 * finished / max(len(plan.shards), 1), 2)


def publish(plan: Plan, results: dict[str, dict[str, Any]], report: RunReport) -> None:
    """A table of shards and a markdown report, for the run's page in the UI."""
    rows = []
    for shard in plan.shards:
        result = results.get(shard.shard_id) or plan.done.get(shard.shard_id) or {}
        state = "skipped (already done)" if shard.shard_id in plan.done else result.get("state", "pending")
        seconds = float(result.get("seconds") or 0.0)
        rows.append(
            {
                "shard": shard.shard_id,
                "partition": shard.partition_uri,
                "rows": shard.num_rows,
                "seconds": round(seconds, 3),
                "rows/s": round(shard.num_rows / seconds) if seconds else 0,
                "device": result.get("device", ""),
                "worker": f"pid {result['pid']} on {result.get('host')}" if result.get("pid") else "",
                "model_loaded": bool(result.get("model_loaded")),
                "waited": (
                    f"{result.get('waited_seconds', 0):.2f} s for {result.get('device')} ({result['waited_for']})"
                    if result.get("waited_for")
                    else ""
                ),
                "batch": result.get("batch_size") or "",
                "state": state,
                "error rows": result.get("rows_error", 0),
                "error": (result.get("error") or "")[:200],
                "note": (result.get("note") or "")[:300],
            }
        )
    create_table_artifact(table=rows, key="batchinfer-shards", description="One row per shard")
    checks = "\n".join(f"| {c.name} | {'ok' if c.ok else 'FAILED'} | {c.detail} |" for c in report.checks)
    failures = "\n".join(f"- {line}" for line in report.failures[:50]) or "none"
    create_markdown_artifact(
        key="batchinfer-report",
        description="Validation report",
        markdown=(
            f"# batchinfer run: {'succeeded' if report.ok else 'FAILED'}\n\n"
            f"Output: `{report.output_uri}`\n\n"
            f"| rows | rows out | error rows | shards | run | skipped | failed |\n|---|---|---|---|---|---|---|\n"
            f"| {report.rows} | {report.rows_out} | {report.rows_error} | {report.shards} | {report.shards_run} "
            f"| {report.shards_skipped} | {report.shards_failed} |\n\n"
            f"## Checks\n\n| check | result | detail |\n|---|---|---|\n{checks}\n\n## Failures\n\n{failures}\n"
        ),
    )


@flow(name="batch-inference", validate_parameters=True, log_prints=True)
def batch_inference(
    input: InputConfig,
    model: ModelConfig,
    output: OutputConfig,
    compute: ComputeConfig = ComputeConfig(),  # an object default: the UI form shows each field's default
) -> dict[str, Any]:
    """Score every row of a Parquet dataset with a PyTorch model, one shard per device at a time.

    Args:
        input: Where the rows are and which columns to use.
        model: The model and its checkpoint and precision.
        output: Where the results go and what counts as success.
        compute: Devices, batch size, shard size and the engine that runs the shards.
    """
    started = time.perf_counter()
    # Dates in the URIs and the filter are those of the run's scheduled time, so a late or retried nightly run
    # still scores the day it was scheduled for.
    config = RunConfig.from_parameters(input, model, compute, output).dated(flow_run.scheduled_start_time)
    check_targets(config)  # a refused run writes nothing, not even the output's lock
    # One run at a time per output, from before the plan until after `_SUCCESS`.
    with (
        core_logs_in_flow(),
        hold_output(config.output.uri, config.storage_options, run=f"flow run {flow_run.name!r}") as lock,
    ):
        plan = plan_run(config, lock.run_id)
        get_run_logger().info(
            "%d partitions, %d shards (%d already done), %d rows, %d device(s): %s; engine %s",
            len(plan.partitions),
            len(plan.shards),
            len(plan.done),
            plan.total_rows,
            len(plan.devices),
            ", ".join(d.name for d in plan.devices),
            plan.config.compute.engine,
        )
        results = score_shards(plan) if plan.pending else {}
        # Quoted: Prefect would otherwise visit every partition, shard and marker of the plan looking for
        # futures, seconds per run over a thousand partitions (BENCHMARKS.md, "Incremental runs").
        report = merge_run(quote(plan), quote(results))
        if report.damaged:  # committed shards whose files failed their check lost their markers: score them again
            results.update(score_shards(plan, rescore(plan, report.damaged)))
            report = merge_run(quote(plan), quote(results))
        publish(plan, results, report)
        if not report.ok:
            return Failed(message=report.first_failure or "validation failed")  # type: ignore[return-value]
        return {
            **report.to_dict(),
            "flow_run_id": str(flow_run.id),
            "flow_seconds": round(time.perf_counter() - started, 3),
        }
