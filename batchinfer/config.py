"""The run configuration: one schema, declared once, grouped as the Prefect UI form shows it.

`InputConfig`, `ModelConfig`, `ComputeConfig` and `OutputConfig` are the flow's
parameters (their descriptions, bounds and choices become the UI form and the
server-side check of every run), the groups of `RunConfig` that the core and the
tasks take, and the source of the CLI's flags (`cli/`). Validation happens here,
up front, with messages that name the field and the bad value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from batchinfer import partitions as hive
from batchinfer.errors import ConfigError

# Snappy, Parquet's most widely read codec (pyarrow's and Spark's default): the reasons and figures are in
# BENCHMARKS.md. Part of the output fingerprint: a rerun never mixes two codecs.
OUTPUT_COMPRESSION = "snappy"

# What a model's outputs mean, and so which columns they become and which checks they must pass
# (batchinfer/outputs.py holds the table of kinds).
OutputKind = Literal["classifier", "multilabel", "regression", "embedding", "raw"]
OUTPUT_KINDS: tuple[str, ...] = ("classifier", "multilabel", "regression", "embedding", "raw")
# Every column scoring may add to an output row, beside the key and the passthrough columns.
OUTPUT_COLUMNS = ("prediction", "probabilities", "label", "labels", "predictions", "embedding", "output")
DEFAULT_THRESHOLD = 0.5

Precision = Literal["fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
Engine = Literal["local", "processes", "dask", "ray"]
ENGINES: tuple[str, ...] = ("local", "processes", "dask", "ray")
DISTRIBUTED_ENGINES = ("dask", "ray")

# Large enough that a shard's own overhead (a Prefect task plus the commit) stays small (BENCHMARKS.md).
DEFAULT_SHARD_ROWS = 1_000_000
# 0 = auto: on an accelerator the largest batch that fits, on the CPU the measured best (batchinfer.runner).
DEFAULT_BATCH_SIZE = 0

# Storage options are masked by default: only these names are known to hold nothing secret. Their values
# are kept in manifests, logs and the flow's parameters; every other value is a credential until shown not.
_SAFE_OPTIONS = frozenset(
    {
        "anon",
        "endpoint_url",  # kept only without user-info (a password in the URL) or a query string
        "region_name",
        "region",
        "use_ssl",
        "verify",
        "signature_version",
        "addressing_style",
        "max_attempts",
        "mode",
        "connect_timeout",
        "read_timeout",
        "max_pool_connections",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "default_block_size",
        "version_aware",
        "requester_pays",
        "cache_regions",
        "auto_mkdir",
    }
)
# Options that group others: their entries are judged one by one.
_OPTION_GROUPS = frozenset({"client_kwargs", "config_kwargs", "s3", "retries"})
# A value written {"$env": "NAME"} is read from the environment of the process that opens the storage;
# {"$secret": "NAME"} from the Prefect Secret block NAME. Only the names travel, never the values.
ENV_REFERENCE, SECRET_REFERENCE = "$env", "$secret"
_MASK = "***"

_GROUP = ConfigDict(frozen=True, extra="forbid")


def _split(value: Any) -> Any:
    """A comma-separated string as a list (the command line's form of a list)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def text_columns(value: str | None) -> list[str]:
    """The text columns of a `text_column` setting: one name, or two ('a,b') for text pairs."""
    return [part.strip() for part in value.split(",") if part.strip()] if value else []


def _strip(value: str) -> str:
    if not value or not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


_MODEL_FILES = (".pt", ".pt2", ".ts", ".torchscript", ".onnx")


def absolute_uri(uri: str) -> str:
    """A local path as an absolute path (URIs with a scheme unchanged), so a recorded run means the same
    files from any working directory."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


class InputConfig(BaseModel):
    """Where the rows come from and which columns matter."""

    model_config = ConfigDict(**_GROUP, title="Input")

    uri: str = Field(
        min_length=1,
        title="Input URI",
        description="Folder, glob or file of Parquet partitions: a local path or s3://bucket/prefix.",
    )
    key_column: str = Field(
        default="id", min_length=1, title="Key column", description="Column that identifies each row; must be unique."
    )
    features: list[str] | None = Field(
        default=None,
        title="Feature columns",
        description="Feature columns (names or globs such as 'f*'). Empty: the names recorded in the checkpoint.",
    )
    text_column: str | None = Field(
        default=None,
        title="Text column",
        description="Text column, for text models such as minilm; two columns 'a,b' give text pairs "
        "(cross-encoders, NLI classifiers).",
    )
    passthrough: list[str] = Field(
        default_factory=list,
        title="Passthrough columns",
        description="Input columns copied unchanged to the output; partition columns (key=value folders) too.",
    )
    partition_types: dict[str, str] = Field(
        default_factory=dict,
        title="Partition column types",
        description="Types of partition columns (key=value folders), e.g. 'year=int64,date=date32'; "
        "others are strings.",
    )
    partitions: str | None = Field(
        default=None,
        title="Partition filter",
        description="Which key=value folders to score, e.g. 'date>=2026-11-01,country=DE|FR' (all must hold). "
        "{today}, {yesterday} and {today-N} are UTC dates of the run (the scheduled time for scheduled runs).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        title="Storage options",
        description='fsspec/s3fs options as a JSON object, such as {"client_kwargs": {"endpoint_url": ...}}. '
        "Prefer credentials from the worker's environment.",
    )

    @field_validator("uri", "key_column")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return _strip(value)

    @field_validator("uri")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute_uri(value)

    @field_validator("features", "passthrough", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("text_column")
    @classmethod
    def _text_columns(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = text_columns(value)
        if not 1 <= len(names) <= 2 or len(set(names)) != len(names):
            raise ValueError("must name one text column, or two different ones for text pairs ('a,b')")
        return ",".join(names)

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

    @field_validator("partition_types", mode="before")
    @classmethod
    def _parse_types(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            pairs = [part.strip() for part in value.split(",") if part.strip()]
            if not all("=" in pair for pair in pairs):
                raise ValueError("expected NAME=TYPE pairs joined by commas, e.g. 'year=int64,date=date32'")
            return {name.strip(): kind.strip() for name, kind in (pair.split("=", 1) for pair in pairs)}
        return value

    @field_validator("partition_types")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: hive.type_name(kind) for name, kind in value.items()}

    @field_validator("partitions")
    @classmethod
    def _filter(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        hive.parse_filter(value)  # the syntax now; values once dates are filled in
        return value.strip()

    @field_validator("storage_options", mode="before")
    @classmethod
    def _parse_options(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):
            return parse_storage_options(value)
        return value


class ModelConfig(BaseModel):
    """Which model scores the rows."""

    model_config = ConfigDict(**_GROUP, title="Model", protected_namespaces=())

    model: str = Field(
        min_length=1,
        title="Model",
        description="'mlp', 'minilm', a '.pt' (TorchScript) or '.pt2' (torch.export) file, or 'package.module:factory'.",
    )
    checkpoint: str | None = Field(
        default=None, title="Checkpoint", description="Safetensors checkpoint URI (needed by 'mlp')."
    )
    precision: Precision = Field(
        default="fp32",
        title="Precision",
        description="fp32; bf16/fp16 (the weights cast to that type on the device); or int8 dynamic "
        "quantisation (CPU; built-in and Hugging Face models).",
    )
    output_kind: OutputKind | None = Field(
        default=None,
        title="Output kind",
        description="What the model's outputs are: classifier, multilabel, regression, embedding or raw. "
        "Empty: what the model declares (checkpoint metadata, the factory, the Hugging Face config); "
        "exported and ONNX files without that metadata need it.",
    )
    labels: list[str] | None = Field(
        default=None,
        title="Labels",
        description="Class names in output order, for classifier and multilabel outputs. Empty: the names the "
        "model records (checkpoint metadata, a Hugging Face config's id2label).",
    )
    threshold: float = Field(
        default=DEFAULT_THRESHOLD,
        ge=0.0,
        le=1.0,
        title="Threshold",
        description="Multilabel outputs: a label is on when its probability is above this.",
    )

    @field_validator("model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = _strip(value)
        if value.startswith("hf:"):
            return "hf:" + absolute_uri(value.removeprefix("hf:")) if value != "hf:" else value
        return absolute_uri(value) if value.endswith(_MODEL_FILES) else value

    @field_validator("checkpoint")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_uri(value.strip()) if value and value.strip() else value

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            repeated = next(name for name in value if value.count(name) > 1)
            raise ValueError(f"{repeated!r} is listed twice")
        return value or None


class ComputeConfig(BaseModel):
    """How the work is spread over devices."""

    model_config = ConfigDict(**_GROUP, title="Compute")

    devices: str = Field(
        default="auto",
        min_length=1,
        title="Devices",
        description="'auto' (every GPU, else the CPU), a count, 'cpu', or a list such as 'cuda:0,cuda:2'.",
    )
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE,
        ge=0,
        title="Batch size",
        description="Rows per forward pass; 0 = auto (the default): the largest that fits on each GPU (halving on "
        "out-of-memory, remembered per device), the measured best on the CPU (1,024 feature rows, 64 texts).",
    )
    shard_rows: int = Field(
        default=DEFAULT_SHARD_ROWS,
        ge=1,
        title="Rows per shard",
        description="Target rows per shard (whole row groups). A shard is the unit of progress and retry.",
    )
    cpu_threads: int | None = Field(
        default=None, ge=1, title="CPU threads", description="Torch threads per CPU device (empty: all cores)."
    )
    engine: Engine = Field(
        default="local",
        title="Engine",
        description="What runs the shards: 'local' (threads in the flow's process), 'processes' (Prefect's "
        "process pool, one worker process per device), 'dask' or 'ray' (a cluster; each shard asks the engine "
        "for one GPU and runs on the one it is given).",
    )
    engine_address: str | None = Field(
        default=None,
        title="Engine address",
        description="An existing cluster for 'dask' (scheduler address, tcp://host:8786) or 'ray' (ray://host:10001, "
        "or 'auto' on a node of the cluster). Empty: a local cluster with one worker per device.",
    )

    @field_validator("engine_address")
    @classmethod
    def _address(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = (value or "").strip() or None
        if value and info.data.get("engine") not in DISTRIBUTED_ENGINES:
            raise ValueError(f"needs --engine dask or ray (the engine is {info.data.get('engine')!r})")
        return value

    @property
    def remote(self) -> bool:
        """Whether shards run on machines other than this one: a cluster given by address."""
        return self.engine in DISTRIBUTED_ENGINES and self.engine_address is not None


class OutputConfig(BaseModel):
    """Where results go and what counts as success."""

    model_config = ConfigDict(**_GROUP, title="Output")

    uri: str = Field(min_length=1, title="Output URI", description="Output folder: local path or s3://bucket/prefix.")
    overwrite: bool = Field(
        default=False, title="Overwrite", description="Replace an output that holds a run with another configuration."
    )
    min_success_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, title="Min success ratio", description="Share of shards that must succeed."
    )
    max_error_ratio: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        title="Max error ratio",
        description="Share of a shard's rows allowed to fail scoring (they go to errors/).",
    )

    @field_validator("uri")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return absolute_uri(_strip(value))


GROUPS: dict[str, type[BaseModel]] = {
    "input": InputConfig,
    "model": ModelConfig,
    "compute": ComputeConfig,
    "output": OutputConfig,
}


def flat_name(group: str, field: str) -> str:
    """A field's name outside its group: `input_uri`, `output_uri`, else the field's own name."""
    return f"{group}_uri" if field == "uri" else field


def flag(group: str, field: str) -> str:
    """A field's command-line flag: `--input`, `--output`, else `--field-name`."""
    return "--" + (group if field == "uri" else field.replace("_", "-"))


FLAT_FIELDS: dict[str, tuple[str, str]] = {
    flat_name(group, field): (group, field) for group, model in GROUPS.items() for field in model.model_fields
}


class RunConfig(BaseModel):
    """Everything that defines a batch-inference run: the four groups of the flow's parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    input: InputConfig
    model: ModelConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    output: OutputConfig

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-ready data with credentials masked (for manifests, logs, artifacts)."""
        data = self.model_dump(mode="json")
        data["input"]["storage_options"] = redact(data["input"]["storage_options"])
        return data

    def output_fingerprint(self) -> str:
        """Hash of the settings that shape a shard's output bytes besides the model.

        The batch size is one: a model's float results differ in the last bits from one batch size to
        another (which rows share a matrix product), so a rerun never mixes shards scored at two sizes.
        """
        payload: dict[str, Any] = {
            "key": self.input.key_column,
            "passthrough": list(self.input.passthrough),
            "compression": OUTPUT_COMPRESSION,
            "batch_size": self.compute.batch_size,
        }
        types = {k: v for k, v in self.input.partition_types.items() if k in self.input.passthrough}
        if types:  # only when set: outputs made before partition types existed keep their fingerprint
            payload["partition_types"] = types
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.input.storage_options

    def dated(self, when: Any = None) -> RunConfig:
        """The config with `{today}`, `{yesterday}`, `{today-N}` in the URIs and the filter made dates of `when`
        (UTC; now when None). A run records and reruns the dates it was given."""
        fields = {
            "input_uri": self.input.uri,
            "partitions": self.input.partitions,
            "output_uri": self.output.uri,
        }
        changed = {k: hive.expand_dates(v, when) for k, v in fields.items() if hive.has_dates(v)}
        return self.replace(**changed) if changed else self

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (the keyword arguments of `make_config`)."""
        return {name: getattr(getattr(self, g), f) for name, (g, f) in FLAT_FIELDS.items()}

    def replace(self, **flat: Any) -> RunConfig:
        """A copy with some fields changed, by flat name, validated again."""
        return make_config(**{**self.flat(), **flat})

    def parameters(self) -> dict[str, BaseModel]:
        """The flow's parameters for this config, credentials swapped for placeholders (`hold_secrets`)."""
        held = self.input.model_copy(update={"storage_options": hold_secrets(self.input.storage_options)})
        return {"input": held, "model": self.model, "compute": self.compute, "output": self.output}

    @classmethod
    def from_parameters(
        cls, input: InputConfig, model: ModelConfig, compute: ComputeConfig, output: OutputConfig
    ) -> RunConfig:
        """The config a flow run was given, with the credentials this process holds put back."""
        released = input.model_copy(update={"storage_options": release_secrets(input.storage_options)})
        return cls(input=released, model=model, compute=compute, output=output)


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


def is_reference(value: Any) -> bool:
    """A value that names where a secret lives ({"$env": NAME} or {"$secret": NAME}) instead of holding it."""
    return (
        isinstance(value, dict)
        and len(value) == 1
        and next(iter(value)) in (ENV_REFERENCE, SECRET_REFERENCE)
        and isinstance(next(iter(value.values())), str)
    )


def _plain_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return not (parts.username or parts.password or parts.query or "@" in parts.netloc)


def _shown(name: str, value: Any) -> bool:
    """Whether a storage option's value may be stored and shown as it is."""
    if name == "endpoint_url":
        return _plain_url(value)
    return name in _SAFE_OPTIONS


def _masked(options: dict[str, Any], replace: Callable[[str, Any], Any], path: str = "") -> dict[str, Any]:
    """The options with each value not known to be harmless passed through `replace(dotted name, value)`."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        key, dotted = str(name), f"{path}{name}"
        if value is None or is_reference(value) or _is_placeholder(value):
            out[name] = value
        elif key in _OPTION_GROUPS and isinstance(value, dict):
            out[name] = _masked(value, replace, dotted + ".")
        elif _shown(key, value):
            out[name] = value
        else:
            out[name] = replace(dotted, value)
    return out


def redact(options: Any) -> Any:
    """Storage options as they may be written down (manifests, logs, artifacts): every value masked unless
    its name is known to be harmless; references to environment variables and Secret blocks kept."""
    if not isinstance(options, dict):
        return _MASK
    return _masked(options, lambda name, value: _MASK)


def clear_credentials(options: dict[str, Any]) -> list[str]:
    """The dotted names of option values that would be masked: what must not be stored in clear."""
    found: list[str] = []
    _masked(options, lambda name, value: found.append(name))
    return found


_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def scrub(text: str) -> str:
    """A message with any user-info (user:password@) taken out of the URLs it quotes."""
    return _URL_USERINFO.sub("***@", text)


# Credentials handed to an orchestrator are swapped for placeholders that only this process can
# swap back, so flow-run parameters stored by the server (and shown in its UI) never hold them.
_HELD_PREFIX = "***held:"
_held: dict[str, Any] = {}
_held_tokens: dict[str, str] = {}


def _hold(name: str, value: Any) -> str:
    blob = json.dumps(value, sort_keys=True)
    token = _held_tokens.get(blob)
    if token is None:
        token = f"{_HELD_PREFIX}{secrets.token_hex(8)}"
        _held_tokens[blob], _held[token] = token, value
    return token


def hold_secrets(options: Any) -> Any:
    """A copy of the storage options with every value that `redact` masks replaced by a placeholder held
    in this process."""
    if not isinstance(options, dict):
        return options
    return _masked(options, _hold)


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
    return isinstance(value, str) and (value == _MASK or value.startswith(_HELD_PREFIX))


def _from_environment(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"--storage-options names the environment variable {name}, which is not set")
    return value


def _no_secret_blocks(name: str) -> Any:
    raise ConfigError(f"--storage-options names the Prefect Secret block {name!r}, which only a Prefect run can read")


_resolvers: dict[str, Callable[[str], Any]] = {ENV_REFERENCE: _from_environment, SECRET_REFERENCE: _no_secret_blocks}


def register_resolver(kind: str, resolve: Callable[[str], Any]) -> None:
    """How references of `kind` are read in this process (the Prefect layer registers Secret blocks)."""
    _resolvers[kind] = resolve


def uses_secret_blocks(value: Any) -> bool:
    if is_reference(value):
        return SECRET_REFERENCE in value
    if isinstance(value, dict):
        return any(uses_secret_blocks(v) for v in value.values())
    if isinstance(value, list):
        return any(uses_secret_blocks(v) for v in value)
    return False


def resolve_references(value: Any) -> Any:
    """The storage options with each reference replaced by what it names, read in this process."""
    if is_reference(value):
        [(kind, name)] = value.items()
        return _resolvers[kind](name)
    if isinstance(value, dict):
        return {k: resolve_references(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_references(v) for v in value]
    return value


def make_config(**flat: Any) -> RunConfig:
    """Build a RunConfig from fields by flat name (`FLAT_FIELDS`); an error is one line naming the flag and value."""
    groups: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        if name not in FLAT_FIELDS:
            raise ConfigError(f"unknown setting {name!r} (known: {', '.join(FLAT_FIELDS)})")
        group, field = FLAT_FIELDS[name]
        groups.setdefault(group, {})[field] = value
    try:
        return RunConfig(**groups)
    except ValidationError as exc:
        raise config_error(exc) from None


def config_error(exc: ValidationError, *, prefix: tuple[str, ...] = ()) -> ConfigError:
    """pydantic's first error as one line: the flag, what is wrong, and the value (never a credential)."""
    first = exc.errors()[0]
    loc = [*prefix, *(str(p) for p in first["loc"])]
    name = flag(loc[0], loc[1]) if len(loc) > 1 and loc[0] in GROUPS else "--" + (loc[0] if loc else "config")
    shown = "<hidden>" if "storage_options" in loc else first.get("input")
    context = first.get("ctx") or {}
    messages = {
        "greater_than_equal": f"must be at least {context.get('ge')}",
        "less_than_equal": f"must be at most {context.get('le')}",
        "missing": "is required",
    }
    message = messages.get(first["type"], first["msg"].removeprefix("Value error, "))
    if first["type"] == "missing":
        return ConfigError(f"{name}: {message}")
    return ConfigError(f"{name}: {message} (got {shown!r})")
