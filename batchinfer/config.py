"""The run configuration: one typed, validated, frozen object.

Every entry point (CLI, flow parameters, rerun from a manifest) builds a
`RunConfig`; validation happens here, up front, with messages that name the
field and the bad value.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from batchinfer.errors import ConfigError

# Snappy, Parquet's most widely read codec (pyarrow's and Spark's default). Model outputs are distinct floats
# that barely compress: on 1,000,000 rows of 10 probabilities zstd made the file 10% smaller than snappy
# (41.7 MB against 46.6 MB) but took 1.5x as long to write and 2-3x as long to read back, and a run reads
# every shard once more to validate it. Part of the output fingerprint: a rerun never mixes two codecs.
OUTPUT_COMPRESSION = "snappy"

# The columns scoring adds to each output row, beside the key and the passthrough columns.
OUTPUT_COLUMNS = ("prediction", "probabilities", "embedding")

Precision = Literal["fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")

# Per-shard overhead (a Prefect task plus the commit) is about 40 ms, ~1% of a 1,000,000-row MLP shard on two
# CPU cores (BENCHMARKS.md); on a SQLite-backed server the `gpu` tag's slot retries can add ~2 s a shard.
DEFAULT_SHARD_ROWS = 1_000_000
DEFAULT_BATCH_SIZE = 1024

_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "session")
_SECRET_KEYS = {"key", "aws_access_key_id", "access_key", "access_key_id", "client_secret"}


class RunConfig(BaseModel):
    """Everything that defines a batch-inference run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_uri: str = Field(description="Folder, glob or file of Parquet partitions (local path or s3://).")
    output_uri: str = Field(description="Where shards, markers, merged predictions and the manifest go.")
    model: str = Field(
        description="'mlp', 'minilm', a TorchScript '.pt' / torch.export '.pt2' file, or 'package.module:factory'."
    )
    checkpoint: str | None = Field(default=None, description="Checkpoint URI (the 'mlp' model needs one).")
    key_column: str = Field(default="id", description="Column that identifies each row; must be unique.")
    features: list[str] | None = Field(
        default=None, description="Feature columns (names or globs). Default: the names recorded in the checkpoint."
    )
    text_column: str | None = Field(default=None, description="Text column for text models such as 'minilm'.")
    passthrough: list[str] = Field(default_factory=list, description="Input columns copied to the output as they are.")
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE,
        description="Rows per forward pass; 0 = auto: the largest that fits on each GPU (halving on out-of-memory, "
        "remembered per device), the measured best on the CPU.",
    )
    shard_rows: int = Field(default=DEFAULT_SHARD_ROWS, description="Target rows per shard (whole row groups).")
    devices: str = Field(default="auto", description="'auto', a count, 'cpu', or a list such as 'cuda:0,cuda:2'.")
    precision: Precision = Field(
        default="fp32", description="fp32, bf16/fp16 autocast, or int8 dynamic quantisation (CPU)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec/s3fs options, e.g. endpoint and credentials."
    )
    min_success_ratio: float = Field(
        default=1.0, description="Share of shards that must succeed for the run to succeed."
    )
    max_error_ratio: float = Field(
        default=0.0, description="Share of a shard's rows allowed to fail scoring before the shard fails."
    )
    overwrite: bool = Field(default=False, description="Replace an output that holds a run with another configuration.")
    concurrency_tag: str = Field(
        default="gpu",
        description="Tag of the inference task; also the name of the Prefect global concurrency limit set to the device count.",
    )
    cpu_threads: int | None = Field(default=None, description="Torch threads per CPU device (default: all cores).")

    @field_validator("input_uri", "output_uri", "model", "key_column")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be a positive number of rows (or 0 for auto)")
        return value

    @field_validator("shard_rows")
    @classmethod
    def _shard_rows(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be a positive number of rows")
        return value

    @field_validator("min_success_ratio", "max_error_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be between 0 and 1")
        return value

    @field_validator("cpu_threads")
    @classmethod
    def _threads(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("features", "passthrough", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("passthrough")
    @classmethod
    def _passthrough(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Each passthrough column becomes an output column: it may not take the place of another."""
        seen: set[str] = set()
        for name in value:
            if name == info.data.get("key_column"):
                raise ValueError(f"{name!r} is the key column, which every output row holds already")
            if name in OUTPUT_COLUMNS:
                raise ValueError(f"{name!r} is the name of an output column ({', '.join(OUTPUT_COLUMNS)})")
            if name in seen:
                raise ValueError(f"{name!r} is listed twice")
            seen.add(name)
        return value

    @field_validator("storage_options", mode="before")
    @classmethod
    def _parse_options(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            return parse_storage_options(value)
        return value

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-ready data with credentials masked (for manifests, logs, artifacts)."""
        data = self.model_dump(mode="json")
        data["storage_options"] = redact(data["storage_options"])
        return data

    def output_fingerprint(self) -> str:
        """Hash of the settings that shape a shard's output columns besides the model."""
        payload = {"key": self.key_column, "passthrough": list(self.passthrough), "compression": OUTPUT_COMPRESSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def parse_storage_options(text: str) -> dict[str, Any]:
    """Parse `--storage-options` JSON; the error names the problem but never echoes values."""
    text = text.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--storage-options is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return value


def is_secret_key(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_KEYS or any(word in lowered for word in _SECRET_WORDS)


def redact(value: Any) -> Any:
    """Mask values stored under credential-like keys, recursively."""
    if isinstance(value, dict):
        return {k: ("***" if is_secret_key(str(k)) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


# Credentials handed to an orchestrator are swapped for placeholders that only this process can
# swap back, so flow-run parameters stored by the server (and shown in its UI) never hold them.
_HELD_PREFIX = "***held:"
_held: dict[str, Any] = {}
_held_tokens: dict[str, str] = {}


def hold_secrets(value: Any) -> Any:
    """A copy with every credential-like value replaced by a placeholder held in this process."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if is_secret_key(str(k)) and v is not None and not _is_placeholder(v):
                blob = json.dumps(v, sort_keys=True)
                token = _held_tokens.get(blob)
                if token is None:
                    token = f"{_HELD_PREFIX}{secrets.token_hex(8)}"
                    _held_tokens[blob], _held[token] = token, v
                out[k] = token
            else:
                out[k] = hold_secrets(v)
        return out
    if isinstance(value, list):
        return [hold_secrets(v) for v in value]
    return value


def release_secrets(value: Any) -> Any:
    """Undo `hold_secrets`. A placeholder this process does not hold (or a redacted "***") is dropped,
    so the filesystem falls back to the credentials of the environment it runs in."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if _is_placeholder(v):
                if v in _held:
                    out[k] = _held[v]
                continue
            out[k] = release_secrets(v)
        return out
    if isinstance(value, list):
        return [release_secrets(v) for v in value]
    return value


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and (value == "***" or value.startswith(_HELD_PREFIX))


def make_config(**kwargs: Any) -> RunConfig:
    """Build a RunConfig, turning pydantic's errors into one line naming field and value."""
    try:
        return RunConfig(**kwargs)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "config"
        shown = first.get("input")
        if field.startswith("storage_options"):
            shown = "<hidden>"
        message = first["msg"].removeprefix("Value error, ")
        flag = "--" + field.split(".")[0].replace("_", "-")
        raise ConfigError(f"{flag}: {message} (got {shown!r})") from None
