"""Side-by-side throughput and memory: batchinfer's flow against a bare PyTorch loop, Ray Data and a naive loop.

    .venv/bin/python -m benchmarks.run --rows 10000000 --sentences 5000

Same data, checkpoint, device (the CPU by default, every core) and batch size
for every variant. `--device cuda:0` (or `auto`: cuda:0 when CUDA is there)
moves both workloads' bare loops, flows and precision runs, and the MLP's naive
loop, onto that device; Ray Data and MiniLM's naive loop stay on the CPU.
`--only bare,flow` runs just those rows (see `--only`), e.g. the flow against
the bare loop on a GPU:

    .venv/bin/python -m benchmarks.run --rows 20000000 --device auto --workloads mlp --no-ray \
        --only bare,flow --repeats 1 --no-markdown --json gpu-check/throughput.json

Each variant runs in its own process (peak RSS from
`wait4`'s `ru_maxrss`; the whole process tree's peak PSS is sampled too, which
is what counts for Ray's many processes), `--repeats` times round-robin, and
the table shows the median. The flow is timed from flow start to flow end
against a Prefect server started beforehand (`prefect server start` on a free
loopback port with its own PREFECT_HOME, on SQLite, or with `--database
postgres` on a throwaway PostgreSQL); that server's start-up is reported
on its own line. Data are generated once under `.bench/`. Results go to
`benchmarks/results/*.json` (or, with `--json PATH`, into one file keyed by
workload), and the tables into BENCHMARKS.md (not with `--no-markdown`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import data
from cli.main import SERVER_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKDOWN = ROOT / "BENCHMARKS.md"
# What `--only` picks from: each row of a table (and each extra run) has one of these keys.
ROW_KEYS = ("bare", "flow", "array", "ray", "naive", "memory", "overhead", "precision")


# -- measuring one process ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid`, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().rsplit(b")", 1)[1].split()
            parents.setdefault(int(stat[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peak PSS summed over a process and its descendants, sampled a few times a second."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kib = pid, every, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            total = sum(_pss_kib(p) for p in [self.pid, *_children(self.pid)])
            self.peak_kib = max(self.peak_kib, total)


def measure(name: str, params: dict[str, Any], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one variant in a fresh process; its result plus peak RSS and peak tree PSS."""
    command = [sys.executable, "-m", "benchmarks.variants", name, json.dumps(params)]
    with tempfile.TemporaryFile("w+") as out, open(log, "a") as err:
        err.write(f"\n$ {shlex.join(command)}\n")
        err.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stopped.set()
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read()
    lines = [line for line in text.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log}\n{text[-2000:]}")
    result = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    result["peak_tree_pss_mb"] = round(sampler.peak_kib / 1024, 1)
    result["process_seconds"] = round(wall, 3)
    return result


# -- a Prefect server running before the flow starts -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrefectServer:
    home: Path
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    startup_seconds: float = 0.0
    # How the README starts a server for repeated runs (cli.main.SERVER_SETTINGS), unless told otherwise.
    settings: dict[str, str] = field(default_factory=lambda: dict(SERVER_SETTINGS))

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }

    def start(self, timeout: float = 180.0) -> None:
        exe = Path(sys.executable).with_name("prefect")
        prefect = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]  # e.g. a system python3
        env = {**os.environ, **self.env(), **self.settings}
        env.pop("PREFECT_API_URL")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=open(self.log, "ab"),  # noqa: SIM115 - kept open for the server's life
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    healthy = response.status == 200
            except OSError:
                healthy = False
            if healthy:
                # The server's first API call after /health is slow (BENCHMARKS.md, "Start-up"): part of its
                # start, not of the first flow measured.
                urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=60).read()
                self.startup_seconds = time.perf_counter() - started
                return
            time.sleep(0.2)
        raise TimeoutError(f"prefect server not healthy within {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


DATABASES = ("sqlite", "postgres")


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        choices=DATABASES,
        default="sqlite",
        help="the Prefect server's database: SQLite in its home, or a throwaway PostgreSQL (tests/postgres.py)",
    )


