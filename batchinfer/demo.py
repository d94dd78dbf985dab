"""The demo's data and model: synthetic tabular rows, sentences of varied length, a small trained MLP."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

from batchinfer.models.mlp import MLP, save_checkpoint

N_FEATURES = 64
N_CLASSES = 10
FEATURE_NAMES = [f"f{i:02d}" for i in range(N_FEATURES)]

_WORDS = (
    "the a model data batch shard device tensor row column file storage output input fast slow green blue "
    "river mountain city night morning coffee train learns predicts scores writes reads merges checks valid "
    "every each many few quickly carefully under over between through about inference pipeline prefect torch "
    "polars parquet bucket cloud engineer team schedule retry marker commit partition embedding sentence"
).split()


def tabular_frame(rows: int, seed: int = 0, start_id: int = 0) -> pl.DataFrame:
    """`rows` rows of 64 float32 features plus an int64 `id` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, N_FEATURES), dtype=np.float32)
    data = {"id": np.arange(start_id, start_id + rows, dtype=np.int64)}
    data.update({name: x[:, i] for i, name in enumerate(FEATURE_NAMES)})
    return pl.DataFrame(data)


def synthetic_labels(x: np.ndarray, seed: int = 1234) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((x.shape[1], N_CLASSES)).astype(np.float32)
    return (np.tanh(x) @ w).argmax(axis=1)


def write_tabular(folder: Path, rows: int, partitions: int, row_group_rows: int = 8_192, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = rows // partitions
    for p in range(partitions):
        n = per if p < partitions - 1 else rows - per * (partitions - 1)
        frame = tabular_frame(n, seed=seed + p, start_id=p * per)
        path = folder / f"part-{p:05d}.parquet"
        frame.write_parquet(path, row_group_size=row_group_rows)
        paths.append(path)
    return paths


def sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of 2 to ~150 words, lengths spread widely (long ones are truncated by the tokenizer)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=2.6, sigma=0.8, size=count).astype(int), 2, 150)
    return [" ".join(rng.choice(_WORDS, size=n)).capitalize() + "." for n in lengths]


def write_text(folder: Path, count: int, partitions: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = sentences(count, seed)
    per = count // partitions
    paths = []
    for p in range(partitions):
        lo, hi = p * per, (count if p == partitions - 1 else (p + 1) * per)
        frame = pl.DataFrame({"id": np.arange(lo, hi, dtype=np.int64), "text": texts[lo:hi]})
        path = folder / f"part-{p:05d}.parquet"
        frame.write_parquet(path, row_group_size=512)
        paths.append(path)
    return paths


def train_mlp(path: Path, rows: int = 20_000, steps: int = 300, seed: int = 0) -> Path:
    """Train the 64-256-256-10 MLP briefly on synthetic labels and save a safetensors checkpoint."""
    torch.manual_seed(seed)
    x = tabular_frame(rows, seed=10_000 + seed).select(FEATURE_NAMES).to_numpy().astype(np.float32)
    y = torch.from_numpy(synthetic_labels(x))
    xt = torch.from_numpy(x)
    model = MLP([N_FEATURES, 256, 256, N_CLASSES])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, rows, (512,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(xt[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, str(path), FEATURE_NAMES)
    return path


def demo_workdir(path: str | None) -> Path:
    return Path(path or os.path.join(os.getcwd(), "batchinfer-demo")).resolve()
