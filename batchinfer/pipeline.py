"""The run, without orchestration: prepare a plan, score shards, merge and validate.

`flows/` calls these functions through thin Prefect tasks; `run_local` calls
them directly (used by benchmarks and as a reference for the flow).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from batchinfer import devices, faults, progress
from batchinfer.config import RunConfig, text_columns
from batchinfer.devices import (
    Device,
    configure_threads,
    discover,
    engine_assigned,
    freeze_imports,
    tune_malloc,
)
from batchinfer.errors import (
    BatchInferError,
    ConfigError,
    InputError,
    ModelError,
    OutputConflictError,
    SchemaError,
)
from batchinfer.layout import Layout
from batchinfer.models.base import ModelSpec, digest, resolve_model
from batchinfer.models.hf import cache_root as hf_cache
from batchinfer.outputs import OutputSpec
from batchinfer.planning import (
    KnownFooters,
    Partition,
    Shard,
    array_width,
    check_schemas,
    list_partitions,
    plan_shards,
    resolve_columns,
    schema_digest,
)
from batchinfer.runner import ShardSettings, ShardStats, is_done, read_marker, score_shard
from batchinfer.storage import IO_THREADS, Storage, remove_orphaned_temps

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Models that are files (or, with hf:, directories): on a cluster every worker must reach them too.
MODEL_FILE_SUFFIXES = (".pt", ".pt2", ".ts", ".torchscript", ".onnx")


@dataclass
class Plan:
    """Everything a run decided before scoring: partitions, shards, settings, what is already done."""

    config: RunConfig
    partitions: list[Partition]
    shards: list[Shard]
    settings: ShardSettings
    devices: list[Device]
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    previous: dict[str, Any] = field(default_factory=dict)  # the manifest of this output's run of this config
    key_ranges: dict[str, Any] = field(default_factory=dict)  # per partition, once its keys passed check_keys

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.shard_id not in self.done]

    @property
    def total_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


@functools.lru_cache(maxsize=8)
def _cached_spec(
    model: str,
    checkpoint: str | None,
    precision: str,
    features: tuple[str, ...] | None,
    text_column: str | None,
    options_json: str,
    output_kind: str | None = None,
    labels: tuple[str, ...] | None = None,
) -> ModelSpec:
    return resolve_model(
        model,
        checkpoint=checkpoint,
        precision=precision,
        features=list(features) if features else None,
        text_column=text_column,
        storage_options=json.loads(options_json),
        output_kind=output_kind,
        labels=list(labels) if labels else None,
    )


def model_spec(config: RunConfig) -> ModelSpec:
    """The resolved model for a config (cached per process: tasks reuse the driver's)."""
    return _cached_spec(
        config.model.model,
        config.model.checkpoint,
        config.model.precision,
        tuple(config.input.features) if config.input.features else None,
        config.input.text_column,
        json.dumps(config.input.storage_options, sort_keys=True),
        config.model.output_kind,
        tuple(config.model.labels) if config.model.labels else None,
    )


def output_spec(config: RunConfig, spec: ModelSpec) -> OutputSpec:
    """What the output rows hold: the model's kind and labels, with the run's threshold, and its outputs per
    row when the model declares them or they were found once the columns were resolved."""
    probed = set(spec.widths.values())
    width = spec.output.width if spec.output.width is not None else (probed.pop() if len(probed) == 1 else None)
    return dataclasses.replace(spec.output, threshold=config.model.threshold, width=width)


def _norm(uri: str) -> str:
    uri = uri[len("file://") :] if uri.startswith("file://") else uri
    if "://" not in uri:
        uri = posixpath.abspath(uri)
    return uri.rstrip("/")


def _real(uri: str) -> str:
    """Where a URI really points: local paths with every symbolic link followed (up to any glob)."""
    uri = _norm(uri)
    if "://" in uri:
        return uri
    cut = min((uri.index(ch) for ch in "*?[" if ch in uri), default=len(uri))
    root = uri if cut == len(uri) else uri[:cut].rsplit("/", 1)[0]
    return (os.path.realpath(root or "/") + uri[len(root) :]).rstrip("/") or "/"


def check_locations(config: RunConfig) -> None:
    """The output must not be, or lie inside, the input (and vice versa), symbolic links followed; a local
    output must be a folder or a place where one can be made."""
    _check_output_folder(config.output.uri)
    src, dst = _real(config.input.uri), _real(config.output.uri)
    src_root = src.split("*", 1)[0].rstrip("/")
    if dst == src_root or dst.startswith(src_root + "/"):
        raise OutputConflictError(
            f"--output {config.output.uri} is inside --input {config.input.uri}; pick another output"
        )
    if src_root.startswith(dst + "/"):
        raise OutputConflictError(
            f"--input {config.input.uri} is inside --output {config.output.uri}; pick another output"
        )


def check_shared_storage(config: RunConfig) -> None:
    """With a cluster given by address, every worker must reach the input, the output and the checkpoint.

    A plain local path names this machine's disk; `file:///...` says the path is mounted at the same place
    on every worker, and is taken at its word.
    """
    if not config.compute.remote:
        return
    where = f"--engine {config.compute.engine} runs shards on the cluster at {config.compute.engine_address}"
    model = config.model.model
    model_file = model.removeprefix("hf:") if model.startswith("hf:") or model.endswith(MODEL_FILE_SUFFIXES) else None
    for flag, uri in (
        ("--input", config.input.uri),
        ("--output", config.output.uri),
        ("--checkpoint", config.model.checkpoint),
        ("--model", model_file),
    ):
        if uri and "://" not in uri:
            raise ConfigError(
                f"{flag} {uri} is a local path, but {where}: use storage every worker sees (s3://...), "
                f"or file://{posixpath.abspath(uri)} if every worker mounts it at that path"
            )


def _check_output_folder(uri: str) -> None:
    path = _norm(uri)
    if "://" in path:
        return
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(
            f"--output {uri} is a symbolic link to {os.readlink(path)}, which does not exist; "
            f"create that folder or pick another output"
        )
    probe = path
    while probe and not os.path.lexists(probe):
        probe = posixpath.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise ConfigError(f"--output {uri}: {probe} is a file, not a folder; pick another output")


# Whoever runs a worker or `batchinfer serve` can restrict what runs may point at (flow-run parameters
# come from anyone who can start a run in the UI): comma-separated prefixes in these variables.
ALLOWED_ENV = {
    "input": "BATCHINFER_ALLOWED_INPUT",
    "output": "BATCHINFER_ALLOWED_OUTPUT",
    "model": "BATCHINFER_ALLOWED_MODEL",
}
BUILT_IN_MODELS = ("mlp", "minilm")


def runs_model_code(model: str) -> bool:
    """Whether resolving `model` imports, loads or runs code of the model: all but the built-in models and
    `hf:` directories, which are read as tensors and configuration."""
    return not (model in BUILT_IN_MODELS or model.startswith("hf:"))


def allowed_prefixes(kind: str) -> list[str] | None:
    """The prefixes set for `kind` (input, output, model), or None when no restriction is set."""
    value = os.environ.get(ALLOWED_ENV[kind])
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _under(uri: str, prefix: str, kind: str) -> bool:
    """Whether `uri` lies at or under `prefix`: whole path segments, symbolic links and `..` resolved. For
    models a prefix may also be a built-in name or a module prefix ending in '.' or ':'."""
    if kind == "model" and "/" not in prefix:
        return uri.startswith(prefix) if prefix.endswith((".", ":")) else uri == prefix
    target, base = _real(uri), _real(prefix)
    if "://" in target and ("/../" in target + "/" or "/./" in target + "/"):
        return False  # object keys are literal: never let dots climb out of a prefix
    return target == base or target.startswith(base.rstrip("/") + "/")


def check_allowed(config: RunConfig) -> None:
    """Refuse a run that points outside the prefixes set by BATCHINFER_ALLOWED_INPUT/OUTPUT/MODEL."""
    checks = [
        ("input", "--input", config.input.uri),
        ("output", "--output", config.output.uri),
        ("model", "--model", config.model.model),
    ]
    if config.model.checkpoint:
        checks.append(("model", "--checkpoint", config.model.checkpoint))
    for kind, name, value in checks:
        prefixes = allowed_prefixes(kind)
        if prefixes is None or any(_under(value, prefix, kind) for prefix in prefixes):
            continue
        shown = ", ".join(prefixes) or "nothing"
        raise ConfigError(f"{name} {value} is not allowed here ({ALLOWED_ENV[kind]} allows {shown})")


def check_targets(config: RunConfig) -> None:
    """What a run may read and write, before it touches anything (the output's lock included): the allowed
    prefixes, and an output apart from the input."""
    check_allowed(config)
    check_locations(config)


def resolve_inputs(config: RunConfig, spec: ModelSpec, first: Partition) -> tuple[list[str], str | None]:
    """Which columns feed the model: feature names (by name, never position) or the text column(s)."""
    if spec.input_kind == "text":
        texts = text_columns(config.input.text_column)
        if not texts:
            raise ConfigError(f"--model {config.model.model} reads text: give --text-column NAME")
        if len(texts) == 2 and not spec.text_pairs:
            raise ConfigError(
                f"--model {config.model.model} reads one text column; --text-column names two "
                f"({', '.join(texts)}), which only text-pair models (cross-encoders, NLI classifiers) take"
            )
        return [], config.input.text_column
    if config.input.text_column and not config.input.features and not spec.feature_names and not spec.named_inputs:
        raise ConfigError(f"--model {config.model.model} reads numeric features, not text: give --features")
    features = config.input.features
    if not features and spec.named_inputs:
        missing = [name for name in spec.named_inputs if name not in first.schema]
        if missing:
            raise ModelError(
                f"{spec.describe.get('file', spec.name)}: input {missing[0]!r} matches no column of {first.uri} "
                f"(give --features, or name the inputs after the columns)",
                uri=first.uri,
            )
        features = list(spec.named_inputs)
    if features:
        names = resolve_columns(features, first)
        width = array_width(first.schema.get(names[0], "")) if len(names) == 1 else None
        if width:  # all features in one fixed-size-list column, in the model's order
            if spec.feature_names and width != len(spec.feature_names):
                raise ModelError(
                    f"the model takes {len(spec.feature_names)} features but column {names[0]!r} holds {width} per row"
                )
            if spec.accepts:
                spec.accepts(width)
            return names, None
        if spec.feature_names and list(spec.feature_names) != names:
            if len(names) != len(spec.feature_names):
                raise ModelError(
                    f"the model takes {len(spec.feature_names)} features but --features names {len(names)}"
                )
            if sorted(names) != sorted(spec.feature_names):
                missing = next(n for n in spec.feature_names if n not in names)
                raise SchemaError(f"--features does not include {missing!r}, which the model expects")
            names = list(spec.feature_names)  # matched by name: the checkpoint's order wins
        if spec.accepts:
            spec.accepts(len(names))
        return names, None
    if spec.feature_names:
        return list(spec.feature_names), None
    raise ConfigError(f"--model {config.model.model} does not record its feature names: give --features")


KeyRange = list[Any] | None  # [min, max] of a partition's keys, or None where keys are not ordered here

_KEYS_CHECKED: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, KeyRange]] = {}


