"""Custom models (`tests.custom_models:FACTORY`) that follow the documented protocol: one on features, one on text."""

from __future__ import annotations

import torch

# Deliberately not the file's column order: the pipeline must feed columns by these names.
FEATURE_NAMES = ("x5", "x0", "x3")
WEIGHTS = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.5, 1.0, -1.0, 0.3], [-0.75, 0.2, 0.6, -0.4]])
BIAS = torch.tensor([0.1, -0.2, 0.0, 0.05])


class LinearClassifier:
    """softmax(x[FEATURE_NAMES] @ WEIGHTS + BIAS): four classes from three named features."""

    input_kind = "features"
    output_kind = "classifier"
    feature_names = FEATURE_NAMES
    version = "1"

    def load(self, device: torch.device) -> LinearClassifier:
        self.weights, self.bias = WEIGHTS.to(device), BIAS.to(device)
        return self

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(batch @ self.weights + self.bias, dim=1)


class CharacterEmbedder:
    """A unit vector from [length, count of 'a', count of ' ', 1]: cheap, and different for every sentence here."""

    input_kind = "text"
    output_kind = "embedder"  # the earlier name of "embedding", still understood
    normalizes = True  # so merge-and-validate checks the unit norm

    def load(self, device: torch.device) -> CharacterEmbedder:
        self.device = device
        return self

    def predict(self, batch: list[str]) -> torch.Tensor:
        rows = [[len(t), t.count("a"), t.count(" "), 1.0] for t in batch]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32, device=self.device), dim=1)


def linear() -> LinearClassifier:
    return LinearClassifier()


def characters() -> CharacterEmbedder:
    return CharacterEmbedder()
