"""The batch-inference flow: plan -> infer_shard per shard (tag `gpu`) -> merge-and-validate.

Orchestration only; the work is in `batchinfer` behind the tasks in `tasks/`.
At most N shards run at once (N = devices): a bounded task runner inside the
run, and a Prefect global concurrency limit named after the tag (`gpu`) with N
slots across runs on one server (see flows/slots.py for why not a tag limit).
"""

# No `from __future__ import annotations`: `serve` hands the flow function to each run's process by
# value (cloudpickle), where string annotations such as "InputParams" cannot be resolved and every
# run would fail parameter validation.

import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from batchinfer.merge import RunReport
from batchinfer.pipeline import Plan, preload_models, start_run
from batchinfer.planning import Shard
from flows.params import ComputeParams, InputParams, ModelParams, OutputParams, to_config
from flows.slots import DeviceSlots
from tasks.shards import GPU_TAG, Gate, infer_shard, merge_run, plan_run

SLOT_POLL_SECONDS = 0.5
# Shard tasks started ahead per device and held at their gates: a task's start-up gets two shards' time,
# room for Prefect's 2 s retry of "database is locked" even behind a shard of under 2 s.
WAITING_PER_DEVICE = 2

log = logging.getLogger(__name__)


def end_runs_without_waiting_for_the_heartbeat() -> bool:
    """Let a finished flow run return at once instead of up to a second later.

    Prefect's sync flow engine sends heartbeats from a daemon thread that sleeps in one-second steps,
    and joins that thread when the run ends: every run, already in its final state, waited for the
    thread's current sleep to end (0.8 s on average here, measured around the flow call). Prefect's
    async engine leaves the thread to stop itself on its next wake (`join_on_exit=False`); this makes
    the sync engine do the same. Heartbeats while the run is going are unchanged. Returns whether the
    engine was changed (False on a Prefect without this function).
    """
    import prefect.flow_engine as engine

    original = getattr(engine, "_send_heartbeats", None)
    if original is None or getattr(original, "batchinfer_no_join", False):
        return original is not None
    if "join_on_exit" not in inspect.signature(original).parameters:
        return False

    @functools.wraps(original)
    def send_heartbeats(run_engine: Any, join_on_exit: bool = True) -> Any:
        return original(run_engine, join_on_exit=False)

    send_heartbeats.batchinfer_no_join = True  # type: ignore[attr-defined]
    engine._send_heartbeats = send_heartbeats
    return True


end_runs_without_waiting_for_the_heartbeat()


@contextlib.contextmanager
def core_logs_in_run_log() -> Iterator[None]:
    """Let the core's INFO lines reach the run's log in the UI while the flow runs.

    PREFECT_LOGGING_EXTRA_LOGGERS=batchinfer gives the `batchinfer` logger Prefect's API handler
    but leaves its level unset, so INFO records would stop at the root logger's WARNING. Take the
    level Prefect gives its own extra loggers (PREFECT_LOGGING_LEVEL), and put the old one back
    afterwards: outside a run the API handler has nowhere to send them.
    """
    core = logging.getLogger("batchinfer")
    previous = core.level
    if previous == logging.NOTSET and core.handlers:
        core.setLevel(logging.getLogger("prefect.extra").level or logging.INFO)
    try:
        yield
    finally:
        core.setLevel(previous)


