"""What differs between the torch releases batchinfer supports, and how device failures are told apart.

Supported: torch >= 2.11, < 2.14 (pyproject.toml says the same; the GPU host runs 2.11, CI 2.13). Every
torch name that a release in that range may lack is looked up here, never at import time elsewhere.

Device failures come in two kinds that need opposite handling:
- out of memory: the batch was too large; halve it and go on (`is_out_of_memory`);
- a fatal device error (an illegal memory access, a device-side assert, ...): the CUDA context of this
  process is broken for good, so the device must take no more work here (`is_fatal_device_error`).
Neither can be told from the type alone: TorchScript re-raises CUDA out-of-memory as a plain
`RuntimeError` with the original message inside its own, and kernels checked by `STD_CUDA_CHECK` raise
`RuntimeError`, not `torch.AcceleratorError`. So the type, the message and the cause are all read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

SUPPORTED_TORCH = ">=2.11,<2.14"
_LOWEST, _BEYOND = (2, 11), (2, 14)

_OOM_MESSAGE = re.compile(
    r"(CUDA|HIP|MPS|XPU|device|accelerator)[^\n]{0,40}out of memory|CUBLAS_STATUS_ALLOC_FAILED",
    re.IGNORECASE,
)
_FATAL_MESSAGE = re.compile(
    r"illegal memory access|illegal instruction|device-side assert|unspecified launch failure|"
    r"uncorrectable ECC error|misaligned address|an illegal address|launch timed out|"
    r"CUDA error: (?!out of memory)|CUBLAS_STATUS_EXECUTION_FAILED|CUDA driver error",
    re.IGNORECASE,
)


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of torch's version string ('2.11.0+cu130' -> (2, 11))."""
    match = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def torch_supported(version: str | None = None) -> bool:
    return _LOWEST <= torch_version(version) < _BEYOND


def _types(*names: str) -> tuple[type[BaseException], ...]:
    found = []
    for name in names:
        owner: Any = torch
        for part in name.split("."):
            owner = getattr(owner, part, None)
        if isinstance(owner, type) and issubclass(owner, BaseException):
            found.append(owner)
    return tuple(found)


def out_of_memory_types() -> tuple[type[BaseException], ...]:
    """torch.OutOfMemoryError and its older CUDA-only name, where the running torch has them."""
    return _types("OutOfMemoryError", "cuda.OutOfMemoryError")


def accelerator_error_types() -> tuple[type[BaseException], ...]:
    """torch.AcceleratorError (what CUDA errors raise since torch 2.8), where the running torch has it."""
    return _types("AcceleratorError")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts (TorchScript and wrappers raise from the original)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the device ran out of memory."""
    oom = out_of_memory_types()
    for link in _chain(exc):
        if oom and isinstance(link, oom):
            return True
        if isinstance(link, Exception) and _OOM_MESSAGE.search(str(link)):  # torch.jit.Error is no RuntimeError
            return True
    return False


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a device error after which this process cannot use the device."""
    if is_out_of_memory(exc):
        return False
    fatal = accelerator_error_types()
    for link in _chain(exc):
        if fatal and isinstance(link, fatal):
            return True
        if isinstance(link, Exception) and _FATAL_MESSAGE.search(str(link)):
            return True
    return False


def move_program_to(program: Any, device: torch.device) -> Any:
    """An exported program whose weights and graph-made tensors (`torch.zeros(..., device=...)` recorded at
    export) all live on `device`: torch.export's `move_to_device_pass`, on every device, the CPU too."""
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device)
