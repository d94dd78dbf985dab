"""Benchmark inputs, generated once and cached under `.bench/` (ignored by git).

The MLP workload is `rows` rows of 64 float32 features in partitions of
1,000,000 rows (row groups of 65,536), written by polars with its defaults
(zstd), the way a user's files usually arrive. The same values are kept as a
`.npy` matrix for the bare loop (tensors already in memory) and, optionally, as
one fixed-size-list column (the layout batchinfer reads without a copy).
The text workload is `count` sentences of varied length from `batchinfer.demo`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

PARTITION_ROWS = 1_000_000
ROW_GROUP_ROWS = 65_536
TEXT_PARTITIONS = 2


def _ready(folder: Path, params: dict) -> bool:
    stamp = folder / "_params.json"
    if not stamp.exists():
        return False
    found = json.loads(stamp.read_text())
    if "array" in params:
        found.setdefault("array", True)  # stamps from before the array layout became optional
    return found == params


def _stamp(folder: Path, params: dict) -> None:
    (folder / "_params.json").write_text(json.dumps(params))


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def checkpoint(root: Path) -> Path:
    """The MLP 64-256-256-10 from `demo.train_mlp`, trained once."""
    path = root / "mlp.safetensors"
    if not path.exists():
        from batchinfer import demo

        demo.train_mlp(path)
    return path


def partition_sizes(rows: int) -> list[int]:
    full, rest = divmod(rows, PARTITION_ROWS)
    return [PARTITION_ROWS] * full + ([rest] if rest else [])


def tabular_paths(root: Path, rows: int) -> dict[str, Path]:
    folder = root / f"mlp-{rows}"
    return {"columns": folder / "columns", "array": folder / "array", "matrix": folder / "features.npy"}


def tabular(root: Path, rows: int, array: bool = True) -> dict[str, Path]:
    """Parquet partitions (64 float columns), the same values as a .npy matrix, and the array layout (if `array`)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchinfer import demo

    folder = root / f"mlp-{rows}"
    params = {"rows": rows, "partition_rows": PARTITION_ROWS, "row_group_rows": ROW_GROUP_ROWS, "version": 2}
    paths = tabular_paths(root, rows)
    # Data with the array layout serve a run without it too; earlier stamps carry no "array" and always had it.
    if _ready(folder, {**params, "array": True}) or (not array and _ready(folder, {**params, "array": False})):
        return paths
    _fresh(folder)
    paths["columns"].mkdir()
    if array:
        paths["array"].mkdir()
    matrix = np.lib.format.open_memmap(paths["matrix"], mode="w+", dtype=np.float32, shape=(rows, demo.N_FEATURES))
    at = 0
    for index, size in enumerate(partition_sizes(rows)):
        frame = demo.tabular_frame(size, seed=index, start_id=at)
        name = f"part-{index:05d}.parquet"
        frame.write_parquet(paths["columns"] / name, row_group_size=ROW_GROUP_ROWS)
        values = frame.select(demo.FEATURE_NAMES).to_numpy().astype(np.float32, copy=False)
        matrix[at : at + size] = values
        if array:
            column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), demo.N_FEATURES)
            table = pa.table({"id": frame["id"].to_arrow(), "features": column})
            pq.write_table(table, paths["array"] / name, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        at += size
    matrix.flush()
    del matrix
    _stamp(folder, {**params, "array": array})
    return paths


def text_path(root: Path, count: int) -> Path:
    return root / f"text-{count}" / "data"


def text(root: Path, count: int) -> Path:
    """`count` sentences (2 to ~150 words) over a few partitions."""
    from batchinfer import demo

    folder = root / f"text-{count}"
    params = {"count": count, "partitions": TEXT_PARTITIONS, "version": 1}
    if _ready(folder, params):
        return text_path(root, count)
    _fresh(folder)
    demo.write_text(folder / "data", count, partitions=TEXT_PARTITIONS)
    _stamp(folder, params)
    return text_path(root, count)


def hf_classifier(root: Path) -> Path:
    """The Hugging Face text classifier of the `hf` workload (batchinfer.demo.write_hf_classifier)."""
    from batchinfer import demo

    folder = root / "hf-classifier"
    params = {"version": 1}
    if not _ready(folder, params):
        _fresh(folder)
        demo.write_hf_classifier(folder)
        _stamp(folder, params)
    return folder


def main() -> None:
    """Generate what is missing (run in its own process, so the benchmark driver stays small)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--sentences", type=int, default=0)
    parser.add_argument("--no-array", dest="array", action="store_false", help="skip the array-column layout")
    parser.add_argument("--hf", action="store_true", help="write the Hugging Face text classifier")
    args = parser.parse_args()
    root = Path(args.root)
    checkpoint(root)
    if args.rows:
        tabular(root / "data", args.rows, array=args.array)
    if args.sentences:
        text(root / "data", args.sentences)
    if args.hf:
        hf_classifier(root)


if __name__ == "__main__":
    main()