@contextlib.contextmanager
def running_server(home: Path, log: Path, database: str = "sqlite") -> Iterator[PrefectServer]:
    """A started `prefect server start` with the README's settings, its database in SQLite under `home` or
    in a throwaway PostgreSQL; both stopped on the way out, also after a failed start."""
    with contextlib.ExitStack() as stack:
        settings = dict(SERVER_SETTINGS)
        if database == "postgres":
            from tests.postgres import PostgresServer

            postgres = PostgresServer()
            stack.callback(postgres.stop)
            postgres.start()  # its port is known once started
            settings.update(postgres.prefect_settings)
        server = PrefectServer(home, log, settings=settings)
        stack.callback(server.stop)
        server.start()
        yield server


# -- the workloads -----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of a table: a variant, the params it ran with, and each repeat's result."""

    label: str
    variant: str
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    key: str = ""  # what `--only` calls it: one of ROW_KEYS

    def median(self, key: str) -> float:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    def fastest(self, key: str) -> float:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return min(values) if values else float("nan")

    @property
    def rows_per_s(self) -> float:
        seconds = self.median("seconds") if self.runs else 0.0
        return self.runs[0]["rows"] / seconds if seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "variant": self.variant,
            "rows": self.runs[0]["rows"] if self.runs else 0,
            "median_seconds": round(self.median("seconds"), 3),
            "rows_per_s": round(self.rows_per_s, 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in self.runs),
            "peak_tree_pss_mb": max(r["peak_tree_pss_mb"] for r in self.runs),
            "runs": self.runs,
            "params": self.params,
        }


def run_rows(rows: list[Row], repeats: int, env: dict[str, str], log: Path) -> None:
    for repeat in range(repeats):
        for row in rows:
            if repeat and row.params.get("once"):
                continue
            print(f"  [{repeat + 1}/{repeats}] {row.label} ...", end=" ", flush=True)
            result = measure(row.variant, row.params, env, log)
            row.runs.append(result)
            rate = result["rows"] / result["seconds"] if result["seconds"] else 0
            print(f"{result['seconds']:.2f} s, {rate:,.0f} rows/s, RSS {result['peak_rss_mb']:,.0f} MB", flush=True)


def ray_available() -> bool:
    from importlib.util import find_spec

    return find_spec("ray") is not None


def _picked(rows: list[Row], only: set[str], sorted_only: bool = False) -> list[Row]:
    return [row for row in rows if row.key in only and not (sorted_only and row.params.get("sorted") is False)]


