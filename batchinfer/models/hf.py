"""Hugging Face model directories: `hf:PATH`, the `save_pretrained` layout, local or on S3, loaded offline.

What the directory holds decides how it is scored:

- a sequence classifier (`...ForSequenceClassification` in config.json's `architectures`): its logits, read
  by `problem_type` as classifier (softmax), multilabel (sigmoid) or regression; labels from `id2label`.
  Text pairs (`--text-column a,b`) go to it as pairs, for cross-encoders and NLI classifiers;
- a sentence-transformers directory (`modules.json`): its Transformer module's model, pooled as its Pooling
  module says, and unit-normalised when it has a Normalize module;
- any other architecture transformers knows: `AutoModel`'s last hidden state, mean-pooled over the
  attention mask (an embedding, not normalised).

Weights are read from safetensors only, and a model's own code never runs (`trust_remote_code` is never
set): a directory with only pickled weights, or whose config asks for its own code, is refused. Texts are
tokenized in the prefetch thread and truncated to the model's maximum length; the runner sorts each chunk
by token count, so batches carry little padding. A directory on S3 is copied once into a local cache
(named by its files' names, sizes and versions) and loaded from there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchinfer.errors import ModelError
from batchinfer.models.base import (
    LOGIT_KINDS,
    ModelSpec,
    Precisioned,
    Wanted,
    choose_output,
    cut_texts,
    digest,
    quantize_if_asked,
)
from batchinfer.outputs import activation
from batchinfer.storage import Storage, temp_prefix

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
# Older sentence-transformers directories name their pooling modes with one flag each.
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# A tokenizer's model_max_length when its config sets none (transformers' VERY_LARGE_INTEGER).
_UNSET_LENGTH = 1_000_000


@dataclass(frozen=True)
class Layout:
    """What a directory holds, read from its JSON files before any weights are touched."""

    folder: Path  # the local directory (a cached copy of one on S3)
    model_folder: Path  # where config.json and the weights are (a sentence-transformers module may nest them)
    task: str  # "classify" | "sentence-transformers" | "encode"
    config: dict[str, Any]
    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_length: int | None = None  # sentence-transformers' max_seq_length, when it sets one
    lowercase: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


def resolve(spec: str, *, precision: str, storage_options: dict[str, Any], wanted: Wanted = Wanted()) -> ModelSpec:
    uri = spec.removeprefix("hf:").rstrip("/")
    if not uri:
        raise ModelError("--model hf:PATH needs the path of a Hugging Face model directory")
    folder = local_copy(uri, storage_options)
    layout = read_layout(folder, uri)
    output = _output(spec, layout, wanted)
    fingerprint = digest("hf", _folder_digest(str(folder)), precision, layout.task)

    def load(device: torch.device) -> HFPredictor:
        return HFPredictor(local_copy(uri, storage_options), uri, precision, device, output.kind)

    return ModelSpec(
        name=spec,
        input_kind="text",
        output=output,
        fingerprint=fingerprint,
        loader=load,
        describe={"directory": uri, "task": layout.task, "precision": precision, **layout.notes},
        text_pairs=layout.task == "classify",
    )


def _output(spec: str, layout: Layout, wanted: Wanted):
    config = layout.config
    if layout.task == "classify":
        width = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
        problem = config.get("problem_type")
        declared = {
            "single_label_classification": "classifier",
            "multi_label_classification": "multilabel",
            "regression": "regression",
        }.get(problem or "")
        return choose_output(
            spec,
            wanted,
            declared=declared,
            source=f"config.json problem_type {problem!r}",
            default="classifier" if width > 1 else "regression",
            allowed=LOGIT_KINDS,
            labels=_id2label(config, width),
            width=width,
        )
    source = "modules.json" if layout.task == "sentence-transformers" else "config.json (a plain encoder)"
    return choose_output(
        spec,
        wanted,
        declared="embedding",
        source=source,
        allowed=("embedding", "raw"),
        normalized=layout.normalize,
    )


def _id2label(config: dict[str, Any], width: int) -> tuple[str, ...] | None:
    raw = config.get("id2label")
    if not isinstance(raw, dict) or len(raw) != width:
        return None
    try:
        return tuple(str(raw[key]) for key in sorted(raw, key=int))
    except (TypeError, ValueError):
        return None


# -- the directory ---------------------------------------------------------------------------------------------


def read_layout(folder: Path, uri: str) -> Layout:
    """Check the directory (weights, code, architecture) and find what it is; one-line ModelError otherwise."""
    modules = _read_json(folder / "modules.json", uri) if (folder / "modules.json").exists() else None
    model_folder = folder
    pooling: tuple[str, ...] = ("mean",)
    normalize = False
    if modules is not None:
        model_folder, pooling, normalize = _sentence_transformers(folder, modules, uri)
    config_path = model_folder / "config.json"
    if not config_path.exists():
        raise ModelError(f"{_shown(uri, config_path, folder)} is missing: not a save_pretrained directory", uri=uri)
    config = _read_json(config_path, uri)
    _check_weights(model_folder, folder, uri)
    _check_no_code(config, config_path, model_folder, folder, uri)
    architectures = _check_architecture(config, _shown(uri, config_path, folder), uri)
    settings_path = model_folder / "sentence_bert_config.json"
    settings = _read_json(settings_path, uri) if modules is not None and settings_path.exists() else {}
    if modules is not None:
        task = "sentence-transformers"
    elif any(name.endswith("ForSequenceClassification") for name in architectures):
        task = "classify"
    else:
        task = "encode"
    notes: dict[str, Any] = {"architecture": architectures[0] if architectures else config.get("model_type")}
    if task != "classify":
        notes.update(pooling=list(pooling), normalize=normalize)
    return Layout(
        folder=folder,
        model_folder=model_folder,
        task=task,
        config=config,
        pooling=pooling,
        normalize=normalize,
        max_length=int(settings["max_seq_length"]) if settings.get("max_seq_length") else None,
        lowercase=bool(settings.get("do_lower_case", False)),
        notes=notes,
    )


def _shown(uri: str, path: Path, folder: Path) -> str:
    """A file of the directory as the user named it (the S3 URI, not the local cache)."""
    return f"{uri}/{path.relative_to(folder).as_posix()}"


def _read_json(path: Path, uri: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{uri}: {path.name} is not valid JSON ({exc})", uri=uri) from None


def _sentence_transformers(folder: Path, modules: Any, uri: str) -> tuple[Path, tuple[str, ...], bool]:
    """The model folder, pooling modes and normalisation of a sentence-transformers directory."""
    where = f"{uri}/modules.json"
    if not isinstance(modules, list) or not modules:
        raise ModelError(f"{where} does not list the model's modules", uri=uri)
    types = [str(m.get("type", "")) for m in modules]
    for name in types:
        short = name.rsplit(".", 1)[-1]
        if not name.startswith("sentence_transformers.") or short not in SUPPORTED_MODULES:
            raise ModelError(
                f"{where}: module {name!r} is not one batchinfer runs ({', '.join(sorted(SUPPORTED_MODULES))}); "
                "a model's own code never runs",
                uri=uri,
            )
    short = [name.rsplit(".", 1)[-1] for name in types]
    if short[0] != "Transformer" or short.count("Transformer") != 1 or short.count("Pooling") != 1:
        raise ModelError(f"{where}: expected one Transformer module first and one Pooling module", uri=uri)
    model_folder = folder / (modules[0].get("path") or "")
    pooling_entry = modules[short.index("Pooling")]
    pooling_path = folder / (pooling_entry.get("path") or "") / "config.json"
    pooling_config = _read_json(pooling_path, uri) if pooling_path.exists() else {}
    return model_folder, _pooling_modes(pooling_config, uri), "Normalize" in short


def _pooling_modes(config: dict[str, Any], uri: str) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING.items() if config.get(key))
        modes = modes or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ModelError(
            f"{uri}: pooling mode {unknown[0]!r} is not supported ({', '.join(POOLING_MODES)} are)", uri=uri
        )
    return modes


def _check_weights(model_folder: Path, folder: Path, uri: str) -> None:
    names = sorted(p.name for p in model_folder.iterdir() if p.is_file())
    if any(name.endswith(".safetensors") for name in names):
        return
    pickled = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ModelError(
            f"{_shown(uri, model_folder / pickled[0], folder)} holds pickled weights, which can run code when "
            "loaded; batchinfer reads safetensors only (save_pretrained writes model.safetensors)",
            uri=uri,
        )
    where = uri if model_folder == folder else _shown(uri, model_folder, folder)
    raise ModelError(f"{where}: no model.safetensors in the directory", uri=uri)


def _check_no_code(config: dict[str, Any], config_path: Path, model_folder: Path, folder: Path, uri: str) -> None:
    """A config that maps the model (or its tokenizer) to code of its own is refused: models are code."""
    for path, data in (
        (config_path, config),
        (model_folder / "tokenizer_config.json", _read_json(model_folder / "tokenizer_config.json", uri)),
    ):
        mapped = data.get("auto_map") if isinstance(data, dict) else None
        if mapped:
            target = next(iter(mapped.values())) if isinstance(mapped, dict) else mapped
            raise ModelError(
                f"{_shown(uri, path, folder)} asks to run the model's own code (auto_map: {target}); "
                "batchinfer never sets trust_remote_code",
                uri=uri,
            )


def _check_architecture(config: dict[str, Any], where: str, uri: str) -> list[str]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type or model_type not in CONFIG_MAPPING:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not an architecture transformers {transformers.__version__} knows",
            uri=uri,
        )
    architectures = [str(a) for a in config.get("architectures") or []]
    shipped = set(dir(transformers))  # the lazy module's names: hasattr would import the modeling code here
    for name in architectures:
        if name not in shipped:
            raise ModelError(
                f"{where}: architecture {name!r} is not one transformers {transformers.__version__} ships", uri=uri
            )
    return architectures


@functools.cache
def _file_digest(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _folder_digest(folder: str) -> str:
    """The content of every file of the directory (cached per file by size and modification time)."""
    parts = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            stat = path.stat()
            parts.append(
                f"{path.relative_to(folder).as_posix()}={_file_digest(str(path), stat.st_size, stat.st_mtime)}"
            )
    return digest(*parts)


def cache_root() -> Path:
    return Path(os.environ.get("BATCHINFER_CACHE") or Path(tempfile.gettempdir()) / "batchinfer-cache") / "hf"


def local_copy(uri: str, storage_options: dict[str, Any]) -> Path:
    """The directory itself when local; a directory on S3 copied once into the cache (written whole, then
    renamed, so a killed copy is never used)."""
    storage = Storage(uri, storage_options)
    if storage.is_local:
        folder = Path(storage.path(uri))
        if not folder.is_dir():
            raise ModelError(f"--model hf:{uri}: no such directory", uri=uri)
        return folder
    if not storage.exists(uri):
        raise ModelError(f"--model hf:{uri}: nothing found there", uri=uri)
    files = storage.list_files(uri, suffix="")
    if not files:
        raise ModelError(f"--model hf:{uri}: the directory is empty", uri=uri)
    root = uri.rstrip("/") + "/"
    listing = [(f.uri.removeprefix(root), f.size, f.version) for f in files if f.uri.startswith(root)]
    target = cache_root() / digest(uri, json.dumps(listing))
    if target.is_dir():
        return target
    staging = target.with_name(f"{temp_prefix('hf-')}{uuid.uuid4().hex}")  # a killed copy's is removed later
    try:
        for relative, _, _ in listing:
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(storage.read_bytes(root + relative))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same copy first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- the model on a device -------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and load reports off while loading, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class _Tokens:
    """One text's (or pair's) token ids and segment ids; its length is what the runner sorts by."""

    __slots__ = ("ids", "types")

    def __init__(self, ids: list[int], types: list[int] | None) -> None:
        self.ids, self.types = ids, types

    def __len__(self) -> int:
        return len(self.ids)


class HFPredictor:
    """Tokenizes (truncating to the model's maximum length), runs the model, pools or reads its logits."""

    def __init__(self, folder: Path, uri: str, precision: str, device: torch.device, kind: str) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        layout = read_layout(folder, uri)
        self.layout, self.device = layout, device
        self.runner = Precisioned(precision, device)
        self.finish = activation(kind)
        classes = AutoModelForSequenceClassification if layout.task == "classify" else AutoModel
        common = {"local_files_only": True, "trust_remote_code": False}
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(str(layout.model_folder), **common)
            model, info = classes.from_pretrained(
                str(layout.model_folder),
                use_safetensors=True,
                output_loading_info=True,
                dtype=torch.float32,
                **common,
            )
        missing = sorted(info.get("missing_keys") or [])
        if layout.task != "classify":  # an encoder's pooler is not what sentence vectors are pooled from
            missing = [name for name in missing if not name.startswith("pooler.")]
        if missing:
            raise ModelError(
                f"{uri}: the safetensors weights lack {len(missing)} tensor(s) the model needs "
                f"({', '.join(missing[:3])}); they would be random",
                uri=uri,
            )
        model = quantize_if_asked(model.eval().requires_grad_(False), precision, device)
        self.model = model if precision == "int8" else self.runner.module(model)
        self.max_length = _max_length(layout, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.with_types = "token_type_ids" in (self.tokenizer.model_input_names or [])

    def tokenize(self, texts: list[Any]) -> list[_Tokens]:
        """Token ids per text (or (a, b) pair), truncated to the model's maximum length, without padding."""
        if not texts:
            return []
        pairs = isinstance(texts[0], tuple)
        first = cut_texts([t[0] for t in texts] if pairs else list(texts), self.max_length, self._count)
        second = cut_texts([t[1] for t in texts], self.max_length, self._count) if pairs else None
        if self.layout.lowercase:
            first = [t.lower() for t in first]
            second = [t.lower() for t in second] if second is not None else None
        encoded = self.tokenizer(
            first,
            second,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=self.with_types,
        )
        types = encoded.get("token_type_ids") if self.with_types else None
        ids = encoded["input_ids"]
        return [_Tokens(row, types[i] if types is not None else None) for i, row in enumerate(ids)]

    def _count(self, text: str) -> int:
        """A text's tokens, special ones aside, counted up to the maximum length."""
        text = text.lower() if self.layout.lowercase else text
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_length)
        return len(ids["input_ids"])

    def encode_ids(self, rows: list[_Tokens]) -> torch.Tensor:
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        mask = np.arange(int(lengths.max())) < lengths[:, None]
        count = int(lengths.sum())
        tokens = np.full(mask.shape, self.pad_id, dtype=np.int64)
        tokens[mask] = np.fromiter(itertools.chain.from_iterable(r.ids for r in rows), dtype=np.int64, count=count)
        cuda = self.device.type == "cuda"  # without blocking only on CUDA (MPS may read the array later)
        inputs = {
            "input_ids": torch.from_numpy(tokens).to(self.device, non_blocking=cuda),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)).to(self.device, non_blocking=cuda),
        }
        if self.with_types:
            types = np.zeros(mask.shape, dtype=np.int64)
            chained = itertools.chain.from_iterable(r.types or [0] * len(r) for r in rows)
            types[mask] = np.fromiter(chained, dtype=np.int64, count=count)
            inputs["token_type_ids"] = torch.from_numpy(types).to(self.device, non_blocking=cuda)
        out = self.model(**inputs)
        if self.layout.task == "classify":
            return self.finish(out.logits.float())
        hidden = out.last_hidden_state.float()
        pooled = pool(hidden, inputs["attention_mask"], self.layout.pooling)
        if self.layout.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return self.finish(pooled)

    def predict(self, batch: list[Any]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(batch))


def _max_length(layout: Layout, tokenizer: Any) -> int:
    """sentence-transformers' max_seq_length, else the tokenizer's, never past the model's positions."""
    limits = [layout.max_length, getattr(tokenizer, "model_max_length", None)]
    positions = layout.config.get("max_position_embeddings")
    if positions:
        limits.append(int(positions))
    usable = [int(x) for x in limits if x and int(x) < _UNSET_LENGTH]
    return min(usable) if usable else 512


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """Sentence vectors from token vectors [batch, length, hidden] over the attention mask, as
    sentence-transformers' Pooling computes them (several modes are concatenated in order)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            out.append((hidden * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * weights).sum(dim=1) / torch.sqrt(counts))
        elif mode == "lasttoken":
            last = (mask.sum(dim=1) - 1).clamp(min=0)
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return torch.cat(out, dim=-1)
