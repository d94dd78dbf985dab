"""Small feature datasets and a run through the core alone (no Prefect), for tests that need to step in between."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchinfer.config import make_config
from batchinfer.merge import RunReport, merge_and_validate
from batchinfer.pipeline import Plan, prepare, run_shard, start_run

GOOD_MODEL = "tests.models_for_validation:good"


def feature_table(ids: np.ndarray, shift: float = 0.0) -> pa.Table:
    """`id`, `x0` (= id, so a row's key can be read from its features) and `x1` (a smooth function of id)."""
    ids = np.asarray(ids, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "x0": ids.astype(np.float32),
            "x1": (np.sin(ids / 7.0) + shift).astype(np.float32),
        }
    )


def write_features(path: Path, ids: np.ndarray, row_group_size: int, shift: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(feature_table(ids, shift), path, row_group_size=row_group_size)
    return path


def prepare_started(**kwargs: Any) -> Plan:
    """A plan on the CPU with its run recorded as started (what the flow does before mapping shards)."""
    plan = prepare(make_config(**{"devices": "cpu", **kwargs}))
    start_run(plan)
    return plan


def score_pending(plan: Plan) -> dict[str, dict[str, Any]]:
    """Score every pending shard in order; a failing shard raises."""
    return {s.shard_id: run_shard(plan.config, plan.settings, s).to_dict() for s in plan.pending}


def run_core(**kwargs: Any) -> tuple[Plan, RunReport]:
    """The flow's steps without orchestration: prepare, score each shard, merge and validate."""
    plan = prepare_started(**kwargs)
    return plan, merge_and_validate(plan, score_pending(plan))
