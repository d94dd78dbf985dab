"""The flow's parameters, grouped as the Prefect UI shows them: input, model, compute, output.

Each group is a pydantic model because that is the shape whose descriptions,
bounds and enums survive into the parameter schema Prefect stores for a
deployment (a flat `x: int = Field(3, ge=0)` loses its bound there). With
`enforce_parameter_schema`, the server checks a run's parameters against that
schema when the run is created, so a bad value is refused before any work:
`extra="forbid"` turns a misspelt key into such a refusal too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from batchinfer.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SHARD_ROWS,
    Precision,
    RunConfig,
    hold_secrets,
    make_config,
    release_secrets,
)


class InputParams(BaseModel):
    """Where the rows come from and which columns matter."""

    model_config = ConfigDict(extra="forbid", title="Input")

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
        default=None, title="Text column", description="Text column, for text models such as minilm."
    )
    passthrough: list[str] = Field(
        default_factory=list, title="Passthrough columns", description="Input columns copied unchanged to the output."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        title="Storage options",
        description='fsspec/s3fs options such as {"client_kwargs": {"endpoint_url": ...}}. '
        "Prefer credentials from the worker's environment.",
    )


class ModelParams(BaseModel):
    """Which model scores the rows."""

    model_config = ConfigDict(extra="forbid", title="Model")

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
        description="fp32, bf16/fp16 autocast, or int8 dynamic quantisation (CPU, built-in models).",
    )


class ComputeParams(BaseModel):
    """How the work is spread over devices."""

    model_config = ConfigDict(extra="forbid", title="Compute")

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
        description="Rows per forward pass (0 = let batchinfer choose).",
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
    concurrency_tag: str = Field(
        default="gpu",
        min_length=1,
        title="Concurrency tag",
        description="Tag of the inference task; also the name of the Prefect global concurrency limit set to the device count.",
    )


class OutputParams(BaseModel):
    """Where results go and what counts as success."""

    model_config = ConfigDict(extra="forbid", title="Output")

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


def to_config(input: InputParams, model: ModelParams, output: OutputParams, compute: ComputeParams) -> RunConfig:
    return make_config(
        input_uri=input.uri,
        key_column=input.key_column,
        features=input.features,
        text_column=input.text_column,
        passthrough=input.passthrough,
        storage_options=release_secrets(input.storage_options),
        model=model.model,
        checkpoint=model.checkpoint,
        precision=model.precision,
        devices=compute.devices,
        batch_size=compute.batch_size,
        shard_rows=compute.shard_rows,
        cpu_threads=compute.cpu_threads,
        concurrency_tag=compute.concurrency_tag,
        output_uri=output.uri,
        overwrite=output.overwrite,
        min_success_ratio=output.min_success_ratio,
        max_error_ratio=output.max_error_ratio,
    )


def from_config(config: RunConfig) -> dict[str, Any]:
    """Flow parameters for a config (the CLI and `rerun` call the flow with these)."""
    return {
        "input": InputParams(
            uri=config.input_uri,
            key_column=config.key_column,
            features=config.features,
            text_column=config.text_column,
            passthrough=list(config.passthrough),
            storage_options=hold_secrets(config.storage_options),
        ),
        "model": ModelParams(model=config.model, checkpoint=config.checkpoint, precision=config.precision),
        "compute": ComputeParams(
            devices=config.devices,
            batch_size=config.batch_size,
            shard_rows=config.shard_rows,
            cpu_threads=config.cpu_threads,
            concurrency_tag=config.concurrency_tag,
        ),
        "output": OutputParams(
            uri=config.output_uri,
            overwrite=config.overwrite,
            min_success_ratio=config.min_success_ratio,
            max_error_ratio=config.max_error_ratio,
        ),
    }
