"""Prefect tasks: plan, score one shard (tagged `gpu`), merge-and-validate.

Each task is a few lines over `batchinfer.pipeline` / `batchinfer.merge`, and
takes only plain, serialisable values, so any task runner can run it: threads,
processes, Dask or Ray. Shard results are not cached by Prefect: the shard's
marker on storage is the cache, so a retried or re-triggered run skips finished
shards however it starts.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from batchinfer.config import RunConfig
from batchinfer.errors import BatchInferError
from batchinfer.merge import RunReport, merge_and_validate
from batchinfer.pipeline import Plan, prepare, run_shard, start_run
from batchinfer.planning import Shard
from batchinfer.runner import ShardSettings
from batchinfer.storage import is_transient
from tasks import secrets  # noqa: F401 - Secret-block references resolve in every process that runs these tasks
from tasks.logs import core_logs_in_worker

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
def plan_run(config: RunConfig, run_id: str | None = None) -> Plan:
    """List partitions, check the input, plan shards, find the ones already done, and record the run."""
    plan = prepare(config, run_id=run_id)
    start_run(plan)
    return plan


@task(
    name="infer-shard",
    tags=[GPU_TAG],
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5, 15],
    retry_condition_fn=retry_transient,
    task_run_name="shard-{shard.shard_id}",
)
def infer_shard(config: RunConfig, settings: ShardSettings, shard: Shard, run: str = "") -> dict[str, Any]:
    """Own a device on this host, score one shard on it and commit it (data first, marker last)."""
    with core_logs_in_worker():
        return run_shard(config, settings, shard, run=run).to_dict()


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
