"""The flow's parameters, grouped as the Prefect UI shows them: input, model, compute, output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from batchinfer.config import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_ROWS, RunConfig, make_config


class InputParams(BaseModel):
    """Where the rows come from and which columns matter."""

    uri: str = Field(description="Folder, glob or file of Parquet partitions: a local path or s3://bucket/prefix.")
    key_column: str = Field(default="id", description="Column that identifies each row; must be unique.")
    features: list[str] | None = Field(
        default=None, description="Feature columns (names or globs such as 'f*'). Default: the checkpoint's names."
    )
    text_column: str | None = Field(default=None, description="Text column, for text models such as minilm.")
    passthrough: list[str] = Field(default_factory=list, description="Input columns copied unchanged to the output.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description='fsspec/s3fs options such as {"client_kwargs": {"endpoint_url": ...}}. '
        "Prefer credentials from the worker's environment.",
    )


class ModelParams(BaseModel):
    """Which model scores the rows."""

    model: str = Field(
        description="'mlp', 'minilm', a '.pt' (TorchScript) or '.pt2' (torch.export) file, or 'package.module:factory'."
    )
    checkpoint: str | None = Field(default=None, description="Safetensors checkpoint URI (needed by 'mlp').")
    precision: Literal["fp32", "bf16", "fp16", "int8"] = Field(
        default="fp32", description="fp32, bf16/fp16 autocast, or int8 dynamic quantisation (CPU)."
    )


class ComputeParams(BaseModel):
    """How the work is spread over devices."""

    devices: str = Field(
        default="auto", description="'auto' (every GPU, else the CPU), a count, 'cpu', or 'cuda:0,cuda:2'."
    )
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE, ge=0, description="Rows per forward pass (0 = largest that fits)."
    )
    shard_rows: int = Field(default=DEFAULT_SHARD_ROWS, ge=1, description="Target rows per shard (whole row groups).")
    cpu_threads: int | None = Field(
        default=None, ge=1, description="Torch threads per CPU device (default: all cores)."
    )
    concurrency_tag: str = Field(
        default="gpu", description="Prefect tag whose concurrency limit is set to the device count."
    )


class OutputParams(BaseModel):
    """Where results go and what counts as success."""

    uri: str = Field(description="Output folder: local path or s3://bucket/prefix.")
    overwrite: bool = Field(default=False, description="Replace an output that holds a run with another configuration.")
    min_success_ratio: float = Field(default=1.0, ge=0.0, le=1.0, description="Share of shards that must succeed.")
    max_error_ratio: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Share of a shard's rows allowed to fail scoring."
    )


def to_config(input: InputParams, model: ModelParams, output: OutputParams, compute: ComputeParams) -> RunConfig:
    return make_config(
        input_uri=input.uri,
        key_column=input.key_column,
        features=input.features,
        text_column=input.text_column,
        passthrough=input.passthrough,
        storage_options=input.storage_options,
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
            storage_options=dict(config.storage_options),
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