def mlp_rows(
    args: argparse.Namespace, bench: Path, checkpoint: Path, with_ray: bool, device: str
) -> tuple[list[Row], list[Row]]:
    paths = data.tabular_paths(bench / "data", args.rows)
    common = {"checkpoint": str(checkpoint), "batch_size": args.batch_size, "threads": args.threads}
    on = {"device": device}  # the rows that run where --device says; Ray and precision stay on the CPU
    out = bench / "out"
    memory = "in memory" if device == "cpu" else f"already on {device}"
    rows = [
        Row(
            f"(a) bare PyTorch loop, tensors {memory}",
            "mlp-bare",
            {**common, **on, "matrix": str(paths["matrix"])},
            key="bare",
        ),
        Row(
            "(b) batchinfer flow (Prefect)",
            "flow",
            {**common, **on, "model": "mlp", "input": str(paths["columns"]), "output": str(out / "flow")},
            key="flow",
        ),
    ]
    if args.array_layout:
        rows.append(
            Row(
                "(b') batchinfer flow, features as one array column",
                "flow",
                {
                    **common,
                    **on,
                    "model": "mlp",
                    "features": ["features"],
                    "input": str(paths["array"]),
                    "output": str(out / "flow-array"),
                },
                key="array",
            )
        )
    if with_ray:
        rows.append(
            Row(
                "(c) Ray Data map_batches",
                "mlp-ray",
                {
                    **common,
                    "input": str(paths["columns"]),
                    "output": str(out / "ray"),
                    "ray_tmp": str(bench / "ray"),
                    "ray_actors": args.ray_actors,
                    "ray_batch_rows": args.ray_batch_rows,
                    "ray_blocks": args.ray_blocks,
                },
                key="ray",
            )
        )
    rows.append(
        Row(
            "(d) naive polars -> torch loop",
            "mlp-naive",
            {**common, **on, "input": str(paths["columns"]), "output": str(out / "naive")},
            key="naive",
        )
    )
    extra: list[Row] = []
    first = paths["columns"] / "part-00000.parquet"
    if args.rows > data.PARTITION_ROWS:
        extra.append(
            Row(
                f"flow at {data.PARTITION_ROWS:,} rows (memory)",
                "flow",
                {**common, **on, "model": "mlp", "input": str(first), "output": str(out / "flow-1m")},
                key="memory",
            )
        )
    if args.overhead:
        small = args.overhead_shard_rows
        extra.append(
            Row(
                f"flow at {data.PARTITION_ROWS:,} rows, shards of {small:,} rows (overhead)",
                "flow",
                {
                    **common,
                    **on,
                    "model": "mlp",
                    "input": str(first),
                    "output": str(out / "flow-small"),
                    "shard_rows": small,
                },
                key="overhead",
            )
        )
        if args.rows <= data.PARTITION_ROWS:
            extra.append(
                Row(
                    f"flow at {data.PARTITION_ROWS:,} rows (memory)",
                    "flow",
                    {**common, **on, "model": "mlp", "input": str(first), "output": str(out / "flow-1m")},
                    key="memory",
                )
            )
    extra.append(
        Row(
            "precision",
            "mlp-precision",
            {**common, **on, "matrix": str(paths["matrix"]), "precision_rows": min(args.rows, 1_000_000), "once": True},
            key="precision",
        )
    )
    return _picked(rows, args.only), _picked(extra, args.only)


def text_rows(args: argparse.Namespace, bench: Path, with_ray: bool, device: str) -> tuple[list[Row], list[Row]]:
    folder = data.text_path(bench / "data", args.sentences)
    common = {"batch_size": args.text_batch_size, "threads": args.threads, "input": str(folder)}
    on = {"device": device}  # the bare loops and the flow run where --device says; the others stay on the CPU
    out = bench / "out"
    where = "" if device == "cpu" else f", tensors already on {device}"
    rows = [
        Row(f"(a) bare loop, unsorted{where}", "minilm-bare", {**common, **on, "sorted": False}, key="bare"),
        Row(f"(a') bare loop, sorted by length{where}", "minilm-bare", {**common, **on, "sorted": True}, key="bare"),
        Row(
            "(b) batchinfer flow (Prefect)",
            "flow",
            {**common, **on, "model": "minilm", "text_column": "text", "output": str(out / "flow-text")},
            key="flow",
        ),
    ]
    if with_ray:
        rows.append(
            Row(
                "(c) Ray Data map_batches",
                "minilm-ray",
                {
                    **common,
                    "output": str(out / "ray-text"),
                    "ray_tmp": str(bench / "ray"),
                    "ray_actors": args.ray_actors,
                    "ray_batch_rows": args.ray_text_batch_rows,
                    "ray_blocks": args.ray_blocks,
                },
                key="ray",
            )
        )
    rows.append(
        Row(
            "(d) naive polars -> torch loop", "minilm-naive", {**common, "output": str(out / "naive-text")}, key="naive"
        )
    )
    extra = [
        Row(
            "precision",
            "minilm-precision",
            {**common, **on, "precision_rows": min(args.sentences, args.text_precision_rows), "once": True},
            key="precision",
        )
    ]
    return _picked(rows, args.only, args.sorted_only), _picked(extra, args.only)