def check_keys_once(
    storage: Storage, partitions: list[Partition], key_column: str, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, KeyRange]:
    """`check_keys`, skipped when this process already passed the same partitions (same fingerprints).

    `batchinfer run` checks keys before Prefect starts and the flow's plan task checks them again;
    in one process the second pass would read every key a second time for nothing.
    """
    identity = (key_column, tuple((p.uri, p.fingerprint) for p in partitions))
    if identity in _KEYS_CHECKED:
        return _KEYS_CHECKED[identity]
    ranges = check_keys(storage, partitions, key_column, known)
    if len(_KEYS_CHECKED) > 64:  # a long-lived worker sees many inputs; keep the memory bounded
        _KEYS_CHECKED.clear()
    _KEYS_CHECKED[identity] = ranges
    return ranges


def key_index(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The partitions an earlier run of this output checked together, by URI: fingerprint and key range.

    Its manifest records them only once their keys passed `check_keys` as one set (`Plan.key_ranges`).
    """
    return {
        entry["uri"]: entry
        for entry in manifest.get("partitions") or []
        if isinstance(entry, dict) and "keys" in entry and entry.get("uri") and entry.get("fingerprint")
    }


def _key_range(keys: pl.Series) -> KeyRange:
    if not len(keys) or not (keys.dtype.is_integer() or keys.dtype == pl.String):
        return None
    return [keys.min(), keys.max()]


def _overlap(a: KeyRange, b: KeyRange) -> bool:
    if a is None or b is None:
        return True
    try:
        return bool(a[0] <= b[1] and b[0] <= a[1])
    except TypeError:  # keys of another type than recorded: the exact check decides
        return True


def check_keys(
    storage: Storage, partitions: list[Partition], key_column: str, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, KeyRange]:
    """Keys must be non-null and unique within and across partitions; return each partition's key range.

    `known` holds partitions an earlier run checked together (`key_index`): those whose fingerprint is
    unchanged are not read again. Only the new or changed partitions are read, and of the known ones only
    those whose key range overlaps a new one's take part in the exact check (8 bytes a row, sorted).
    Integer keys in strictly increasing or decreasing order within each partition, in ranges that
    overlap nowhere, are unique as they are: no sort.
    """
    known = known or {}
    ranges: dict[str, KeyRange] = {}
    fresh: list[Partition] = []
    for part in partitions:
        entry = known.get(part.uri)
        if entry and entry.get("fingerprint") == part.fingerprint:
            ranges[part.uri] = entry.get("keys")
        elif part.num_rows:
            fresh.append(part)
        else:
            ranges[part.uri] = None
    if not fresh:
        return ranges
    hashes: list[np.ndarray | pl.Series] = []  # integer keys wait as they are: the order check may spare the hash
    monotonic = True
    for part, keys in _key_columns(storage, fresh, key_column):
        if keys.null_count():
            row = int(keys.is_null().arg_max())
            raise SchemaError(
                f"key column {key_column!r} has {keys.null_count()} null value(s) in {part.uri} (first at row {row})",
                uri=part.uri,
            )
        ranges[part.uri] = _key_range(keys)
        monotonic = monotonic and _strictly_monotonic(keys)
        hashes.append(keys if monotonic else keys.hash(seed=0).to_numpy())
    fresh_uris = {p.uri for p in fresh}
    involved = [
        p
        for p in partitions
        if p.uri not in fresh_uris and p.num_rows and any(_overlap(ranges[p.uri], ranges[f.uri]) for f in fresh)
    ]
    if monotonic and not involved and _disjoint([ranges[p.uri] for p in fresh]):
        return ranges  # integer keys in order within each partition, ranges apart: unique without a sort
    hashes = [h.hash(seed=0).to_numpy() if isinstance(h, pl.Series) else h for h in hashes]
    for part in involved:
        hashes.append(_read_column(storage, part.uri, key_column).hash(seed=0).to_numpy())
    involved_uris = {p.uri for p in involved}
    checked = [p for p in partitions if p.uri in fresh_uris or p.uri in involved_uris]
    _check_unique(storage, checked, key_column, np.concatenate(hashes))
    return ranges


def _key_columns(
    storage: Storage, partitions: list[Partition], key_column: str
) -> Iterator[tuple[Partition, pl.Series]]:
    """Each partition's key column, in order; on object stores a few read at once (`Storage.map`)."""
    for at in range(0, len(partitions), IO_THREADS):
        batch = partitions[at : at + IO_THREADS]
        yield from zip(batch, storage.map(lambda p: _read_column(storage, p.uri, key_column), batch), strict=True)


def _strictly_monotonic(keys: pl.Series) -> bool:
    """Integer keys each above (or each below) the one before: no two equal."""
    if not keys.dtype.is_integer() or len(keys) < 2:
        return keys.dtype.is_integer()
    values = keys.to_numpy()
    return bool(np.all(values[1:] > values[:-1]) or np.all(values[1:] < values[:-1]))


def _disjoint(ranges: list[KeyRange]) -> bool:
    """No two [min, max] ranges share a value (every range known)."""
    if any(r is None for r in ranges):
        return False
    ordered = sorted(ranges, key=lambda r: r[0])  # type: ignore[index]
    return all(b[0] > a[1] for a, b in zip(ordered, ordered[1:], strict=False))  # type: ignore[index]


def _check_unique(storage: Storage, partitions: list[Partition], key_column: str, hashes: np.ndarray) -> None:
    """Equal hashes are confirmed with the real values (a 64-bit collision is possible, just unlikely)."""
    hashes = pl.Series(hashes).sort().to_numpy()  # polars sorts on every core, numpy on one
    equal = np.flatnonzero(hashes[1:] == hashes[:-1])
    if len(equal) == 0:
        return
    suspects = np.unique(hashes[equal])
    del hashes
    seen: dict[Any, str] = {}
    for part in partitions:
        if not part.num_rows:
            continue
        keys = _read_column(storage, part.uri, key_column)
        mask = np.isin(keys.hash(seed=0).to_numpy(), suspects)
        for value in keys.filter(pl.Series(mask)).to_list():
            identity = _key_identity(value)
            if identity in seen:
                where = f"twice in {part.uri}" if seen[identity] == part.uri else f"in {seen[identity]} and {part.uri}"
                raise SchemaError(f"key column {key_column!r} is not unique: {value!r} appears {where}", uri=part.uri)
            seen[identity] = part.uri


_NAN = ("nan",)


def _key_identity(value: Any) -> Any:
    """A key as uniqueness sees it: NaN equals NaN (as it does for the hash and for every join), -0.0 is 0.0."""
    if isinstance(value, float):
        return _NAN if math.isnan(value) else value + 0.0
    return value


def _read_column(storage: Storage, uri: str, column: str, row_groups: range | None = None) -> pl.Series:
    try:
        with storage.open(uri) as handle:
            parquet = pq.ParquetFile(handle)
            table = (
                parquet.read_row_groups(row_groups, columns=[column])
                if row_groups is not None
                else parquet.read(columns=[column])
            )
    except BatchInferError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{uri} is corrupt or unreadable ({first})", uri=uri) from exc
    return pl.from_arrow(table.column(0)).alias(column)  # type: ignore[union-attr]


def recorded_input(manifest: dict[str, Any]) -> str:
    """The input URI a manifest records (nested since the config has groups; flat before)."""
    recorded = manifest.get("config") or {}
    return (recorded.get("input") or {}).get("uri") or recorded.get("input_uri") or ""


def read_manifest(storage: Storage, layout: Layout) -> dict[str, Any] | None:
    """The output's manifest; None when there is none, {} when it cannot be read."""
    if not storage.exists(layout.manifest):
        return None
    try:
        manifest = storage.read_json(layout.manifest)
    except BatchInferError:
        return {}
    return manifest if isinstance(manifest, dict) else {}


def same_run(manifest: dict[str, Any], config: RunConfig, model_fingerprint: str) -> bool:
    """The manifest records a run with this model, these output columns and this input."""
    return (
        manifest.get("model_fingerprint") == model_fingerprint
        and manifest.get("output_fingerprint") == config.output_fingerprint()
        and _norm(recorded_input(manifest)) == _norm(config.input.uri)
    )


_UNREAD: Any = object()


def check_output(
    storage: Storage, config: RunConfig, model_fingerprint: str, manifest: Any = _UNREAD
) -> dict[str, Any]:
    """Refuse an output that holds a run with another configuration, unless asked to overwrite.

    Returns the manifest of the earlier run of this configuration there ({} when there is none).
    `manifest`: the output's manifest as just read (`read_manifest`), to spare reading it again.
    """
    layout = Layout(config.output.uri)
    if manifest is _UNREAD:
        manifest = read_manifest(storage, layout)
    if manifest is None:
        return {}
    if same_run(manifest, config, model_fingerprint):
        return manifest
    if not config.output.overwrite:
        raise OutputConflictError(
            f"--output {config.output.uri} holds a run with another configuration "
            f"(model, batch size, columns or input differ); use --overwrite to replace it or pick a new output"
        )
    log.warning("overwriting the earlier run in %s", config.output.uri)
    for folder in (layout.shards_dir, layout.markers_dir, layout.errors_dir, layout.predictions_dir):
        storage.remove(folder, recursive=True)
    storage.remove(layout.manifest)
    storage.remove(layout.success)
    return {}


def prepare(
    config: RunConfig, *, check_existing: bool = True, run_model: bool = True, run_id: str | None = None
) -> Plan:
    """Validate everything that can be known up front and decide which shards need work.

    With `run_model=False` (`batchinfer plan`) a model that is code (TorchScript, torch.export, ONNX, a
    `module:factory`) is neither imported, loaded nor run: the columns are checked as the flags name them.
    """
    tune_malloc()
    config = config.dated()
    check_targets(config)
    check_shared_storage(config)
    # A cluster given by address places shards on its own machines; their devices are found there.
    devices = [] if config.compute.remote else discover(config.compute.devices)
    spec = model_spec(config) if run_model or not runs_model_code(config.model.model) else None
    in_storage = Storage(config.input.uri, config.input.storage_options)
    out = Storage(config.output.uri, config.input.storage_options)
    earlier = _earlier_manifest(out, config)
    partitions = list_partitions(
        in_storage,
        config.input.uri,
        partitions=config.input.partitions,
        partition_types=config.input.partition_types,
        known=KnownFooters.from_manifest(earlier),
    )
    if spec is None:
        features, text_column = declared_inputs(config, partitions[0])
    else:
        features, text_column = resolve_inputs(config, spec, partitions[0])
    check_schemas(
        partitions,
        key_column=config.input.key_column,
        features=features,
        text_columns=text_columns(text_column),
        passthrough=list(config.input.passthrough),
        partition_types=config.input.partition_types,
    )
    shards = plan_shards(partitions, config.compute.shard_rows)
    output = output_spec(config, spec) if spec else OutputSpec()
    fingerprint = spec.fingerprint if spec else "not loaded"
    model_fingerprint = digest(fingerprint, json.dumps([features, text_column, output.to_dict()]))
    run_id = run_id or uuid.uuid4().hex
    settings = ShardSettings(
        output_uri=config.output.uri.rstrip("/"),
        key_column=config.input.key_column,
        features=tuple(features),
        text_column=text_column,
        passthrough=tuple(config.input.passthrough),
        batch_size=config.compute.batch_size,  # 0 = auto: the runner picks per device (runner.batch_size_for)
        max_error_ratio=config.output.max_error_ratio,
        model_fingerprint=model_fingerprint,
        output_fingerprint=config.output_fingerprint(),
        storage_options=config.input.storage_options,
        output=output,
        run_id=run_id,
        partition_types=dict(config.input.partition_types),
    )
    plan = Plan(config, partitions, shards, settings, devices, run_id=run_id)
    if earlier and same_run(earlier, config, model_fingerprint):
        plan.previous = earlier
    if check_existing:
        plan.previous = check_output(out, config, model_fingerprint, earlier)
        plan.key_ranges = check_keys_once(in_storage, partitions, config.input.key_column, key_index(plan.previous))
        plan.done = find_done(out, plan)
    return plan


def declared_inputs(config: RunConfig, first: Partition) -> tuple[list[str], str | None]:
    """The model's input columns as the flags name them, for a model whose code must not run."""
    if config.input.features:
        return resolve_columns(config.input.features, first), None
    return [], config.input.text_column


def as_recorded_model(plan: Plan) -> Plan:
    """For `plan --output` without running the model's code: the plan as if its model were the one the
    output's manifest records (the same run otherwise), so that its done shards show as done."""
    out = Storage(plan.settings.output_uri, plan.config.input.storage_options)
    earlier = _earlier_manifest(out, plan.config) or {}
    recorded = earlier.get("model_fingerprint")
    if recorded and same_run(earlier, plan.config, recorded):
        plan.settings = dataclasses.replace(plan.settings, model_fingerprint=recorded)
        plan.previous = earlier
    return plan


def _earlier_manifest(storage: Storage, config: RunConfig) -> dict[str, Any] | None:
    """The output's manifest, if it has a readable one: the footers its run read (`KnownFooters`)."""
    try:
        return read_manifest(storage, Layout(config.output.uri))
    except BatchInferError:  # a missing bucket, say: reported by the checks that need the output
        return None


def find_done(storage: Storage, plan: Plan) -> dict[str, dict[str, Any]]:
    """Markers that prove a planned shard is done with this model and these settings, and whose data is there."""
    layout = Layout(plan.settings.output_uri)
    present = {name.removesuffix(".json") for name in storage.list_names(layout.markers_dir)}
    candidates = [shard for shard in plan.shards if shard.shard_id in present]
    files = set(storage.list_names(layout.shards_dir)) if candidates else set()
    markers = storage.map(lambda s: read_marker(storage, plan.settings.output_uri, s.shard_id), candidates)
    done = {}
    for shard, marker in zip(candidates, markers, strict=True):
        if not is_done(marker, shard, plan.settings):
            continue
        if f"{shard.shard_id}.parquet" not in files:
            log.warning("shard %s has a marker but its file is gone; it is scored again", shard.shard_id)
            continue
        done[shard.shard_id] = marker  # type: ignore[assignment]
    return done


@dataclass
class Change:
    """What a run would do with one shard at an output: skip, score, rescore or remove it."""

    action: str  # skip | score | rescore | remove
    shard_id: str
    partition_uri: str
    rows: int
    why: str


def changes(plan: Plan) -> list[Change]:
    """What a run of this plan would do at its output (`batchinfer plan --output`), shard by shard."""
    storage = Storage(plan.settings.output_uri, plan.config.input.storage_options)
    layout = Layout(plan.settings.output_uri)
    before: dict[str, dict[str, Any]] = {s["shard_id"]: s for s in plan.previous.get("shards") or [] if "shard_id" in s}
    earlier_fingerprints = {s.get("partition_uri"): s.get("partition_fingerprint") for s in before.values()}
    present = {n.removesuffix(".json") for n in storage.list_names(layout.markers_dir) if n.endswith(".json")}
    out: list[Change] = []
    for shard in plan.shards:
        if shard.shard_id in plan.done:
            out.append(Change("skip", shard.shard_id, shard.partition_uri, shard.num_rows, "done"))
        elif earlier_fingerprints.get(shard.partition_uri) not in (None, shard.partition_fingerprint):
            out.append(Change("rescore", shard.shard_id, shard.partition_uri, shard.num_rows, "its input changed"))
        elif shard.shard_id in present:
            out.append(Change("rescore", shard.shard_id, shard.partition_uri, shard.num_rows, "its marker is stale"))
        else:
            out.append(Change("score", shard.shard_id, shard.partition_uri, shard.num_rows, "not scored yet"))
    planned = {s.shard_id for s in plan.shards}
    current = {p.uri for p in plan.partitions}
    for shard_id in sorted(present - planned):
        entry = before.get(shard_id) or (read_marker(storage, plan.settings.output_uri, shard_id) or {}).get("shard")
        entry = entry or {}
        uri = entry.get("partition_uri", "")
        why = "its input changed" if uri in current else "its input is gone"
        out.append(Change("remove", shard_id, uri, int(entry.get("num_rows") or 0), why))
    return out


def rescore(plan: Plan, shard_ids: list[str]) -> list[Shard]:
    """The planned shards `shard_ids`, no longer counted as done: to be scored again in this run."""
    for shard_id in shard_ids:
        plan.done.pop(shard_id, None)
    wanted = set(shard_ids)
    return [s for s in plan.shards if s.shard_id in wanted]


def start_run(plan: Plan) -> None:
    """Before any shard runs: the output is no longer a finished result; record the run; clean temps."""
    devices.resume()  # a process that stopped an earlier run may run again
    faults.point("startup")
    storage = Storage(plan.settings.output_uri, plan.config.input.storage_options)
    layout = Layout(plan.settings.output_uri)
    storage.remove(layout.success)
    for folder in (layout.shards_dir, layout.errors_dir, layout.markers_dir, layout.predictions_dir, layout.root):
        removed = storage.remove_stale_temps(folder, recursive=folder == layout.predictions_dir)
        if removed:
            log.info("removed %d temporary file(s) left in %s by an interrupted attempt", removed, folder)
    orphans = remove_orphaned_temps() + remove_orphaned_temps(str(hf_cache()))
    if orphans:
        log.info("removed %d temporary file(s) that killed processes left in the system's temp folder", orphans)
    write_manifest(storage, layout, manifest(plan, state="running"))
    progress.emit(progress.Event("plan", total_rows=plan.total_rows, total_shards=len(plan.shards)))
    for shard in plan.shards:
        if shard.shard_id in plan.done:
            progress.emit(progress.Event("shard_skipped", shard.shard_id, rows=shard.num_rows))


def run_shard(config: RunConfig, settings: ShardSettings, shard: Shard, *, run: str = "") -> ShardStats:
    """Score one shard on a device of this host that no other shard holds (`devices.hold_device`).

    On Dask or Ray the device is the one the engine gave this worker. A shard whose marker already proves
    it done (an earlier attempt committed it, then its worker died before reporting) is not scored again.
    """
    storage = Storage(settings.output_uri, settings.storage_options)
    marker = read_marker(storage, settings.output_uri, shard.shard_id)
    if is_done(marker, shard, settings) and _intact(storage, settings, shard, marker):  # type: ignore[arg-type]
        log.info("shard %s was committed by an earlier attempt; not scored again", shard.shard_id)
        return ShardStats.from_marker(marker)  # type: ignore[arg-type]
    devices = engine_assigned(discover(config.compute.devices))
    configure_threads(devices, config.compute.cpu_threads)
    freeze_imports()  # a pool's or a cluster's worker process has imported all it needs by its first shard
    return score_shard(shard, settings, model_spec(config), devices, run=run, storage=storage)


def _intact(storage: Storage, settings: ShardSettings, shard: Shard, marker: dict[str, Any]) -> bool:
    """The shard's file is the one its marker records (a marker whose file is gone or changed proves nothing)."""
    uri = Layout(settings.output_uri).shard(shard.shard_id)
    try:
        storage.invalidate(uri)  # s3fs may still list a file deleted since
        return not storage.unchanged(uri, marker["file"], storage.info(uri))
    except BatchInferError:
        return False


def manifest(
    plan: Plan,
    *,
    state: str,
    results: dict[str, dict[str, Any]] | None = None,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    results = results or {}
    shards = []
    for shard in plan.shards:
        entry = {**shard.to_dict()}
        result = results.get(shard.shard_id) or plan.done.get(shard.shard_id)
        if result:
            entry.update({k: result.get(k) for k in ("state", "rows_out", "rows_error", "seconds", "device", "error")})
            if shard.shard_id in plan.done and shard.shard_id not in results:
                entry["state"] = "done"
        else:
            entry["state"] = "pending"
        shards.append(entry)
    return {
        "version": MANIFEST_VERSION,
        "state": state,
        "run_id": plan.run_id,
        "config": plan.config.redacted(),
        "model_fingerprint": plan.settings.model_fingerprint,
        "output_fingerprint": plan.settings.output_fingerprint,
        "features": list(plan.settings.features),
        "text_column": plan.settings.text_column,
        "output": plan.settings.output.to_dict(),
        "partitions": partition_entries(plan),
        "schemas": {_schema_id(p.schema): p.schema for p in plan.partitions},
        "shards": shards,
        "totals": {
            "partitions": len(plan.partitions),
            "shards": len(plan.shards),
            "rows": plan.total_rows,
        },
        "validation": validation,
    }


# Beyond this many shards the manifest is written on one line: indented JSON goes through Python's own encoder,
# slower than the C one (BENCHMARKS.md, "Incremental runs").
MANIFEST_INDENTED_SHARDS = 256


def write_manifest(storage: Storage, layout: Layout, data: dict[str, Any]) -> None:
    indent = 2 if len(data.get("shards") or ()) <= MANIFEST_INDENTED_SHARDS else None
    storage.write_json(layout.manifest, data, indent=indent)


def partition_entries(plan: Plan) -> list[dict[str, Any]]:
    """The manifest's partitions: where each is and what it holds, its key range once checked (the key
    index of the next run) and the record of its merged part (kept from the earlier run while unchanged)."""
    earlier = {e.get("uri"): e for e in plan.previous.get("partitions") or [] if isinstance(e, dict)}
    entries = []
    for part in plan.partitions:
        entry: dict[str, Any] = {
            "uri": part.uri,
            "part": part.part,
            "rows": part.num_rows,
            "row_groups": len(part.row_groups),
            "fingerprint": part.fingerprint,
            # What the footer said, for the next run to skip reading it while the file stays the same.
            "size": part.size,
            "stamp": part.stamp,
            "content": part.content,
            "row_group_rows": list(part.row_groups),
            "schema": _schema_id(part.schema),
        }
        if part.hive:
            entry["hive"] = dict(part.hive)
        if part.uri in plan.key_ranges:
            entry["keys"] = plan.key_ranges[part.uri]
        before = earlier.get(part.uri) or {}
        if before.get("fingerprint") == part.fingerprint and "part_file" in before:
            entry["part_shards"], entry["part_file"] = before.get("part_shards"), before["part_file"]
        entries.append(entry)
    return entries


_SCHEMA_IDS: dict[tuple[tuple[str, str], ...], str] = {}


def _schema_id(schema: dict[str, str]) -> str:
    """A schema's digest; partitions share a few schemas, so each is hashed once."""
    key = tuple(schema.items())
    if key not in _SCHEMA_IDS:
        if len(_SCHEMA_IDS) > 256:
            _SCHEMA_IDS.clear()
        _SCHEMA_IDS[key] = schema_digest(schema)
    return _SCHEMA_IDS[key]
