"""Custom models: `package.module:factory` returning an object that follows `CustomModel`.

Example::

    class MyModel:
        input_kind = "features"        # or "text"
        output_kind = "classifier"     # what predict returns: class probabilities (rows sum to 1);
                                       # "multilabel" (probabilities in [0, 1]), "regression",
                                       # "embedding" (vectors), or "raw" (anything finite)
        labels = ["cat", "dog", "owl"] # optional class names (classifier, multilabel)
        width = 3                      # optional: outputs per row (a regression of one output gets the
                                       # column `prediction`, of several `predictions`; else the first
                                       # scored rows tell)
        normalizes = False             # optional: embeddings are unit vectors (checked when True)
        feature_names = ["f0", "f1"]   # optional; else --features
        text_pairs = False             # optional: text models that take (a, b) pairs (--text-column a,b)
        version = "2024-05-01"         # optional; part of the model fingerprint

        def load(self, device):        # called once per device
            return self                # anything with predict(batch) -> Tensor [rows, width]

        def predict(self, batch):
            ...

Text models are handed their texts sorted by length (characters) in each
chunk, so a batch holds texts of similar length; a predictor that also has
`tokenize(texts) -> list of token id lists` and `encode_ids(ids) -> Tensor`
gets batches sorted by token count instead, and tokenizes in the prefetch thread.

    def factory():
        return MyModel()
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch

from batchinfer.errors import ModelError
from batchinfer.models.base import ModelSpec, Precisioned, Predictor, Wanted, choose_output, digest, import_object


class CustomModel(Protocol):
    input_kind: str
    output_kind: str

    def load(self, device: torch.device) -> Predictor: ...


class _Wrapped:
    """The factory's predictor under the requested precision (autocast: batchinfer cannot cast an object
    it does not know); its `tokenize`/`encode_ids`, when it has them, stay visible to the runner."""

    def __init__(self, inner: Predictor, precision: str, device: torch.device):
        self.inner = inner
        self.runner = Precisioned(precision, device)
        if callable(getattr(inner, "tokenize", None)) and callable(getattr(inner, "encode_ids", None)):
            self.tokenize = inner.tokenize  # type: ignore[attr-defined]
            self.encode_ids = self._encode_ids

    def predict(self, batch: Any) -> torch.Tensor:
        with self.runner.context():
            return self.inner.predict(batch)

    def _encode_ids(self, ids: Any) -> torch.Tensor:
        with self.runner.context():
            return self.inner.encode_ids(ids)  # type: ignore[attr-defined]


def resolve(
    target: str, *, precision: str, features: list[str] | None, text_column: str | None, wanted: Wanted = Wanted()
) -> ModelSpec:
    factory = import_object(target)
    if not callable(factory):
        raise ModelError(f"--model {target!r} is not callable")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"--model {target!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    input_kind = getattr(model, "input_kind", None)
    output_kind = getattr(model, "output_kind", None)
    if input_kind not in ("features", "text"):
        raise ModelError(f"--model {target!r}: input_kind must be 'features' or 'text', got {input_kind!r}")
    labels = getattr(model, "labels", None)
    output = choose_output(
        f"--model {target!r}",
        wanted,
        declared=output_kind,
        source="factory's output_kind",
        labels=tuple(str(x) for x in labels) if labels else None,
        normalized=bool(getattr(model, "normalizes", False)),
        width=int(model.width) if getattr(model, "width", None) else None,
    )
    if not callable(getattr(model, "load", None)):
        raise ModelError(f"--model {target!r}: the object has no load(device) method")
    if precision == "int8":
        raise ModelError(f"--precision int8 applies to built-in models only, not to {target!r}")
    names = getattr(model, "feature_names", None)
    version = str(getattr(model, "version", ""))
    try:
        source = inspect.getsource(inspect.getmodule(factory))  # type: ignore[arg-type]
    except (OSError, TypeError):
        source = ""

    def load(device: torch.device) -> _Wrapped:
        predictor = model.load(device)
        if not callable(getattr(predictor, "predict", None)):
            raise ModelError(f"--model {target!r}: load(device) returned an object without predict(batch)")
        return _Wrapped(predictor, precision, device)

    return ModelSpec(
        name=target,
        input_kind=input_kind,
        output=output,
        fingerprint=digest("custom", target, version, source, precision),
        feature_names=tuple(names) if names else None,
        loader=load,
        describe={"factory": target, "version": version, "precision": precision},
        text_pairs=bool(getattr(model, "text_pairs", False)) and input_kind == "text",
    )
