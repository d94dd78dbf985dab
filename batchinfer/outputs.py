"""Output kinds: what a model's outputs mean, the columns they become, and the checks they must pass.

One table, `KINDS`, holds per kind: the activation applied to a model's raw outputs (logits), the output
columns built from a chunk's values, the expected schema, and the merge-and-validate checks.

| kind | columns | checks |
| --- | --- | --- |
| classifier | prediction int64, probabilities list<float32>, label string (when names are known) | rows sum to 1, argmax |
| multilabel | probabilities list<float32>, labels list<string> (over the threshold) | values in [0, 1] |
| regression | prediction float64 (one output) or predictions list<float64> (several) | finite |
| embedding | embedding list<float32> | unit norm when the model declares it normalises |
| raw | output list<float32> | finite |
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from batchinfer.config import DEFAULT_THRESHOLD, OUTPUT_KINDS
from batchinfer.errors import ModelError

PROBABILITY_TOLERANCE = 1e-4
NORM_TOLERANCE = 1e-3
RANGE_TOLERANCE = 1e-6

FLOATS = pa.list_(pa.float32())
DOUBLES = pa.list_(pa.float64())
STRINGS = pa.list_(pa.string())


@dataclass(frozen=True)
class OutputSpec:
    """What a run's output rows hold: the kind and what it needs (plain values, safe to send to a task)."""

    kind: str = "classifier"
    labels: tuple[str, ...] | None = None  # class names in output order (classifier, multilabel)
    threshold: float = DEFAULT_THRESHOLD  # multilabel: a label is on above this probability
    normalized: bool = False  # embedding: the model declares unit-norm vectors
    width: int | None = None  # outputs per row, when known before scoring

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels) if self.labels else None
        return data


class OutputInvalid(ValueError):
    """A check of output values failed; the message names the check and the first key at fault."""


@dataclass(frozen=True)
class Kind:
    name: str
    activation: Callable[[torch.Tensor], torch.Tensor]  # from a model's raw outputs (logits) to this kind's values
    columns: Callable[[np.ndarray, OutputSpec], dict[str, pa.Array]]
    schema: Callable[[OutputSpec, list[str]], list[tuple[str, pa.DataType]]]
    check: Callable[[pa.Table, OutputSpec], None]


def kind(spec: OutputSpec | str) -> Kind:
    return KINDS[spec if isinstance(spec, str) else spec.kind]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """What turns a model's logits into values of kind `name` (softmax, sigmoid, or nothing)."""
    return KINDS[name].activation


def columns(values: np.ndarray, spec: OutputSpec) -> dict[str, pa.Array]:
    """The output columns of a chunk's values [rows, width], in schema order."""
    if len(values) and spec.labels and values.shape[1] != len(spec.labels):
        raise ModelError(
            f"the model returned {values.shape[1]} outputs per row but {len(spec.labels)} labels are known "
            f"({', '.join(spec.labels[:4])}{', ...' if len(spec.labels) > 4 else ''})"
        )
    if len(values) and spec.width is not None and values.shape[1] != spec.width:
        raise ModelError(f"the model returned {values.shape[1]} outputs per row; it declares {spec.width}")
    return KINDS[spec.kind].columns(values, spec)


def expected_schema(spec: OutputSpec, present: list[str]) -> list[tuple[str, pa.DataType]]:
    """The output columns (name, type) a shard of this kind holds; `present` settles what data decide."""
    return KINDS[spec.kind].schema(spec, present)


def check(table: pa.Table, spec: OutputSpec) -> None:
    """Every check of the kind over a shard's output table (key first); raises OutputInvalid."""
    KINDS[spec.kind].check(table, spec)


# -- building columns ----------------------------------------------------------------------------------------


def list_array(values: np.ndarray, dtype: pa.DataType = pa.float32()) -> pa.Array:
    """Rows of a [rows, width] matrix as a list column, without a per-row Python loop."""
    rows, width = values.shape if values.ndim == 2 else (0, 0)
    if rows == 0:
        return pa.array([], type=pa.list_(dtype))
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=dtype))


def _argmax(values: np.ndarray) -> np.ndarray:
    # torch's argmax (the first maximal index, like numpy's): faster than numpy's over rows of a few classes.
    if not len(values):
        return np.zeros(0, np.int64)
    return torch.from_numpy(values).argmax(dim=1).numpy()


