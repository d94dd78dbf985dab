"""A BERT encoder in plain PyTorch: what the `minilm` model needs of transformers' BertModel, and no more.

Same parameter names as a BERT checkpoint (`embeddings.*`, `encoder.layer.N.*`), so the safetensors file
loads as it is; the pooler is not used (sentence embeddings mean-pool the last hidden state). The point
is start-up: importing transformers and building a BertModel took 2.2 s in a fresh process here, most of
it imports (torch.distributed.tensor, torch._dynamo, sympy) that inference never uses; this module
builds and loads the same weights in about 0.2 s, half of it the random initialisation that the file's
weights then replace. Inference only: no dropout, no gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from batchinfer.errors import ModelError


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Every token is of type 0 (one segment), as the sentence-embedding model is called.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _Output(nn.Module):
    def __init__(self, width: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden)
        self.output = _Output(hidden, hidden, eps)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, width)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, width: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(hidden, eps)
        self.intermediate = _Intermediate(hidden, width)
        self.output = _Output(width, hidden, eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        attn = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x)), keep)
        x = self.attention.output(context.transpose(1, 2).reshape(batch, length, hidden), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, width: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, width, eps) for _ in range(layers))


class BertEncoder(nn.Module):
    """`forward(input_ids, attention_mask)` gives the last hidden state, [batch, length, hidden]."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        if (
            config.get("hidden_act", "gelu") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ModelError(
                f"unsupported BERT variant: hidden_act={config.get('hidden_act')!r}, "
                f"position_embedding_type={config.get('position_embedding_type')!r}"
            )
        hidden, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        self.embeddings = _Embeddings(
            config["vocab_size"], config["max_position_embeddings"], config.get("type_vocab_size", 2), hidden, eps
        )
        self.encoder = _Encoder(
            config["num_hidden_layers"], hidden, config["num_attention_heads"], config["intermediate_size"], eps
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()[:, None, None, :]  # [batch, 1, 1, length]: which keys each query sees
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def load_encoder(folder: Path) -> BertEncoder:
    """The encoder of the BERT checkpoint in `folder` (config.json and model.safetensors)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    # A plain random initialisation, then every parameter replaced by the file's: cheaper than a meta-device
    # context, which imports torch._dynamo.
    model = BertEncoder(config)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("pooler.")}
    state.pop("embeddings.position_ids", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelError(
            f"{folder / 'model.safetensors'} does not match a BERT encoder: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    return model.eval().requires_grad_(False)
