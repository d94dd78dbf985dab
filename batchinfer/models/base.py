"""What every model looks like to the pipeline.

`resolve_model` reads only what planning needs (input kind, feature names,
output kind, fingerprint) in the driver; `ModelSpec.load(device)` builds a
`Predictor` once per device. A predictor maps a batch to a float32 tensor
[rows, width] of its output kind's values (batchinfer/outputs.py): class
probabilities for classifiers, per-label probabilities for multilabel models,
values for regression, vectors for embeddings, anything finite for raw.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from batchinfer.config import OUTPUT_KINDS
from batchinfer.errors import ModelError
from batchinfer.outputs import OutputSpec

InputKind = Literal["features", "text"]
# Earlier names of output kinds that factories may still declare.
KIND_ALIASES = {"embedder": "embedding"}
# Kinds a model's logits can be read as; an embedder's vectors are only an embedding (or raw).
LOGIT_KINDS = ("classifier", "multilabel", "regression", "raw")


@runtime_checkable
class Predictor(Protocol):
    """A model loaded on one device.

    `predict` takes a float32 tensor [rows, features] already on the device
    (feature models) or a list of strings (text models; (a, b) tuples for text
    pairs) and returns a float tensor [rows, width] of the output kind's values.
    """

    def predict(self, batch: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class ModelSpec:
    """A model resolved but not loaded: enough to plan, validate and fingerprint."""

    name: str
    input_kind: InputKind
    output: OutputSpec
    fingerprint: str
    feature_names: tuple[str, ...] | None = None
    loader: Callable[[torch.device], Predictor] = field(compare=False, repr=False, default=None)  # type: ignore[assignment]
    describe: dict[str, Any] = field(default_factory=dict, compare=False)
    # Raises ModelError when the model cannot take `n` feature columns (checked once the columns are resolved).
    accepts: Callable[[int], None] | None = field(compare=False, repr=False, default=None)
    # Inputs the model names itself: without --features, the columns of those names feed them.
    named_inputs: tuple[str, ...] | None = None
    # Outputs per row found by `accepts` (by feature count), for models that do not declare it.
    widths: dict[int, int] = field(default_factory=dict, compare=False, repr=False)
    text_pairs: bool = False  # takes (a, b) pairs of texts: cross-encoders, NLI classifiers

    @property
    def output_kind(self) -> str:
        return self.output.kind

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


@dataclass(frozen=True)
class Wanted:
    """What the user asked of the outputs (`--output-kind`, `--labels`); None: what the model declares."""

    kind: str | None = None
    labels: tuple[str, ...] | None = None


def resolve_model(
    spec: str,
    *,
    checkpoint: str | None,
    precision: str,
    features: list[str] | None,
    text_column: str | None,
    storage_options: dict[str, Any],
    output_kind: str | None = None,
    labels: list[str] | None = None,
) -> ModelSpec:
    """Turn the user's --model value into a ModelSpec (no weights are loaded on a device here)."""
    from batchinfer.models import custom, exported, hf, minilm, mlp, onnx

    wanted = Wanted(output_kind, tuple(labels) if labels else None)
    if spec == "mlp":
        return mlp.resolve(checkpoint, precision=precision, storage_options=storage_options, wanted=wanted)
    if spec == "minilm":
        if features:
            raise ModelError("--model minilm reads a text column; use --text-column, not --features")
        return minilm.resolve(precision=precision, wanted=wanted)
    if spec.startswith("hf:"):
        return hf.resolve(spec, precision=precision, storage_options=storage_options, wanted=wanted)
    if spec.endswith(".onnx"):
        return onnx.resolve(
            spec, precision=precision, features=features, storage_options=storage_options, wanted=wanted
        )
    if spec.endswith((".pt", ".pt2", ".ts", ".torchscript")):
        return exported.resolve(
            spec, precision=precision, features=features, storage_options=storage_options, wanted=wanted
        )
    if ":" in spec and not spec.startswith(("s3://", "/", "file:")):
        return custom.resolve(spec, precision=precision, features=features, text_column=text_column, wanted=wanted)
    raise ModelError(
        f"--model {spec!r} is not 'mlp', 'minilm', 'hf:PATH', a '.pt'/'.pt2'/'.onnx' file or 'package.module:factory'"
    )


