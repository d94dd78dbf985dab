"""Custom models (`tests.models_for_validation:FACTORY`) for validation tests: one sound, one that emits NaN."""

from __future__ import annotations

import torch

NAN_KEY = 123
SHORT_KEY = 7


class TwoFeatureClassifier:
    """Three classes from the logits [x1, -x1, 0]: finite, rows summing to 1."""

    input_kind = "features"
    output_kind = "classifier"
    feature_names = ("x0", "x1")

    def load(self, device: torch.device) -> TwoFeatureClassifier:
        return self

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        x1 = batch[:, 1]
        return torch.softmax(torch.stack([x1, -x1, torch.zeros_like(x1)], dim=1), dim=1)


class NaNForOneKey(TwoFeatureClassifier):
    """Like the sound model, but the row whose key is NAN_KEY (x0 holds the key) comes out NaN."""

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        out = super().predict(batch)
        out[batch[:, 0] == NAN_KEY] = float("nan")
        return out


class ShortForOneKey(TwoFeatureClassifier):
    """Like the sound model, but the probabilities of the row whose key is SHORT_KEY sum to 0.9."""

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        out = super().predict(batch)
        out[batch[:, 0] == SHORT_KEY] *= 0.9
        return out


def good() -> TwoFeatureClassifier:
    return TwoFeatureClassifier()


def nan_for_one_key() -> NaNForOneKey:
    return NaNForOneKey()


def short_for_one_key() -> ShortForOneKey:
    return ShortForOneKey()
