"""Reading checkpoints safely: safetensors by default, pickles only on explicit opt-in."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from batchinfer.errors import InputError, ModelError
from batchinfer.storage import Storage

ALLOW_PICKLE_ENV = "BATCHINFER_ALLOW_PICKLE"


def read_checkpoint_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    storage = Storage(uri, storage_options)
    try:
        return storage.read_bytes(uri)
    except InputError:
        raise ModelError(f"checkpoint {uri} does not exist", uri=uri) from None


def looks_like_safetensors(data: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON header that fits in the data."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return 0 < size <= len(data) - 8 and data[8:9] == b"{"


def looks_like_pickle(data: bytes) -> bool:
    """torch.save zip archives and raw pickles (protocol 2+ starts with 0x80 and the protocol number).

    A safetensors file whose header length ends in the byte 0x80 starts like a pickle: its header decides.
    """
    if looks_like_safetensors(data):
        return False
    return data[:2] == b"PK" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def parse_safetensors(data: bytes, uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors blob; anything else fails with a clear line."""
    if looks_like_pickle(data):
        if os.environ.get(ALLOW_PICKLE_ENV) == "1":
            return _load_pickle_weights_only(data, uri), {}
        raise ModelError(
            f"checkpoint {uri} is a pickle file; pickles can run code when loaded, so batchinfer refuses them. "
            f"Convert it to safetensors, or set {ALLOW_PICKLE_ENV}=1 to load it with torch.load(weights_only=True)",
            uri=uri,
        )
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError, OSError) as exc:
        raise ModelError(
            f"checkpoint {uri} is not a valid safetensors file (truncated or corrupt: {exc})", uri=uri
        ) from None
    return tensors, dict(header.get("__metadata__") or {})


def _load_pickle_weights_only(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"checkpoint {uri} could not be loaded with weights_only=True: {_unpickler_reason(exc)}", uri=uri
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {uri} does not hold a flat dict of tensors", uri=uri)
    return state


def _unpickler_reason(exc: BaseException) -> str:
    """torch's refusal is a page of advice; keep the line that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0].rstrip(".")
    return lines[0][:300] if lines else type(exc).__name__