def choose_output(
    name: str,
    wanted: Wanted,
    *,
    declared: str | None = None,
    source: str = "",
    default: str | None = None,
    allowed: tuple[str, ...] = OUTPUT_KINDS,
    labels: tuple[str, ...] | None = None,
    normalized: bool = False,
    width: int | None = None,
) -> OutputSpec:
    """The output kind and labels of a model: what it declares (in `source`), else what was asked, else `default`.

    Asking for another kind than the model declares is refused, except `raw` (its outputs, unchecked).
    """
    declared = KIND_ALIASES.get(declared, declared) if declared else None
    if declared is not None and declared not in OUTPUT_KINDS:
        raise ModelError(f"{name}: {source} declares output kind {declared!r}; it must be one of {_kinds()}")
    if wanted.kind is None:
        kind = declared or default
        if kind is None:
            raise ModelError(f"{name} does not declare what its outputs are: give --output-kind ({_kinds()})")
    elif declared and wanted.kind not in (declared, "raw"):
        raise ModelError(f"--output-kind {wanted.kind} contradicts {name}: its {source} declares {declared}")
    elif wanted.kind not in allowed:
        raise ModelError(f"--output-kind {wanted.kind} does not fit {name}; it can give {', '.join(allowed)}")
    else:
        kind = wanted.kind
    names = wanted.labels or labels
    if names and kind not in ("classifier", "multilabel"):
        if wanted.labels:
            raise ModelError(f"--labels applies to classifier and multilabel outputs, not to {name}'s {kind} outputs")
        names = None
    if names and width is not None and len(names) != width:
        said = "--labels names" if wanted.labels else f"{name} records"
        raise ModelError(f"{said} {len(names)} labels but {name} gives {width} outputs per row")
    return OutputSpec(kind, tuple(names) if names else None, normalized=normalized and kind == "embedding", width=width)


def _kinds() -> str:
    return ", ".join(OUTPUT_KINDS)


def declared_output(metadata: dict[str, Any], uri: str) -> tuple[str | None, tuple[str, ...] | None, bool]:
    """The output kind, label names and normalisation a model file's metadata declares.

    Keys: `output_kind`, `labels` (a JSON list, or a list), `normalizes` ("true"/"false", or a bool).
    """
    kind = metadata.get("output_kind")
    raw = metadata.get("labels")
    labels: Any = raw
    if isinstance(raw, str):
        try:
            labels = json.loads(raw)
        except json.JSONDecodeError:
            raise ModelError(f"{uri}: metadata labels is not a JSON list", uri=uri) from None
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise ModelError(f"{uri}: metadata labels must be a list of strings", uri=uri)
    normalizes = metadata.get("normalizes", False)
    if isinstance(normalizes, str):
        normalizes = normalizes.strip().lower() in ("1", "true", "yes")
    return (str(kind) if kind else None), (tuple(labels) if labels else None), bool(normalizes)


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


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precisioned:
    """The requested precision on one device: bf16/fp16 weights are cast with the module (`model.to(dtype)`),
    so a model takes half the device memory, and floating inputs are cast to match."""

    def __init__(self, precision: str, device: torch.device):
        self.device = device
        self.precision = precision
        self.dtype = HALF.get(precision, torch.float32)

    def module(self, module: Any) -> Any:
        """The module on the device, its weights in the requested type."""
        if self.dtype == torch.float32:
            return module.to(self.device)
        return module.to(self.device, self.dtype)

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.is_floating_point() and batch.dtype != self.dtype:
            return batch.to(self.dtype)
        return batch

    def context(self) -> contextlib.AbstractContextManager:
        """Autocast, for models whose weights batchinfer cannot cast itself (a factory's own objects)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


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


# A tokenizer reads a whole string before it truncates, so one huge cell would cost memory and time in
# proportion to its length. Texts are first cut to this many characters per token of the model's maximum
# length, at a word boundary, and cut longer only while the cut holds fewer tokens than that maximum.
CUT_CHARS_PER_TOKEN = 32
_BOUNDARY_SEARCH = 1_000


def _word_boundary(text: str, size: int) -> int:
    """Where to cut `text` near `size` so that no word is split: just after whitespace or punctuation
    (where BERT-style pre-tokenizers split), or at `size` itself when the last stretch has neither."""
    for at in range(size, max(size - _BOUNDARY_SEARCH, 0), -1):
        char = text[at - 1]
        if char.isspace() or unicodedata.category(char).startswith("P"):
            return at
    return size


def cut_texts(texts: list[str], max_length: int, count: Callable[[str], int]) -> list[str]:
    """Each long text cut by characters to a prefix of whole words that still holds at least `max_length`
    tokens (`count` gives a text's tokens, special ones aside, and may stop counting at `max_length`).
    Truncation keeps at most `max_length` tokens of each text, all of them from such a prefix, so the cut
    changes no token id, alone or in a pair."""
    limit = max_length * CUT_CHARS_PER_TOKEN
    cut = []
    for text in texts:
        size, kept = limit, text
        while len(text) > size:
            kept = text[: _word_boundary(text, size)]
            if count(kept) >= max_length:
                break
            size *= 4  # too few tokens in the cut (runs of spaces, say): cut longer
        else:
            kept = text
        cut.append(kept)
    return cut
