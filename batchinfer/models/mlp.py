"""The built-in MLP: Linear layers with ReLU between; its last layer's outputs read as its output kind.

Checkpoint: safetensors with tensors `layers.{i}.weight` / `layers.{i}.bias`
and metadata `feature_names` (a JSON list), so columns are matched by name.
Optional metadata: `output_kind` (classifier by default: softmax at the end;
multilabel: sigmoid; regression, embedding, raw: the outputs as they are),
`labels` (a JSON list of class names) and `normalizes`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import nn

from batchinfer.errors import ModelError
from batchinfer.models.base import (
    ModelSpec,
    Precisioned,
    Wanted,
    choose_output,
    declared_output,
    digest,
    quantize_if_asked,
)
from batchinfer.models.checkpoints import parse_safetensors, read_checkpoint_bytes
from batchinfer.outputs import activation

_LAYER = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class MLP(nn.Module):
    """Linear -> ReLU -> ... -> Linear, returning logits."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def layer_sizes(tensors: dict[str, torch.Tensor], uri: str) -> list[int]:
    """Check the tensors form a chain of Linear layers; return [in, hidden..., out]."""
    indices = sorted({int(m.group(1)) for k in tensors if (m := _LAYER.match(k))})
    unknown = [k for k in tensors if not _LAYER.match(k)]
    if not indices or unknown:
        names = ", ".join(sorted(unknown)[:3]) or "none"
        raise ModelError(f"checkpoint {uri} is not an MLP checkpoint (unexpected tensors: {names})", uri=uri)
    if indices != list(range(len(indices))):
        raise ModelError(f"checkpoint {uri}: layer indices {indices} are not 0..{len(indices) - 1}", uri=uri)
    sizes: list[int] = []
    for i in indices:
        weight, bias = tensors.get(f"layers.{i}.weight"), tensors.get(f"layers.{i}.bias")
        if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ModelError(f"checkpoint {uri}: layers.{i} has a missing or misshapen weight/bias", uri=uri)
        if sizes and weight.shape[1] != sizes[-1]:
            raise ModelError(
                f"checkpoint {uri}: layers.{i}.weight expects {weight.shape[1]} inputs but layers.{i - 1} "
                f"gives {sizes[-1]} (shape mismatch)",
                uri=uri,
            )
        if not sizes:
            sizes.append(int(weight.shape[1]))
        sizes.append(int(weight.shape[0]))
    return sizes


def build(tensors: dict[str, torch.Tensor], uri: str) -> MLP:
    model = MLP(layer_sizes(tensors, uri))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval()


class MLPPredictor:
    accepts_strided = True  # nn.Linear reads a column-major batch as it is, without a copy

    def __init__(self, model: nn.Module, precision: str, device: torch.device, kind: str = "classifier"):
        self.runner = Precisioned(precision, device)
        self.model = model if precision == "int8" else self.runner.module(model)
        self.finish = activation(kind)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return self.finish(self.model(self.runner.inputs(batch)).float())


def resolve(
    checkpoint: str | None, *, precision: str, storage_options: dict[str, Any], wanted: Wanted = Wanted()
) -> ModelSpec:
    if not checkpoint:
        raise ModelError("--model mlp needs --checkpoint URI (a safetensors file)")
    data = read_checkpoint_bytes(checkpoint, storage_options)
    tensors, metadata = parse_safetensors(data, checkpoint)
    sizes = layer_sizes(tensors, checkpoint)
    names = _feature_names(metadata, checkpoint, sizes[0])
    kind, labels, normalizes = declared_output(metadata, checkpoint)
    output = choose_output(
        f"checkpoint {checkpoint}",
        wanted,
        declared=kind,
        source="metadata",
        default="classifier",
        labels=labels,
        normalized=normalizes,
        width=sizes[-1],
    )

    def load(device: torch.device) -> MLPPredictor:
        module = quantize_if_asked(build(tensors, checkpoint), precision, device)
        return MLPPredictor(module, precision, device, output.kind)

    def accepts(n_features: int) -> None:
        if n_features != sizes[0]:
            raise ModelError(
                f"checkpoint {checkpoint} takes {sizes[0]} features (layers.0.weight is "
                f"[{sizes[1]}, {sizes[0]}]) but {n_features} feature columns were given (shape mismatch)",
                uri=checkpoint,
            )

    return ModelSpec(
        name="mlp",
        input_kind="features",
        output=output,
        fingerprint=digest("mlp", data, precision, json.dumps(names)),
        feature_names=names,
        loader=load,
        describe={"checkpoint": checkpoint, "layers": sizes, "precision": precision},
        accepts=accepts,
    )


def _feature_names(metadata: dict[str, str], uri: str, width: int) -> tuple[str, ...] | None:
    raw = metadata.get("feature_names")
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelError(f"checkpoint {uri}: metadata feature_names is not a JSON list", uri=uri) from None
    if not isinstance(names, list) or len(names) != width:
        raise ModelError(
            f"checkpoint {uri}: metadata lists {len(names) if isinstance(names, list) else '?'} feature names "
            f"but the first layer takes {width} inputs",
            uri=uri,
        )
    return tuple(str(n) for n in names)


def save_checkpoint(
    model: MLP,
    path: str,
    feature_names: list[str],
    *,
    output_kind: str | None = None,
    labels: list[str] | None = None,
    normalizes: bool = False,
) -> None:
    """Write an MLP checkpoint in the layout `resolve` reads."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"feature_names": json.dumps(list(feature_names)), "architecture": "mlp"}
    if output_kind:
        metadata["output_kind"] = output_kind
    if labels:
        metadata["labels"] = json.dumps(list(labels))
    if normalizes:
        metadata["normalizes"] = "true"
    save_file(state, path, metadata=metadata)
