"""Custom models for tests: deterministic, optionally slow or failing, steered by files in a folder.

The folder is named by the environment variable BATCHINFER_TEST_CONTROL. Files in it:
- `sleep`: seconds to sleep per predict call;
- `fail`: "KIND LO HI [once]": raise when a batch holds an id in [LO, HI); KIND is `value`
  (deterministic, ValueError) or `connection` (transient, ConnectionError); `once` deletes the file first;
- `nan`: "LO HI": return NaN for ids in [LO, HI);
- `loads`: one line appended per load(device), naming the device;
- `calls`: one line appended per predict call that raised;
- `threads`: if present, one line appended per load and predict call, naming the calling thread;
- `die`: "LO HI": SIGKILL this process when a batch holds an id in [LO, HI); the file is deleted first, so
  only one process dies;
- `visible`: if present, one line appended per predict call: the pid and CUDA_VISIBLE_DEVICES.
The first feature is the `id` column, so the model knows which rows it scores.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch

FEATURES = ["id", "f00", "f01", "f02", "f03"]
_lock = threading.Lock()


def _control() -> Path:
    return Path(os.environ["BATCHINFER_TEST_CONTROL"])


def _append(name: str, line: str) -> None:
    with _lock, open(_control() / name, "a") as handle:
        handle.write(line + "\n")


class ControlledModel:
    input_kind = "features"
    output_kind = "classifier"
    feature_names = FEATURES
    version = "1"

    def load(self, device: torch.device) -> ControlledModel:
        _append("loads", str(device))
        self._record_thread()
        generator = torch.Generator().manual_seed(7)
        self.weight = torch.randn(len(FEATURES) - 1, 3, generator=generator).to(device)
        return self

    def _record_thread(self) -> None:
        if (_control() / "threads").exists():
            _append("threads", str(threading.get_ident()))

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        self._record_thread()
        control = _control()
        ids = batch[:, 0].to(torch.int64)
        sleep = control / "sleep"
        if sleep.exists():
            time.sleep(float(sleep.read_text()))
        visible = control / "visible"
        if visible.exists():
            _append("visible", f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
        die = control / "die"
        if die.exists():
            lo, hi = (int(v) for v in die.read_text().split())
            if bool(((ids >= lo) & (ids < hi)).any()):
                try:
                    die.unlink()
                except FileNotFoundError:  # another process took this death
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
        fail = control / "fail"
        with _lock:
            spec = fail.read_text().split() if fail.exists() else None
            if spec and bool(((ids >= int(spec[1])) & (ids < int(spec[2]))).any()):
                if len(spec) > 3 and spec[3] == "once":
                    fail.unlink()
                with open(control / "calls", "a") as handle:
                    handle.write(f"{spec[0]} {int(ids.min())}\n")
                if spec[0] == "connection":
                    raise ConnectionError("connection reset by peer (injected)")
                raise ValueError(f"injected failure for ids {int(ids.min())}..{int(ids.max())}")
        logits = batch[:, 1:] @ self.weight
        out = torch.softmax(logits, dim=1)
        nan = control / "nan"
        if nan.exists():
            lo, hi = (int(v) for v in nan.read_text().split())
            out[(ids >= lo) & (ids < hi)] = float("nan")
        return out


def factory() -> ControlledModel:
    return ControlledModel()