def _names(spec: OutputSpec, width: int) -> np.ndarray:
    return np.asarray(spec.labels if spec.labels else [str(i) for i in range(width)], dtype=object)


def _classifier_columns(values: np.ndarray, spec: OutputSpec) -> dict[str, pa.Array]:
    predictions = _argmax(values)
    out = {"prediction": pa.array(predictions, pa.int64()), "probabilities": list_array(values)}
    if spec.labels:
        out["label"] = pa.array(np.asarray(spec.labels, dtype=object)[predictions], pa.string())
    return out


def _on_labels(values: np.ndarray, spec: OutputSpec) -> pa.Array:
    """Per row, the names of the outputs above the threshold, in output order."""
    if not len(values):
        return pa.array([], type=STRINGS)
    on = values > spec.threshold
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(on.sum(axis=1), out=offsets[1:])
    names = _names(spec, values.shape[1])[np.nonzero(on)[1]]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(names, pa.string()))


def _multilabel_columns(values: np.ndarray, spec: OutputSpec) -> dict[str, pa.Array]:
    return {"probabilities": list_array(values), "labels": _on_labels(values, spec)}


def _regression_columns(values: np.ndarray, spec: OutputSpec) -> dict[str, pa.Array]:
    doubles = values.astype(np.float64)
    if _single_output(spec, values.shape[1] if values.ndim == 2 and len(values) else None):
        return {"prediction": pa.array(doubles.reshape(-1), pa.float64())}
    return {"predictions": list_array(doubles, pa.float64())}


def _single_output(spec: OutputSpec, width: int | None) -> bool:
    return (spec.width if spec.width is not None else width) == 1


def _embedding_columns(values: np.ndarray, spec: OutputSpec) -> dict[str, pa.Array]:
    return {"embedding": list_array(values)}


def _raw_columns(values: np.ndarray, spec: OutputSpec) -> dict[str, pa.Array]:
    return {"output": list_array(values)}


# -- schemas ---------------------------------------------------------------------------------------------------


def _classifier_schema(spec: OutputSpec, present: list[str]) -> list[tuple[str, pa.DataType]]:
    schema = [("prediction", pa.int64()), ("probabilities", FLOATS)]
    return [*schema, ("label", pa.string())] if spec.labels else schema


def _regression_schema(spec: OutputSpec, present: list[str]) -> list[tuple[str, pa.DataType]]:
    # The width of a model that does not declare it shows in its first output: one column or the other.
    single = spec.width == 1 if spec.width is not None else "prediction" in present
    return [("prediction", pa.float64())] if single else [("predictions", DOUBLES)]


def _fixed(*schema: tuple[str, pa.DataType]) -> Callable[[OutputSpec, list[str]], list[tuple[str, pa.DataType]]]:
    return lambda spec, present: list(schema)


# -- checks ----------------------------------------------------------------------------------------------------


def _key(table: pa.Table, row: int) -> Any:
    return table.column(0)[row].as_py()


def _matrix(table: pa.Table, column: str, spec: OutputSpec) -> np.ndarray:
    """A list column as a [rows, width] matrix, after the checks every kind shares (no nulls, one width,
    finite values)."""
    lists = table.column(column).combine_chunks()
    if lists.null_count:
        raise OutputInvalid(f"finite check failed: {lists.null_count} null {column}")
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    if not len(lengths):
        return np.zeros((0, spec.width or 0), dtype=np.float32)
    if lengths.min() != lengths.max() or lengths.min() == 0:
        raise OutputInvalid(f"schema check failed: {column} lists have uneven lengths")
    width = int(lengths[0])
    if spec.width is not None and width != spec.width:
        raise OutputInvalid(f"schema check failed: {column} lists hold {width} values, the model gives {spec.width}")
    values = lists.flatten().to_numpy(zero_copy_only=False).reshape(len(lengths), width)
    _finite(table, values)
    return values


def _finite(table: pa.Table, values: np.ndarray) -> None:
    # Flat passes first: per-row numpy reductions over rows this short cost far more.
    if not np.isfinite(values).all():
        rows = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        raise OutputInvalid(f"finite check failed: key {_key(table, int(np.flatnonzero(rows)[0]))!r} has NaN/inf")


