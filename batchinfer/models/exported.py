"""Exported models: TorchScript archives (`torch.jit.save`) and `torch.export` programs (`.pt2`).

Both take a float32 feature tensor [rows, features] and return [rows, width]
outputs. What those are is declared: by an extra file `batchinfer.json` saved
in the archive (`{"output_kind": ..., "labels": [...], "normalizes": ...}`,
see `save_metadata`) or by `--output-kind`. Classifier outputs are logits
(softmax applied), multilabel ones logits (sigmoid applied), the other kinds
are taken as they are. Both formats are code, and loading either may unpickle
(`torch.jit.load`; `torch.export.load` for pickled payloads in the archive):
load them only from sources you trust. The feature names come from `--features`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import torch

from batchinfer.compat import move_program_to
from batchinfer.errors import ModelError
from batchinfer.models.base import ModelSpec, Precisioned, Wanted, choose_output, declared_output, digest
from batchinfer.models.checkpoints import read_checkpoint_bytes
from batchinfer.outputs import activation
from batchinfer.storage import temp_prefix

METADATA_FILE = "batchinfer.json"


def save_metadata(output_kind: str, labels: list[str] | None = None, normalizes: bool = False) -> dict[str, str]:
    """The extra file to save with an exported model so that it declares its outputs:
    `torch.jit.save(module, path, _extra_files=save_metadata("classifier", ["cat", "dog"]))`, or
    `torch.export.save(program, path, extra_files=...)`."""
    return {METADATA_FILE: json.dumps({"output_kind": output_kind, "labels": labels, "normalizes": normalizes})}


def _load_module(data: bytes, uri: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The module on `device` and the metadata the archive declares ({} when it has none)."""
    suffix = ".pt2" if uri.endswith(".pt2") else ".pt"
    extra = {METADATA_FILE: ""}
    with tempfile.TemporaryDirectory(prefix=temp_prefix("model-")) as folder:
        path = os.path.join(folder, "model" + suffix)
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            if suffix == ".pt2":
                # Tensors the graph creates (torch.zeros(..., device=...) as recorded at export) move too, not
                # only weights: a program exported on a GPU then runs on the CPU, and the other way round.
                program = move_program_to(torch.export.load(path, extra_files=extra), device)
                module = program.module().to(device)
            else:
                module = torch.jit.load(path, map_location=device, _extra_files=extra).eval()
        except Exception as exc:  # noqa: BLE001
            kind = "torch.export program" if suffix == ".pt2" else "TorchScript archive"
            raise ModelError(f"{uri} is not a loadable {kind} ({str(exc).splitlines()[0][:200]})", uri=uri) from None
    raw = extra.get(METADATA_FILE) or ""
    try:
        metadata = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{uri}: its {METADATA_FILE} is not valid JSON", uri=uri) from None
    if not isinstance(metadata, dict):
        raise ModelError(f"{uri}: its {METADATA_FILE} is not a JSON object", uri=uri)
    return module, metadata


class ExportedPredictor:
    def __init__(self, module: Any, precision: str, device: torch.device, kind: str):
        self.runner = Precisioned(precision, device)
        self.module = self.runner.module(module)
        self.finish = activation(kind)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.module(self.runner.inputs(batch))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return self.finish(logits.float())


def resolve(
    uri: str, *, precision: str, features: list[str] | None, storage_options: dict[str, Any], wanted: Wanted = Wanted()
) -> ModelSpec:
    if not features:
        raise ModelError(f"--model {uri}: exported models need --features naming their input columns in order")
    if precision == "int8":
        raise ModelError(f"--precision int8 applies to built-in models only, not to the exported model {uri}")
    data = read_checkpoint_bytes(uri, storage_options)
    probe, metadata = _load_module(data, uri, torch.device("cpu"))
    kind, labels, normalizes = declared_output(metadata, uri)
    output = choose_output(uri, wanted, declared=kind, source=METADATA_FILE, labels=labels, normalized=normalizes)
    # --features may hold globs: the probe runs once the columns are resolved (ModelSpec.accepts).
    widths: dict[int, int] = {}

    def accepts(n_features: int) -> None:
        if n_features not in widths:
            widths[n_features] = _probe_width(probe, uri, n_features)
        if output.labels and widths[n_features] != len(output.labels):
            raise ModelError(
                f"{len(output.labels)} labels are known but {uri} gives {widths[n_features]} outputs per row", uri=uri
            )

    def load(device: torch.device) -> ExportedPredictor:
        module = _load_module(data, uri, device)[0]
        for n_features in list(widths):  # the widths the run declared: probed on the device the shard holds
            _probe_width(module, uri, n_features, device)
        return ExportedPredictor(module, precision, device, output.kind)

    return ModelSpec(
        name=os.path.basename(uri),
        input_kind="features",
        output=output,
        fingerprint=digest("exported", data, precision),
        feature_names=None,
        loader=load,
        describe={"file": uri, "precision": precision},
        accepts=accepts,
        widths=widths,
    )


def _probe_width(module: Any, uri: str, n_features: int, device: torch.device | None = None) -> int:
    """Run zero rows through the model to check it accepts the declared features.

    Two batch sizes, so a program exported with a fixed batch size is caught here, not mid-run. With a
    `device` (at load, on the device a shard holds) the rows live there, and so must the output.
    """
    widths = set()
    where = f" on {device}" if device is not None else ""
    for rows in (2, 3):
        try:
            with torch.inference_mode():
                out = module(torch.zeros(rows, n_features, device=device))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"{uri} does not accept a [rows, {n_features}] float32 input{where} as --features declares "
                f"({_reason(exc)})",
                uri=uri,
            ) from exc
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != rows:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{uri} returns {shape} for {rows} rows; expected [rows, width]", uri=uri)
        if device is not None and (out.device.type, out.device.index or 0) != (device.type, device.index or 0):
            raise ModelError(f"{uri} loaded on {device} returns its output on {out.device}", uri=uri)
        widths.add(int(out.shape[1]))
        if rows == 2 and device is not None:
            break  # at load, two rows on the device; the batch sizes were checked on the CPU already
    return widths.pop()


def _reason(exc: BaseException) -> str:
    """The line that says what failed: TorchScript puts its own traceback before the error itself."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:200]
