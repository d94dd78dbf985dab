"""Thin Prefect task wrappers over the batchinfer core."""

from tasks.shards import infer_shard, merge_run, plan_run

__all__ = ["infer_shard", "merge_run", "plan_run"]
