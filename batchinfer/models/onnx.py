"""ONNX files (`PATH.onnx`, local or on S3) through onnxruntime, the optional extra `onnx`: on the CPU, and on
CUDA when the installed onnxruntime has its CUDA provider.

Inputs are matched by name. Without `--features`, each input of the graph takes the column of its name
(a number per row, for an input of shape [batch] or [batch, 1]; or a fixed-size list column, for a single
input [batch, n]); an input that matches no column is refused before any work. With `--features`, the
graph's one input takes the [rows, features] matrix (several inputs: the listed columns of their names).

Outputs are matched by name too: the graph's only output, or the one named for the kind (`probabilities`
or `logits` for classifiers, `embedding`, `predictions`, `output`, ...). What they are is declared by the
file's metadata (`output_kind`, `labels`, `normalizes` in `metadata_props`) or by `--output-kind`. An
output named `probabilities` is taken as it is; other classifier and multilabel outputs are logits
(softmax, sigmoid applied).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import torch

from batchinfer.errors import ModelError
from batchinfer.models.base import ModelSpec, Wanted, choose_output, declared_output, digest
from batchinfer.models.checkpoints import read_checkpoint_bytes
from batchinfer.outputs import activation

log = logging.getLogger(__name__)

# Output names looked for, per kind, when the graph has several outputs.
OUTPUT_NAMES = {
    "classifier": ("probabilities", "logits"),
    "multilabel": ("probabilities", "logits"),
    "regression": ("predictions", "prediction", "logits", "output"),
    "embedding": ("embedding", "embeddings", "sentence_embedding"),
    "raw": ("output", "logits"),
}
_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError("ONNX models need onnxruntime: pip install 'batchinfer[onnx]'") from None
    return onnxruntime


def _session(data: bytes, uri: str, device: torch.device) -> Any:
    ort = _runtime()
    options = ort.SessionOptions()
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    else:
        if device.type == "cuda":
            _warn_cpu_only(uri, device)
        options.intra_op_num_threads = torch.get_num_threads()  # the threads this device was given
    try:
        return ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{uri} is not a loadable ONNX model ({str(exc).splitlines()[0][:200]})", uri=uri) from None


@functools.cache
def _warn_cpu_only(uri: str, device: torch.device) -> None:
    log.warning(
        "%s runs on the CPU although the shard holds %s: this onnxruntime has no CUDAExecutionProvider "
        "(install onnxruntime-gpu of the same version in its place)",
        uri,
        device,
    )


class _Input:
    def __init__(self, name: str, rank: int, dtype: Any) -> None:
        self.name, self.rank, self.dtype = name, rank, dtype


class OnnxPredictor:
    """Splits the feature matrix into the graph's inputs, runs the session, reads the chosen output."""

    def __init__(self, session: Any, inputs: list[_Input], output: str, kind: str, logits: bool) -> None:
        self.session, self.inputs, self.output = session, inputs, output
        self.finish = activation(kind) if logits else (lambda x: x)

    def feeds(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        if len(self.inputs) == 1:
            only = self.inputs[0]
            values = matrix if only.rank != 1 else matrix[:, 0]
            return {only.name: np.ascontiguousarray(values, dtype=only.dtype)}
        feeds = {}
        for j, item in enumerate(self.inputs):
            column = matrix[:, j] if item.rank == 1 else matrix[:, j : j + 1]
            feeds[item.name] = np.ascontiguousarray(column, dtype=item.dtype)
        return feeds

    def run(self, matrix: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output], self.feeds(matrix))
        out = np.asarray(out)
        return out.reshape(len(out), -1) if out.ndim == 1 else out

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(np.asarray(self.run(batch.detach().cpu().numpy()), dtype=np.float32))
        return self.finish(out.to(batch.device))  # the shard's device, where the runner reads outputs