def hf_rows(args: argparse.Namespace, bench: Path, device: str) -> tuple[list[Row], list[Row]]:
    """A Hugging Face text classifier (`hf:` directory): the flow against transformers' own loop."""
    folder = data.text_path(bench / "data", args.sentences)
    model = f"hf:{bench / 'hf-classifier'}"
    common = {"batch_size": args.text_batch_size, "threads": args.threads, "input": str(folder), "model": model}
    on = {"device": device}
    where = "" if device == "cpu" else f", tensors already on {device}"
    rows = [
        Row(f"(a) bare transformers loop, unsorted{where}", "hf-bare", {**common, **on, "sorted": False}, key="bare"),
        Row(
            f"(a') bare transformers loop, sorted by length{where}",
            "hf-bare",
            {**common, **on, "sorted": True},
            key="bare",
        ),
        Row(
            "(b) batchinfer flow (Prefect)",
            "flow",
            {**common, **on, "text_column": "text", "output": str(bench / "out" / "flow-hf")},
            key="flow",
        ),
    ]
    extra = [
        Row(
            "precision of each output kind",
            "kinds-precision",
            {**common, "precision_rows": min(args.sentences, args.text_precision_rows), "once": True},
            key="precision",
        )
    ]
    return _picked(rows, args.only, args.sorted_only), _picked(extra, args.only)


