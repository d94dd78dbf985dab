"""Custom models (`tests.device_faults:FACTORY`) that fail the way GPUs do, for the CPU tests of those paths.

- `wrong_device`: returns its output on torch's `meta` device, not on the device it was loaded on.
- `out_of_memory`: raises "CUDA out of memory" (a plain RuntimeError, as TorchScript re-raises it) for
  batches of more than LIMIT rows, and counts those raises in the file BATCHINFER_TEST_CONTROL/oom.
- `breaks_a_device`: steered by BATCHINFER_TEST_CONTROL/broken, which holds "MODE DEVICE": the model
  fails to load (MODE `load`) or raises a fatal device error (MODE `fatal`, torch.AcceleratorError) on
  DEVICE (a fake device's name, or `all`). Fake devices all hand the model the CPU, so the device is read
  from the name of the thread that runs the work, which batchinfer names after the device.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

FEATURES = ["id", "f00", "f01", "f02", "f03"]
LIMIT = 300
_lock = threading.Lock()


def _weights(device: torch.device) -> torch.Tensor:
    return torch.randn(len(FEATURES) - 1, 3, generator=torch.Generator().manual_seed(7)).to(device)


def expected(features: torch.Tensor) -> torch.Tensor:
    """What every model here returns when it does not fail: a fixed softmax of the non-id features."""
    return torch.softmax(features[:, 1:].float() @ _weights(torch.device("cpu")), dim=1)


class _Base:
    input_kind = "features"
    output_kind = "classifier"
    feature_names = FEATURES
    version = "1"

    def load(self, device: torch.device) -> _Base:
        self.weight = _weights(device)
        return self

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(batch[:, 1:] @ self.weight, dim=1)


class WrongDevice(_Base):
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.empty((batch.shape[0], 3), device="meta")


class OutOfMemory(_Base):
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > LIMIT:
            with _lock, open(Path(os.environ["BATCHINFER_TEST_CONTROL"]) / "oom", "a") as handle:
                handle.write(f"{batch.shape[0]}\n")
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {batch.shape[0]} MiB (injected)")
        return super().predict(batch)


def _broken_here(mode: str) -> bool:
    path = Path(os.environ["BATCHINFER_TEST_CONTROL"]) / "broken"
    if not path.exists():
        return False
    wanted, device = path.read_text().split()
    here = threading.current_thread().name
    return wanted == mode and (device == "all" or here.startswith(f"batchinfer-{device}_"))


class BreaksADevice(_Base):
    def load(self, device: torch.device) -> _Base:
        if _broken_here("load"):
            raise RuntimeError("cannot place the weights on this device (injected)")
        return super().load(device)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        if _broken_here("fatal"):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")
        return super().predict(batch)


def wrong_device() -> WrongDevice:
    return WrongDevice()


def out_of_memory() -> OutOfMemory:
    return OutOfMemory()


def breaks_a_device() -> BreaksADevice:
    return BreaksADevice()