def _check_classifier(table: pa.Table, spec: OutputSpec) -> None:
    values = _matrix(table, "probabilities", spec)
    if not len(values):
        return
    width = values.shape[1]
    with warnings.catch_warnings():  # a read-only view of Arrow's buffer: nothing writes into it
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.from_numpy(values)
    # In torch, on the device thread's own threads: numpy's matmul would wake OpenBLAS's pool, whose
    # spinning threads then take the cores from torch's. A float32 sum of 10 probabilities is within
    # 1e-6 of the float64 one, far inside the tolerance.
    sums = rows.sum(dim=1).numpy()
    off = np.abs(sums - 1.0) > PROBABILITY_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise OutputInvalid(f"probabilities check failed: key {_key(table, i)!r} sums to {sums[i]:.6f}")
    predictions = table.column("prediction").to_numpy()
    outside = (predictions < 0) | (predictions >= width)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise OutputInvalid(f"prediction check failed: key {_key(table, i)!r} is class {predictions[i]}")
    # torch's row maximum runs on every core; numpy's over short rows is much slower.
    chosen = rows.gather(1, torch.from_numpy(predictions.astype(np.int64, copy=False))[:, None]).squeeze(1)
    wrong = (chosen != rows.amax(dim=1)).numpy()
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise OutputInvalid(f"prediction check failed: key {_key(table, i)!r} is not the argmax")
    if spec.labels:
        expected = np.asarray(spec.labels, dtype=object)[predictions]
        got = table.column("label").to_numpy(zero_copy_only=False)
        wrong = expected != got
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise OutputInvalid(
                f"label check failed: key {_key(table, i)!r} is labelled {got[i]!r}, its class is {expected[i]!r}"
            )


def _check_multilabel(table: pa.Table, spec: OutputSpec) -> None:
    values = _matrix(table, "probabilities", spec)
    if not len(values):
        return
    outside = (values < -RANGE_TOLERANCE) | (values > 1.0 + RANGE_TOLERANCE)
    if outside.any():
        i, j = (int(v[0]) for v in np.nonzero(outside))
        raise OutputInvalid(
            f"probabilities check failed: key {_key(table, i)!r} has {values[i, j]:.6f} at {j}, outside [0, 1]"
        )
    got = table.column("labels").combine_chunks()
    expected = _on_labels(values, spec)
    if not got.equals(expected):
        got_rows, want_rows = got.to_pylist(), expected.to_pylist()
        i = next(i for i, (a, b) in enumerate(zip(got_rows, want_rows, strict=True)) if a != b)
        raise OutputInvalid(
            f"labels check failed: key {_key(table, i)!r} lists {got_rows[i]}, "
            f"its probabilities above {spec.threshold} are {want_rows[i]}"
        )


def _check_regression(table: pa.Table, spec: OutputSpec) -> None:
    if "prediction" in table.column_names:
        column = table.column("prediction").combine_chunks()
        if column.null_count:
            raise OutputInvalid(f"finite check failed: {column.null_count} null prediction")
        _finite(table, column.to_numpy(zero_copy_only=False))
    else:
        _matrix(table, "predictions", spec)


def _check_embedding(table: pa.Table, spec: OutputSpec) -> None:
    values = _matrix(table, "embedding", spec)
    if not spec.normalized or not len(values):
        return
    norms = np.sqrt(np.einsum("ij,ij->i", values, values))
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise OutputInvalid(f"unit norm check failed: key {_key(table, i)!r} has norm {norms[i]:.6f}")


def _check_raw(table: pa.Table, spec: OutputSpec) -> None:
    _matrix(table, "output", spec)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


KINDS: dict[str, Kind] = {
    "classifier": Kind(
        "classifier", lambda x: torch.softmax(x, dim=1), _classifier_columns, _classifier_schema, _check_classifier
    ),
    "multilabel": Kind(
        "multilabel",
        torch.sigmoid,
        _multilabel_columns,
        _fixed(("probabilities", FLOATS), ("labels", STRINGS)),
        _check_multilabel,
    ),
    "regression": Kind("regression", _same, _regression_columns, _regression_schema, _check_regression),
    "embedding": Kind("embedding", _same, _embedding_columns, _fixed(("embedding", FLOATS)), _check_embedding),
    "raw": Kind("raw", _same, _raw_columns, _fixed(("output", FLOATS)), _check_raw),
}
assert tuple(KINDS) == OUTPUT_KINDS
