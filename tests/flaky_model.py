"""A custom model (`tests.flaky_model:factory`) that fails some rows while a flag file exists.

Used by the deployment tests to make a run fail on its first attempt and pass
when retried. The flag file is named by the environment variable
BATCHINFER_TEST_FLAG (a run's job variables carry it to the flow process) and
holds "LO HI": a batch holding an `id` in [LO, HI) raises. Remove the file and
the same shard scores normally. The `id` column is the first feature, so the
model knows which rows it scores; the output is a fixed softmax of the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FEATURES = ["id", "f00", "f01", "f02", "f03"]
CLASSES = 3


class FlakyFailure(RuntimeError):
    """Raised for flagged rows; deterministic, so Prefect's task retries do not cure it."""


class FlakyModel:
    input_kind = "features"
    output_kind = "classifier"
    feature_names = FEATURES
    version = "1"

    def load(self, device: torch.device) -> FlakyModel:
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(len(FEATURES) - 1, CLASSES, generator=generator).to(device)
        return self

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        flag = os.environ.get("BATCHINFER_TEST_FLAG")
        if flag and Path(flag).exists():
            lo, hi = (int(part) for part in Path(flag).read_text().split())
            ids = batch[:, 0]
            if bool(((ids >= lo) & (ids < hi)).any()):
                raise FlakyFailure(f"flagged rows {lo}..{hi} in this batch ({flag} exists)")
        return torch.softmax(batch[:, 1:] @ self.weight, dim=1)


def factory() -> FlakyModel:
    return FlakyModel()