def kinds_table(row: Row) -> str:
    """Per output kind and precision: speed against fp32 and the deviation from fp32's outputs."""
    if not row.runs:
        return ""
    result = row.runs[0]["kinds"]
    heads = ["kind", "precision", "model", "x fp32", "max abs diff", "agreement / min cosine / max rel diff"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, values in result.items():
        kind, precision = name.split()
        third = values.get("agreement", values.get("min_cosine", values.get("max_rel_diff")))
        what = "agreement" if "agreement" in values else "min cosine" if "min_cosine" in values else "max rel diff"
        cells = [kind, precision, values["model"].split("/")[-1], f"{values['speed_x_fp32']:.2f}"]
        cells += [f"{values['max_abs_diff']:.2e}", f"{what} {third:.6f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- reporting ---------------------------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value:,.0f}"


def table(rows: list[Row], references: list[tuple[str, Row]]) -> str:
    heads = ["variant", "rows/s", *[f"x {name}" for name, _ in references], "peak RSS MB", "peak PSS MB (tree)"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        if not row.runs:
            continue
        ratios = [f"{row.rows_per_s / ref.rows_per_s:.2f}" for _, ref in references]
        cells = [
            row.label,
            f"{row.rows_per_s:,.0f}",
            *ratios,
            _mb(row.summary()["peak_rss_mb"]),
            _mb(row.summary()["peak_tree_pss_mb"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def precision_table(row: Row, deviation: list[str]) -> str:
    if not row.runs:
        return ""
    result = row.runs[0]["precisions"]
    heads = ["precision", "rows/s", "x fp32", *deviation]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    base = result["fp32"]["rows_per_s"]
    for name, values in result.items():
        cells = [name, f"{values['rows_per_s']:,.0f}", f"{values['rows_per_s'] / base:.2f}"]
        cells += [f"{values[key]:.6f}" if key != "max_abs_prob_diff" else f"{values[key]:.2e}" for key in deviation]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_device(name: str) -> dict[str, Any]:
    """`--device` made concrete ('auto': cuda:0 when CUDA is there, else cpu), asked of torch in a child process."""
    if name == "cpu":
        return {"device": "cpu", "name": platform.processor() or platform.machine(), "cuda": None}
    probe = (
        "import json, sys, torch\n"
        "name = sys.argv[1]\n"
        "ok = torch.cuda.is_available()\n"
        "device = ('cuda:0' if ok else 'cpu') if name == 'auto' else name\n"
        "d = torch.device(device)\n"
        "if d.type == 'cuda' and (not ok or (d.index or 0) >= torch.cuda.device_count()):\n"
        "    sys.exit(f'--device {name}: no such CUDA device (CUDA available: {ok}, '\n"
        "             f'{torch.cuda.device_count()} device(s))')\n"
        "label = torch.cuda.get_device_name(d) if d.type == 'cuda' else 'cpu'\n"
        "print(json.dumps({'device': device, 'name': label, 'cuda': torch.version.cuda}))\n"
    )
    # A child process: the driver stays small (no torch in it), as for the data below.
    done = subprocess.run([sys.executable, "-c", probe, name], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"--device {name}: failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment(args: argparse.Namespace, device: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": " ".join([".venv/bin/python -m benchmarks.run", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "device": device["device"],
        "device_name": device["name"],
        "torch": _version("torch"),
        "torch_cuda": device["cuda"],
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "ray": _version("ray"),
        "prefect": _version("prefect"),
    }


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def update_markdown(section: str, body: str) -> None:
    """Replace the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in BENCHMARKS.md."""
    if not MARKDOWN.exists():
        return
    text = MARKDOWN.read_text()
    pattern = re.compile(rf"(<!-- {section}:begin -->\n).*?(<!-- {section}:end -->)", re.S)
    if pattern.search(text):
        MARKDOWN.write_text(pattern.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), text))


# -- main --------------------------------------------------------------------------------------------------


def _batch_size(text: str) -> int:
    """A positive number, or 'auto' (0, the flow's batch size "auto")."""
    if text.strip().lower() == "auto":
        return 0
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'auto', got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="MLP rows (64 float features)")
    parser.add_argument("--sentences", type=int, default=5_000, help="MiniLM sentences")
    parser.add_argument("--workloads", default="mlp,minilm", help="comma-separated: mlp, minilm, hf")
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1024,
        help="MLP rows per forward pass, every variant; 'auto': the flow's auto mode, and the size it starts from "
        "for the loops",
    )
    parser.add_argument(
        "--text-batch-size", type=_batch_size, default=64, help="MiniLM sentences per forward pass (or 'auto')"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each MLP variant (the table shows medians)")
    parser.add_argument("--text-repeats", type=int, default=1, help="runs of each MiniLM variant")
    parser.add_argument(
        "--sorted-only",
        action="store_true",
        help="text workloads: no bare loop over unsorted texts (4x slower; for sizes where it would take long)",
    )
    parser.add_argument("--no-ray", action="store_true", help="skip Ray Data even if installed")
    parser.add_argument("--ray-actors", type=int, default=1, help="Ray actor pool size (torch threads split)")
    parser.add_argument("--ray-batch-rows", type=int, default=65_536, help="rows per Ray map_batches call (MLP)")
    parser.add_argument("--ray-text-batch-rows", type=int, default=1_024, help="rows per Ray call (MiniLM)")
    parser.add_argument("--ray-blocks", type=int, default=0, help="repartition Ray's dataset into N blocks (0: no)")
    parser.add_argument("--no-array-layout", dest="array_layout", action="store_false", help="skip the array layout")
    parser.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip the per-shard overhead run")
    parser.add_argument("--overhead-shard-rows", type=int, default=65_536)
    parser.add_argument("--text-precision-rows", type=int, default=1_000)
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the bare loops, the MLP's naive loop and the flows run: cpu, cuda:N, or auto (cuda:0 if CUDA, "
        "else cpu)",
    )
    parser.add_argument(
        "--only",
        default=",".join(ROW_KEYS),
        help=f"comma-separated rows to run (default: all): {', '.join(ROW_KEYS)}",
    )
    parser.add_argument("--bench-dir", default=str(ROOT / ".bench"))
    parser.add_argument("--json", default=None, help="write the results to this file, keyed by workload")
    add_database_argument(parser)
    parser.add_argument("--no-markdown", dest="markdown", action="store_false", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    args.only = {key.strip() for key in args.only.split(",") if key.strip()}
    unknown = sorted(args.only - set(ROW_KEYS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(ROW_KEYS)})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Path(args.bench_dir).resolve()
    bench.mkdir(parents=True, exist_ok=True)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    with_ray = not args.no_ray and "ray" in args.only and ray_available()
    if not with_ray and not args.no_ray and "ray" in args.only:
        print("ray: not installed (pip install -e '.[bench]'); Ray Data rows are skipped")
    log = bench / "bench.log"
    device = resolve_device(args.device)
    info = environment(args, device)
    print(f"{info['command']}\n{info['cpu_count']} cores, torch {info['torch']}, logs in {log}")
    fallback = (
        " (auto: CUDA is not available, so the CPU)" if args.device == "auto" and device["device"] == "cpu" else ""
    )
    print(f"device: {device['device']} ({device['name']}){fallback}", flush=True)

    print(f"preparing data (cached in {bench}) ...", flush=True)
    # In a child process: the driver stays small, so no variant inherits a large peak RSS through fork.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.data",
            "--root",
            str(bench),
            "--rows",
            str(args.rows if "mlp" in workloads else 0),
            "--sentences",
            str(args.sentences if {"minilm", "hf"} & set(workloads) else 0),
            *([] if args.array_layout and "array" in args.only else ["--no-array"]),
            *(["--hf"] if "hf" in workloads else []),
        ],
        cwd=ROOT,
        check=True,
    )
    checkpoint = bench / "mlp.safetensors"
    plans: dict[str, tuple[list[Row], list[Row]]] = {}
    if "mlp" in workloads:
        plans["mlp"] = mlp_rows(args, bench, checkpoint, with_ray, device["device"])
    if "minilm" in workloads:
        plans["minilm"] = text_rows(args, bench, with_ray, device["device"])
    if "hf" in workloads:
        plans["hf"] = hf_rows(args, bench, device["device"])
    plans = {name: plan for name, plan in plans.items() if plan[0] or plan[1]}

    home = Path(tempfile.mkdtemp(prefix="prefect-home-", dir=bench))
    print(f"starting prefect server on {args.database} ...", end=" ", flush=True)
    with running_server(home, bench / "prefect.log", args.database) as server:
        print(f"healthy after {server.startup_seconds:.1f} s ({server.api_url})", flush=True)
        env = {
            **os.environ,
            **server.env(),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # The repository first, then whatever the caller had (packages installed with --target, say).
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        results: dict[str, Any] = {}
        for name, (rows, extra) in plans.items():
            repeats = args.repeats if name == "mlp" else args.text_repeats
            print(f"\n{name}: {len(rows)} variants x {repeats} run(s), round-robin", flush=True)
            run_rows(rows, repeats, env, log)
            run_rows(extra, repeats, env, log)
            results[name] = report(name, rows, extra, args, info, server)
            save(name, results, args)


def save(name: str, results: dict[str, Any], args: argparse.Namespace) -> None:
    """`benchmarks/results/NAME-SIZE.json`, or every workload so far in the one file of `--json`."""
    if args.json:
        path = Path(args.json).resolve()
        text = json.dumps(results, indent=2)
    else:
        size = args.rows if name == "mlp" else args.sentences  # minilm, hf
        path = RESULTS / f"{name}-{size}.json"
        text = json.dumps(results[name], indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def report(
    name: str, rows: list[Row], extra: list[Row], args: argparse.Namespace, info: dict[str, Any], server: PrefectServer
) -> dict[str, Any]:
    bare = [row for row in rows if row.key == "bare" and row.runs]
    if name == "mlp":
        references = list(zip(["(a)"], bare, strict=False))
        deviation = ["max_abs_prob_diff", "argmax_agreement"]
    else:
        references = [("(a') sorted" if row.params["sorted"] else "(a) unsorted", row) for row in bare]
        deviation = ["mean_cosine", "min_cosine"]
    main_table = table(rows, references) if any(row.runs for row in rows) else ""
    flows = [r for r in [*rows, *extra] if r.variant == "flow" and r.runs]
    notes = [f"Prefect server start-up (fresh PREFECT_HOME, not in any row): {server.startup_seconds:.1f} s"]
    for row in [*rows, *extra]:
        if row.runs and "startup_seconds" in row.runs[0]:
            notes.append(f"Ray start-up (ray.init, not in the row): {row.median('startup_seconds'):.1f} s")
    for row in flows:
        notes.append(
            f"{row.label}: {row.runs[0]['shards']} shard(s) of up to {row.runs[0]['shard_rows']:,} rows, "
            f"{row.median('seconds'):.2f} s flow, {row.median('shard_seconds_sum'):.2f} s in shards, "
            f"{row.median('merge_seconds'):.2f} s merge-and-validate, peak RSS {row.summary()['peak_rss_mb']:,.0f} MB"
        )
    big = next((r for r in rows if r.key == "flow" and r.runs), None)
    small = next((r for r in extra if r.key == "memory"), None)
    summary: dict[str, Any] = {"device": info["device"]}
    for label, ref in references if big else ():
        summary["flow_vs_bare_sorted" if label == "(a') sorted" else "flow_vs_bare"] = round(
            big.rows_per_s / ref.rows_per_s, 4
        )
    if big and small and big.runs and small.runs:
        ratio = big.summary()["peak_rss_mb"] / small.summary()["peak_rss_mb"]
        summary["flow_rss_ratio"] = round(ratio, 3)
        notes.append(f"flow peak RSS, {big.runs[0]['rows']:,} rows / {small.runs[0]['rows']:,} rows: {ratio:.2f}x")
    overhead = next((r for r in extra if r.key == "overhead"), None)
    if overhead and small and overhead.runs and small.runs:
        extra_shards = overhead.runs[0]["shards"] - small.runs[0]["shards"]
        # The fastest run of each: noise (the server, the page cache) only ever adds time, and a difference
        # of two noisy medians of a few runs can even come out negative.
        per_shard = (overhead.fastest("seconds") - small.fastest("seconds")) / max(extra_shards, 1)
        shard_time = big.median("seconds") / max(big.runs[0]["shards"], 1) if big else float("nan")
        summary["per_shard_overhead_seconds"] = round(per_shard, 4)
        notes.append(
            f"per-shard overhead (Prefect task + commit): {per_shard * 1000:.0f} ms "
            f"= {100 * per_shard / shard_time:.1f}% of a {big.runs[0]['shard_rows']:,}-row shard's {shard_time:.2f} s"
            if big
            else f"per-shard overhead: {per_shard * 1000:.0f} ms"
        )
    precision = next((r for r in extra if r.variant.endswith("precision")), None)
    if precision and precision.variant == "kinds-precision":
        precision_md = kinds_table(precision)
    else:
        precision_md = precision_table(precision, deviation) if precision else ""
    batch, text_batch = args.batch_size or "auto", args.text_batch_size or "auto"
    workload = {
        "mlp": f"{args.rows:,} rows x 64 float32 features, MLP 64-256-256-10, batch {batch}",
        "minilm": f"{args.sentences:,} sentences, all-MiniLM-L6-v2, batch {text_batch}",
        "hf": f"{args.sentences:,} sentences, a Hugging Face BertForSequenceClassification (the all-MiniLM-L6-v2 "
        f"encoder, 2 classes) as `hf:DIR`, batch {text_batch}",
    }[name]
    where = f"device {info['device']} ({info['device_name']}), " if info["device"] != "cpu" else ""
    repeats = max((len(row.runs) for row in rows), default=1)
    body = "\n\n".join(
        [
            f"{workload}; {where}{info['cpu_count']} cores, torch {info['torch_threads']} threads, "
            f"median of {repeats} run(s).",
            main_table,
            "\n".join(f"- {n}" for n in notes),
            f"Precision ({'each output kind, ' if name == 'hf' else ''}batchinfer's predictor, "
            f"{precision.runs[0]['rows']:,} rows, CPU):\n\n{precision_md}"
            if precision_md
            else "",
        ]
    )
    body = re.sub(r"\n{3,}", "\n\n", body).strip()  # rows left out by --only leave no gaps
    print(f"\n{body}\n")
    result = {
        "workload": name,
        "description": workload,
        "environment": info,
        "prefect_server_startup_seconds": round(server.startup_seconds, 3),
        "rows": [r.summary() for r in rows],
        "extra": [r.summary() for r in extra],
        "summary": summary,
        "notes": notes,
    }
    if args.markdown:
        update_markdown(name, f"Command: `{info['command']}`\n\n{body}")
    return result


if __name__ == "__main__":
    main()
