"""The layers hold: cli -> flows -> tasks -> the core, and the core never imports prefect.

The import contracts in pyproject.toml are checked with import-linter over the real tree, and once
over a copy whose core imports prefect inside a function, which the check must refuse. Importing
every core module in a fresh interpreter must leave prefect unloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import ROOT, python_path
from tests.core_helpers import GOOD_MODEL, write_features

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import batchinfer
names = ["batchinfer"] + sorted(m.name for m in pkgutil.walk_packages(batchinfer.__path__, "batchinfer."))
for name in names:
    importlib.import_module(name)
core = sorted(m for m in sys.modules if m.split(".")[0] == "prefect")
import tasks.shards
wrappers = sorted(m for m in sys.modules if m.split(".")[0] == "prefect")
print(json.dumps({"modules": names, "core": core, "wrappers": wrappers}))
"""

PLAN = """
import json, sys
from cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "prefect": sorted(m for m in sys.modules if m.split(".")[0] == "prefect")}))
"""


def python(code: str, *args: str) -> tuple[dict, str]:
    """Run code in a fresh interpreter at the repository root; return the JSON it prints last, and all it printed."""
    env = {**os.environ, "PYTHONPATH": python_path()}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def test_importing_every_core_module_leaves_prefect_unloaded() -> None:
    """Every module under batchinfer/ imports without prefect; tasks/ does load it, so the check can see it."""
    found, _ = python(IMPORT_ALL)
    for name in ("pipeline", "merge", "runner", "planning", "storage", "devices", "models.mlp", "models.exported"):
        assert f"batchinfer.{name}" in found["modules"]
    assert found["core"] == []
    assert "prefect" in found["wrappers"]


def test_plan_command_runs_without_prefect(tmp_path: Path) -> None:
    """`batchinfer plan` reads footers and prints shards; the flows are imported only by commands that run them."""
    write_features(tmp_path / "data" / "part-00000.parquet", np.arange(300), 100)
    args = ["plan", "--input", str(tmp_path / "data"), "--model", GOOD_MODEL, "--shard-rows", "100"]
    found, printed = python(PLAN, *args)
    assert found == {"code": 0, "prefect": []}
    assert "1 partitions, 3 shards, 300 rows" in printed


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the packages under `root`, with the contracts of `root`/pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(lint), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "the core never imports prefect KEPT" in done.stdout
    assert "cli above flows above tasks above the core KEPT" in done.stdout


def test_import_contract_fails_when_the_core_imports_prefect(tmp_path: Path) -> None:
    """An import at run time, inside a function, breaks the contract as surely as one at the top."""
    for name in ("batchinfer", "tasks", "flows", "cli"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    merge = tmp_path / "batchinfer" / "merge.py"
    merge.write_text(
        merge.read_text() + "\n\ndef _report():\n    from prefect import get_run_logger\n\n    return get_run_logger\n"
    )
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "the core never imports prefect BROKEN" in done.stdout
    assert "batchinfer.merge -> prefect" in done.stdout
