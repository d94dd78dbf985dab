"""Model specs: resolve what a model needs without loading it, then load once per device."""

from batchinfer.models.base import ModelSpec, Predictor, resolve_model

__all__ = ["ModelSpec", "Predictor", "resolve_model"]