class Progress:
    """The run's progress artifact, updated from a thread of its own so the flow never waits for the API.

    Updates go in order; close() waits for the last one. A failed update is logged, not raised: the
    progress bar is a view, the markers and the manifest are the record.
    """

    def __init__(self, percent: float) -> None:
        self._id = create_progress_artifact(progress=percent, key="batchinfer-progress", description="Shards finished")
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchinfer-progress")

    def update(self, percent: float) -> None:
        self._thread.submit(contextvars.copy_context().run, self._send, percent)  # the run's client settings

    def _send(self, percent: float) -> None:
        try:
            update_progress_artifact(artifact_id=self._id, progress=percent)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not update the progress artifact: %s", exc)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def run_shards(plan: Plan, progress: Progress) -> dict[str, dict[str, Any]]:
    """Score pending shards, one per device slot at a time; a failed shard does not stop the rest.

    The flow thread holds one slot of the shared device limit per running shard (flows/slots.py):
    at most N shards of this run at once (N = devices), and at most N across every run on the
    server that uses the same limit name. Each device also has the next shards' tasks started and
    waiting at their gates (tasks.shards.Gate), so Prefect's start-up of a task overlaps the work.
    A shard's slot goes straight to that task as soon as the shard is committed (`Gate.freed`),
    while Prefect still ends the finished task run; after a failure, once its task run has ended.
    """
    logger = get_run_logger()
    pending = list(plan.pending)
    results: dict[str, dict[str, Any]] = {}
    if not pending:
        return results
    config = plan.config
    task = infer_shard if config.concurrency_tag == GPU_TAG else infer_shard.with_options(tags=[config.concurrency_tag])
    devices = len(plan.devices)
    waiting: list[tuple[Any, Shard, Gate]] = []  # started, held at their gates until a slot is free
    running: dict[Any, tuple[Shard, UUID, Gate]] = {}  # holding a slot
    finishing: dict[Any, Shard] = {}  # scored and committed, slot passed on; Prefect ends the task run
    finished_since_update = False

    def start_waiting(runner: ThreadPoolTaskRunner) -> None:
        while pending and len(waiting) < WAITING_PER_DEVICE * devices:
            shard, gate = pending.pop(0), Gate()
            future = runner.submit(task, {"config": config, "settings": plan.settings, "shard": shard, "gate": gate})
            waiting.append((future, shard, gate))

    def admit(lease: UUID) -> None:  # the first waiting shard gets the slot and may start scoring
        future, shard, gate = waiting.pop(0)
        gate.open()
        running[future] = (shard, lease, gate)

    def collect(future: Any, shard: Shard) -> None:
        future.wait()  # sets the final state from the future itself; the API's copy can lag behind
        state = future.state
        if state.is_completed():
            results[shard.shard_id] = future.result()
        else:
            reason = failure_reason(state)
            results[shard.shard_id] = {"shard_id": shard.shard_id, "state": "failed", "error": reason}
            logger.error("shard %s failed: %s", shard.shard_id, reason)

    # Task runs per device: one scoring, WAITING_PER_DEVICE held at their gates, and room for a few still
    # being ended by Prefect (a slow end must not keep the next tasks from starting).
    with (
        DeviceSlots(config.concurrency_tag, devices) as slots,
        ThreadPoolTaskRunner(max_workers=(WAITING_PER_DEVICE + 4) * devices) as runner,
    ):
        try:
            start_waiting(runner)
            while waiting or running or finishing:
                while waiting and len(running) < devices and (lease := slots.try_take()) is not None:
                    admit(lease)
                start_waiting(runner)
                if finished_since_update:  # after starting shards: they need not wait for this call
                    progress.update(_percent(plan, results))
                    finished_since_update = False
                if not running and not finishing:  # other runs hold every slot
                    time.sleep(SLOT_POLL_SECONDS)
                    continue
                watched = [f.wrapped_future for f in [*running, *finishing]] + [g.freed for _, _, g in running.values()]
                done, _ = concurrent.futures.wait(watched, timeout=SLOT_POLL_SECONDS, return_when="FIRST_COMPLETED")
                if not done:
                    continue
                for future in [f for f in running if f.wrapped_future.done() or running[f][2].freed.done()]:
                    shard, lease, _ = running.pop(future)
                    if waiting:  # hand the slot to the next shard: no round trip to the server between shards
                        admit(lease)
                    else:
                        slots.give_back(lease)
                    finishing[future] = shard
                for future in [f for f in finishing if f.wrapped_future.done()]:
                    collect(future, finishing.pop(future))
                    finished_since_update = True
        finally:
            for _, _, gate in waiting:  # the run is stopping: let the held tasks end without scoring
                gate.cancel()
        if finished_since_update:
            progress.update(_percent(plan, results))
    return results


def failure_reason(state: Any) -> str:
    """Our one-line message from a failed task state, without Prefect's "Task run encountered..." wrapper."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException) and str(exc).strip():
        return str(exc)
    message = str(state.message or state.name)
    _, found, rest = message.partition("encountered an exception ")
    name, colon, text = rest.partition(": ")
    return text if found and colon and name.isidentifier() else message


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
                "state": state,
                "error rows": result.get("rows_error", 0),
                "error": (result.get("error") or "")[:200],
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
    input: InputParams,
    model: ModelParams,
    output: OutputParams,
    compute: ComputeParams = ComputeParams(),  # an object default: the UI form shows each field's default
) -> dict[str, Any]:
    """Score every row of a Parquet dataset with a PyTorch model, one shard per device at a time.

    Args:
        input: Where the rows are and which columns to use.
        model: The model and its checkpoint and precision.
        output: Where the results go and what counts as success.
        compute: Devices, batch size and shard size.
    """
    started = time.perf_counter()
    with core_logs_in_run_log():
        config = to_config(input, model, output, compute)
        logger = get_run_logger()
        plan = plan_run(config)
        logger.info(
            "%d partitions, %d shards (%d already done), %d rows, %d device(s): %s",
            len(plan.partitions),
            len(plan.shards),
            len(plan.done),
            plan.total_rows,
            len(plan.devices),
            ", ".join(d.name for d in plan.devices),
        )

        start_run(plan)
        preload_models(plan)
        progress = Progress(_percent(plan, {})) if plan.pending else None  # none when nothing is left to run
        results = run_shards(plan, progress) if progress is not None else {}
        report = merge_run(plan, results)  # while the last progress update goes out
        if progress is not None:
            progress.close()
        publish(plan, results, report)
        if not report.ok:
            return Failed(message=report.first_failure or "validation failed")  # type: ignore[return-value]
        return {**report.to_dict(), "flow_seconds": round(time.perf_counter() - started, 3)}
