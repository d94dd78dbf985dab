"""Exported models: TorchScript archives (`torch.jit.save`) and `torch.export` programs (`.pt2`).

Both take a float32 feature tensor [rows, features] and return class logits
[rows, classes]; the pipeline applies softmax. Neither format unpickles
arbitrary Python objects. The feature names come from `--features`.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import torch

from batchinfer.errors import ModelError
from batchinfer.models.base import ModelSpec, Precisioned, digest
from batchinfer.models.checkpoints import read_checkpoint_bytes


def _load_module(data: bytes, uri: str, device: torch.device) -> Any:
    suffix = ".pt2" if uri.endswith(".pt2") else ".pt"
    with tempfile.TemporaryDirectory(prefix="batchinfer-model-") as folder:
        path = os.path.join(folder, "model" + suffix)
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            if suffix == ".pt2":
                program = torch.export.load(path)
                if device.type != "cpu":
                    # Tensors the graph creates (torch.zeros(..., device="cpu") at export) move too, not only weights.
                    from torch.export.passes import move_to_device_pass

                    program = move_to_device_pass(program, device)
                return program.module().to(device)
            return torch.jit.load(path, map_location=device).eval()
        except Exception as exc:  # noqa: BLE001
            kind = "torch.export program" if suffix == ".pt2" else "TorchScript archive"
            raise ModelError(f"{uri} is not a loadable {kind} ({str(exc).splitlines()[0][:200]})", uri=uri) from None


class ExportedPredictor:
    def __init__(self, module: Any, precision: str, device: torch.device):
        self.module = module
        self.runner = Precisioned(precision, device)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        with self.runner.context():
            logits = self.module(batch)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return torch.softmax(logits.float(), dim=1)


def resolve(uri: str, *, precision: str, features: list[str] | None, storage_options: dict[str, Any]) -> ModelSpec:
    if not features:
        raise ModelError(f"--model {uri}: exported models need --features naming their input columns in order")
    if precision == "int8":
        raise ModelError(f"--precision int8 applies to built-in models only, not to the exported model {uri}")
    data = read_checkpoint_bytes(uri, storage_options)
    probe = _load_module(data, uri, torch.device("cpu"))
    # --features may hold globs: the probe runs once the columns are resolved (ModelSpec.accepts).
    widths: dict[int, int] = {}

    def accepts(n_features: int) -> None:
        if n_features not in widths:
            widths[n_features] = _probe_width(probe, uri, n_features)

    def load(device: torch.device) -> ExportedPredictor:
        return ExportedPredictor(_load_module(data, uri, device), precision, device)

    return ModelSpec(
        name=os.path.basename(uri),
        input_kind="features",
        output_kind="classifier",
        fingerprint=digest("exported", data, precision),
        feature_names=None,
        loader=load,
        describe={"file": uri, "precision": precision},
        accepts=accepts,
    )


def _probe_width(module: Any, uri: str, n_features: int) -> int:
    """Run zero rows through the model to check it accepts the declared features.

    Two batch sizes, so a program exported with a fixed batch size is caught here, not mid-run.
    """
    widths = set()
    for rows in (2, 3):
        try:
            with torch.inference_mode():
                out = module(torch.zeros(rows, n_features))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"{uri} does not accept a [rows, {n_features}] float32 input as --features declares ({_reason(exc)})",
                uri=uri,
            ) from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != rows:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{uri} returns {shape} for {rows} rows; expected [rows, classes] logits", uri=uri)
        widths.add(int(out.shape[1]))
    return widths.pop()


def _reason(exc: BaseException) -> str:
    """The line that says what failed: TorchScript puts its own traceback before the error itself."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:200]