def resolve(
    uri: str, *, precision: str, features: list[str] | None, storage_options: dict[str, Any], wanted: Wanted = Wanted()
) -> ModelSpec:
    if precision != "fp32":
        raise ModelError(f"--precision {precision} does not apply to {uri}: an ONNX file runs in the types it holds")
    data = read_checkpoint_bytes(uri, storage_options)
    session = _session(data, uri, torch.device("cpu"))
    inputs = _inputs(session, uri)
    kind, labels, normalizes = declared_output(dict(session.get_modelmeta().custom_metadata_map or {}), uri)
    output = choose_output(uri, wanted, declared=kind, source="metadata", labels=labels, normalized=normalizes)
    output_name, logits = _pick_output(session, uri, output.kind)
    probe = OnnxPredictor(session, inputs, output_name, output.kind, logits)
    widths: dict[int, int] = {}

    def accepts(n_features: int) -> None:
        if n_features not in widths:
            widths[n_features] = _probe_width(probe, uri, n_features)
        if output.labels and widths[n_features] != len(output.labels):
            raise ModelError(
                f"{len(output.labels)} labels are known but {uri} gives {widths[n_features]} outputs per row", uri=uri
            )

    def load(device: torch.device) -> OnnxPredictor:
        return OnnxPredictor(_session(data, uri, device), inputs, output_name, output.kind, logits)

    names = tuple(item.name for item in inputs)
    return ModelSpec(
        name=os.path.basename(uri),
        input_kind="features",
        output=output,
        fingerprint=digest("onnx", data),
        feature_names=names if len(names) > 1 else None,
        loader=load,
        describe={"file": uri, "inputs": list(names), "output": output_name},
        accepts=accepts,
        widths=widths,
        named_inputs=names,
    )


def _inputs(session: Any, uri: str) -> list[_Input]:
    found = []
    for item in session.get_inputs():
        dtype = _TYPES.get(item.type)
        if dtype is None:
            raise ModelError(f"{uri}: input {item.name!r} is {item.type}; batchinfer feeds numbers", uri=uri)
        rank = len(item.shape or [])
        if rank not in (1, 2):
            raise ModelError(f"{uri}: input {item.name!r} has shape {item.shape}; expected [batch] or [batch, n]")
        found.append(_Input(item.name, rank, dtype))
    if len(found) > 1 and any(i.rank == 2 and _fixed_width(session, i.name) not in (1, None) for i in found):
        raise ModelError(f"{uri}: with several inputs, each must take one number per row ([batch] or [batch, 1])")
    return found


def _fixed_width(session: Any, name: str) -> int | None:
    shape = next(i.shape for i in session.get_inputs() if i.name == name)
    return shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None


def _pick_output(session: Any, uri: str, kind: str) -> tuple[str, bool]:
    """The output to score and whether it holds logits."""
    names = [o.name for o in session.get_outputs()]
    if len(names) == 1:
        chosen = names[0]
    else:
        chosen = next((n for n in OUTPUT_NAMES[kind] if n in names), "")
        if not chosen:
            raise ModelError(
                f"{uri} has outputs {', '.join(names)}; for {kind} outputs one must be named "
                f"{' or '.join(OUTPUT_NAMES[kind])}",
                uri=uri,
            )
    return chosen, kind in ("classifier", "multilabel") and chosen != "probabilities"


def _probe_width(predictor: OnnxPredictor, uri: str, n_features: int) -> int:
    """Run zero rows through the graph, at two batch sizes, as the features will reach it."""
    widths = set()
    for rows in (2, 3):
        try:
            out = predictor.run(np.zeros((rows, n_features), dtype=np.float32))
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{uri} does not accept {n_features} feature column(s) ({reason})", uri=uri) from None
        if out.ndim != 2 or out.shape[0] != rows:
            raise ModelError(f"{uri} returns {tuple(out.shape)} for {rows} rows; expected [rows, width]", uri=uri)
        widths.add(int(out.shape[1]))
    return widths.pop()
