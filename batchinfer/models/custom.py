"""Custom models: `package.module:factory` returning an object that follows `CustomModel`.

Example::

    class MyModel:
        input_kind = "features"        # or "text"
        output_kind = "classifier"     # probabilities per class; or "embedder"
        feature_names = ["f0", "f1"]   # optional; else --features
        version = "2024-05-01"         # optional; part of the model fingerprint

        def load(self, device):        # called once per device
            return self                # anything with predict(batch) -> Tensor [rows, width]

        def predict(self, batch):
            ...

    def factory():
        return MyModel()
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch

from batchinfer.errors import ModelError
from batchinfer.models.base import ModelSpec, Precisioned, Predictor, digest, import_object


class CustomModel(Protocol):
    input_kind: str
    output_kind: str

    def load(self, device: torch.device) -> Predictor: ...


class _Wrapped:
    def __init__(self, inner: Predictor, precision: str, device: torch.device):
        self.inner = inner
        self.runner = Precisioned(precision, device)

    def predict(self, batch: Any) -> torch.Tensor:
        with self.runner.context():
            return self.inner.predict(batch)


def resolve(target: str, *, precision: str, features: list[str] | None, text_column: str | None) -> ModelSpec:
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
    if output_kind not in ("classifier", "embedder"):
        raise ModelError(f"--model {target!r}: output_kind must be 'classifier' or 'embedder', got {output_kind!r}")
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
        output_kind=output_kind,
        fingerprint=digest("custom", target, version, source, precision),
        feature_names=tuple(names) if names else None,
        loader=load,
        describe={"factory": target, "version": version, "precision": precision},
    )
