"""Prefect tasks: plan, score one shard (tagged `gpu`), merge-and-validate.

Each task is a few lines over `batchinfer.pipeline` / `batchinfer.merge`.
Shard results are not cached by Prefect: the shard's marker on storage is the
cache, so a retried or re-triggered run skips finished shards however it starts.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled

from batchinfer.config import RunConfig
from batchinfer.errors import BatchInferError
from batchinfer.merge import RunReport, merge_and_validate
from batchinfer.pipeline import Plan, prepare, run_shard
from batchinfer.planning import Shard
from batchinfer.runner import ShardSettings
from batchinfer.storage import is_transient

GPU_TAG = "gpu"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may pass (storage throttling, timeouts, resets); fail fast on the rest."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001
        return False
    if isinstance(exc, BatchInferError):
        return exc.transient
    return isinstance(exc, BaseException) and is_transient(exc)


@task(
    name="plan-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_transient
)
def plan_run(config: RunConfig) -> Plan:
    """List partitions, check the input, plan shards and find the ones already done."""
    return prepare(config)


class Gate:
    """Holds a started shard task until the flow has a device slot for it.

    The flow starts the next shard's task while the current one still runs, so Prefect's own
    start-up of a task (its run record, its state events, the `gpu` tag's concurrency check,
    which waits 2 s whenever a SQLite-backed server answers "database is locked") overlaps the
    work instead of delaying the next shard.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._go = False
        # Done when the shard is scored and committed and its device is back in the pool: the flow can
        # give the slot to the next shard while Prefect still finishes this task run (its final state,
        # the `gpu` tag's slot), which can take a few tenths of a second or a 2 s retry.
        self.freed: concurrent.futures.Future[None] = concurrent.futures.Future()

    def open(self) -> None:
        self._go = True
        self._event.set()

    def cancel(self) -> None:
        self._event.set()

    def wait(self) -> bool:
        """True once opened; False if the run stopped before this shard got a device."""
        self._event.wait()
        return self._go


@task(
    name="infer-shard",
    tags=[GPU_TAG],
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5, 15],
    retry_condition_fn=retry_transient,
    task_run_name="shard-{shard.shard_id}",
)
def infer_shard(config: RunConfig, settings: ShardSettings, shard: Shard, gate: Gate | None = None) -> Any:
    """Score one shard on one device and commit it (data first, marker last).

    With a `gate`, wait until the flow opens it (a device slot is held for this shard), and tell the
    flow through `gate.freed` as soon as the shard is committed.
    """
    if gate is not None and not gate.wait():
        return Cancelled(message=f"shard {shard.shard_id} not started: the run stopped first")
    result = run_shard(config, settings, shard).to_dict()
    if gate is not None and not gate.freed.done():  # after a failure the flow waits for the task's end
        gate.freed.set_result(None)  # (retries included), so only a success frees the slot early
    return result


@task(
    name="merge-and-validate",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_transient,
)
def merge_run(plan: Plan, results: dict[str, dict[str, Any]]) -> RunReport:
    """Merge committed shards into predictions/, validate, write the manifest and _SUCCESS."""
    return merge_and_validate(plan, results)
