"""What every model looks like to the pipeline.

`resolve_model` reads only what planning needs (input kind, feature names,
fingerprint) in the driver; `ModelSpec.load(device)` builds a `Predictor`
once per device. A predictor maps a batch to a float32 tensor: class
probabilities (rows sum to 1) for classifiers, unit-norm vectors for embedders.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from batchinfer.errors import ModelError

InputKind = Literal["features", "text"]
OutputKind = Literal["classifier", "embedder"]


@runtime_checkable
class Predictor(Protocol):
    """A model loaded on one device.

    `predict` takes a float32 tensor [rows, features] already on the device
    (feature models) or a list of strings (text models) and returns a float32
    tensor [rows, width]: probabilities for classifiers, embeddings for embedders.
    """

    def predict(self, batch: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class ModelSpec:
    """A model resolved but not loaded: enough to plan, validate and fingerprint."""

    name: str
    input_kind: InputKind
    output_kind: OutputKind
    fingerprint: str
    feature_names: tuple[str, ...] | None = None
    loader: Callable[[torch.device], Predictor] = field(compare=False, repr=False, default=None)  # type: ignore[assignment]
    describe: dict[str, Any] = field(default_factory=dict, compare=False)
    # Raises ModelError when the model cannot take `n` feature columns (checked once the columns are resolved).
    accepts: Callable[[int], None] | None = field(compare=False, repr=False, default=None)

    def load(self, device: torch.device) -> Predictor:
        try:
            return self.loader(device)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"model {self.name!r} failed to load on {device}: {exc}") from exc


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def resolve_model(
    spec: str,
    *,
    checkpoint: str | None,
    precision: str,
    features: list[str] | None,
    text_column: str | None,
    storage_options: dict[str, Any],
) -> ModelSpec:
    """Turn the user's --model value into a ModelSpec (no weights are loaded on a device here)."""
    from batchinfer.models import custom, exported, minilm, mlp

    if spec == "mlp":
        return mlp.resolve(checkpoint, precision=precision, storage_options=storage_options)
    if spec == "minilm":
        if features:
            raise ModelError("--model minilm reads a text column; use --text-column, not --features")
        return minilm.resolve(precision=precision)
    if spec.endswith((".pt", ".pt2", ".ts", ".torchscript")):
        return exported.resolve(spec, precision=precision, features=features, storage_options=storage_options)
    if ":" in spec and not spec.startswith(("s3://", "/", "file:")):
        return custom.resolve(spec, precision=precision, features=features, text_column=text_column)
    raise ModelError(f"--model {spec!r} is not 'mlp', 'minilm', a '.pt'/'.pt2' file or 'package.module:factory'")


def import_object(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"--model {target!r}: module {module_name!r} does not import ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelError(f"--model {target!r}: module {module_name!r} has no attribute {attr!r}") from None


class Precisioned:
    """Runs a module's forward under the requested precision on its device."""

    def __init__(self, precision: str, device: torch.device):
        self.device = device
        self.precision = precision
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            self._autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)
        else:
            self._autocast = None

    def context(self):
        import contextlib

        return self._autocast() if self._autocast else contextlib.nullcontext()


def quantize_if_asked(module: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """int8 dynamic quantisation of Linear layers (CPU only)."""
    if precision != "int8":
        return module
    if device.type != "cpu":
        raise ModelError(f"--precision int8 runs on the CPU only, not on {device}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
