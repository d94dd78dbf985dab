"""Custom models (`tests.kind_models:FACTORY`) of each output kind over the features x0 (= the key) and x1,
some sound and some emitting what their kind forbids at the row whose key is BAD_KEY."""

from __future__ import annotations

import torch

BAD_KEY = 123


class _Base:
    input_kind = "features"
    feature_names = ("x0", "x1")

    def load(self, device: torch.device):
        return self

    def values(self, batch: torch.Tensor) -> torch.Tensor:
        x1 = batch[:, 1]
        return torch.stack([x1, -x1, 0.5 * x1 + 0.1], dim=1)

    def spoil(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.values(batch)
        bad = batch[:, 0] == BAD_KEY
        if bad.any():
            out = out.clone()
            out[bad] = self.spoil(batch[bad], out[bad])
        return out


class Regression(_Base):
    output_kind = "regression"

    def values(self, batch: torch.Tensor) -> torch.Tensor:
        return (3.0 * batch[:, 1] + 1.0)[:, None]


class NaNRegression(Regression):
    def spoil(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.full_like(out, float("nan"))


class Multilabel(_Base):
    output_kind = "multilabel"
    labels = ("red", "green", "blue")

    def values(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().values(batch))


class MultilabelAbove1(Multilabel):
    def spoil(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out[:, 0] = 1.2
        return out


class Embedding(_Base):
    output_kind = "embedding"
    normalizes = True

    def values(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(super().values(batch), dim=1)


class NotUnitNorm(Embedding):
    def spoil(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * 2.0


class NotUnitNormUndeclared(NotUnitNorm):
    normalizes = False


class Classifier(_Base):
    output_kind = "classifier"
    labels = ("low", "mid", "high")

    def values(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().values(batch), dim=1)


class NotSummingTo1(Classifier):
    def spoil(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * 0.5


class Raw(_Base):
    output_kind = "raw"


def regression() -> Regression:
    return Regression()


def nan_regression() -> NaNRegression:
    return NaNRegression()


def multilabel() -> Multilabel:
    return Multilabel()


def multilabel_above_1() -> MultilabelAbove1:
    return MultilabelAbove1()


def embedding() -> Embedding:
    return Embedding()


def not_unit_norm() -> NotUnitNorm:
    return NotUnitNorm()


def not_unit_norm_undeclared() -> NotUnitNormUndeclared:
    return NotUnitNormUndeclared()


def classifier() -> Classifier:
    return Classifier()


def not_summing_to_1() -> NotSummingTo1:
    return NotSummingTo1()


def raw() -> Raw:
    return Raw()
