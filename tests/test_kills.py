"""The kill campaign: SIGKILL `batchinfer run` at random moments, rerun the same command, and lose nothing.

Each case is a fresh output (on the local disk or on S3) and one Prefect home for the whole campaign. A
case kills the run one to three times, at phases in the order a run meets them (start-up, scoring, the
middle of a commit, merge-and-validate, writing `_SUCCESS`), rerunning the same command after each kill,
then lets the last rerun finish. Fault points (`batchinfer/faults.py`) hold the run where it is killed.

After each kill and each run: nothing of the killed run lives on; `_SUCCESS` never stands over data that
differs from a clean run's. After the last run of a case: it finished without hanging, no shard finished
before a kill was scored again, no temporary file is left (`.tmp-*` in the output, `batchinfer-*` in the
system temp folder), and every byte equals a clean run's.

CI runs the short campaign (BATCHINFER_KILLS, default 8); `scripts/kill-campaign.sh` runs 50.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.faulty_models import FEATURES
from tests.test_rerun import _assert_all_end, _children, cli_env

pytestmark = [pytest.mark.kills, pytest.mark.slow, pytest.mark.s3]

KILLS = int(os.environ.get("BATCHINFER_KILLS", "8"))
SEED = int(os.environ.get("BATCHINFER_KILL_SEED", str(random.SystemRandom().randrange(10**6))))
RUN_TIMEOUT = 240.0

# The phases in the order a run meets them, each with the fault points that hold a run inside it
# (None: a timer, anywhere in the process's start, before Prefect's server is up or while it starts).
PHASES: dict[str, list[str | None]] = {
    "start-up": [None, "startup"],
    "scoring": ["scoring"],
    "mid-commit": ["rename:shards/*", "commit.data", "rename:markers/*"],
    "merge-and-validate": ["merge.validated", "rename:predictions/*"],
    "writing _SUCCESS": ["rename:*/_SUCCESS"],
}
ORDER = list(PHASES)


class Output:
    """A run's output on the local disk or on S3, read the same way."""

    def __init__(self, uri: str, fs: Any = None):
        self.uri, self.fs = uri, fs

    def _files(self, folder: str) -> dict[str, bytes]:
        if self.fs is None:
            base = Path(self.uri) / folder
            return {p.name: p.read_bytes() for p in sorted(base.glob("*"))} if base.exists() else {}
        self.fs.invalidate_cache()
        key = f"{self.uri.removeprefix('s3://')}/{folder}"
        return {p.rsplit("/", 1)[-1]: self.fs.cat_file(p) for p in self.fs.find(key)}

    def markers(self) -> dict[str, dict[str, Any]]:
        return {
            n.removesuffix(".json"): json.loads(b) for n, b in self._files("markers").items() if n.endswith(".json")
        }

    def shards(self) -> dict[str, bytes]:
        return {n: b for n, b in self._files("shards").items() if not n.startswith(".")}

    def parts(self) -> dict[str, bytes]:
        return {n: b for n, b in self._files("predictions").items() if not n.startswith(".")}

    def success(self) -> bool:
        if self.fs is None:
            return (Path(self.uri) / "_SUCCESS").exists()
        self.fs.invalidate_cache()
        return self.fs.exists(f"{self.uri.removeprefix('s3://')}/_SUCCESS")

    def temps(self) -> list[str]:
        """Temporary names left under the output (local writes go through `.tmp-*` files)."""
        if self.fs is not None:
            return []  # an object store receives finished objects only
        return [str(p) for p in Path(self.uri).rglob(".tmp-*")]


def system_temps(folder: Path) -> list[str]:
    """What batchinfer left in the system temp folder (the device lock folder and the model cache are kept)."""
    return sorted(
        p.name for p in folder.glob("batchinfer-*") if p.name not in ("batchinfer-devices", "batchinfer-cache")
    )


class Campaign:
    def __init__(self, tabular: dict, tmp_path: Path, s3_server: Any):
        import s3fs

        self.rng = random.Random(SEED)
        self.data = tabular["input"]
        self.control = tmp_path / "control"  # the controlled model's folder (unused knobs: it scores plainly)
        self.points = tmp_path / "points"
        self.systmp = tmp_path / "systmp"
        for folder in (self.control, self.points, self.systmp):
            folder.mkdir()
        self.tmp_path = tmp_path
        self.s3 = s3_server
        self.fs = s3fs.S3FileSystem(**s3_server.options(), skip_instance_cache=True)
        self.bucket = f"kills-{uuid.uuid4().hex[:10]}"
        self.fs.mkdir(self.bucket)
        self.env = {
            **cli_env(self.control),
            "TMPDIR": str(self.systmp),
            "BATCHINFER_FAULT_POINTS": str(self.points),
        }
        self.kills: collections.Counter[str] = collections.Counter()
        self.points_hit: collections.Counter[str] = collections.Counter()
        self.runs = 0
        self.finished_runs = 0
        self.slowest_run = 0.0
        self.cases: list[str] = []
        self.deck: list[str] = []
        self.clean: Output | None = None

    def args(self, output: Output, engine: str) -> list[str]:
        argv = [sys.executable, "-m", "cli", "run", "--input", self.data, "--output", output.uri]
        argv += ["--model", "tests.faulty_models:factory", "--features", ",".join(FEATURES), "--devices", "cpu"]
        argv += ["--shard-rows", "2500", "--batch-size", "500", "--engine", engine]  # 8 shards, 2 per part
        if output.fs is not None:
            argv += ["--storage-options", json.dumps(self.s3.options())]
        return argv

    def run_to_end(self, output: Output, engine: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run(
            self.args(output, engine), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
        self.slowest_run = max(self.slowest_run, time.monotonic() - started)
        self.runs += 1
        self.finished_runs += 1
        return done

    def kill_once(self, output: Output, engine: str, phase: str) -> bool:
        """Start the run, SIGKILL it in `phase`; False when the run ended before reaching that phase."""
        point = self.rng.choice(PHASES[phase])
        (self.points / "reached").unlink(missing_ok=True)
        if point is not None:
            (self.points / "pause").write_text(f"{point} 120\n")
        log = open(self.tmp_path / f"run-{self.runs}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(self.args(output, engine), env=self.env, cwd=ROOT, stdout=log, stderr=log)
        self.runs += 1
        try:
            if point is None:
                time.sleep(self.rng.uniform(0.3, 5.0))
            else:
                deadline = time.monotonic() + RUN_TIMEOUT
                while not (self.points / "reached").exists() and proc.poll() is None:
                    assert time.monotonic() < deadline, f"the run never reached {point}"
                    time.sleep(0.02)
                time.sleep(self.rng.uniform(0.0, 0.05))
            if proc.poll() is not None:
                assert proc.returncode == 0, (self.tmp_path / f"run-{self.runs - 1}.log").read_text()[-2000:]
                self.finished_runs += 1
                return False
            children = _children(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            log.close()
            (self.points / "pause").unlink(missing_ok=True)
        _assert_all_end(children)
        self.kills[phase] += 1
        self.points_hit[point or "timer"] += 1
        return True

    def check_success_is_clean(self, output: Output) -> None:
        """`_SUCCESS` never stands over data that differs from a clean run's."""
        assert self.clean is not None
        if output.success():
            assert output.parts() == self.clean.parts(), f"{output.uri}: _SUCCESS over other data"

    def next_phase(self) -> str:
        """Phases dealt from a shuffled deck of all of them: every phase is killed before any is killed twice."""
        if not self.deck:
            self.deck = self.rng.sample(ORDER, len(ORDER))
        return self.deck.pop()

    def case(self, index: int, kills: int) -> None:
        local = self.rng.random() < 0.6
        uri = str(self.tmp_path / f"out-{index}") if local else f"s3://{self.bucket}/out-{index}"
        output = Output(uri, None if local else self.fs)
        engine = self.rng.choice(["local", "local", "processes"])
        phases = sorted((self.next_phase() for _ in range(kills)), key=ORDER.index)
        finished: dict[str, str] = {}  # shard id -> finished_at, for every shard committed before a kill
        made = 0
        for phase in phases:
            if self.kill_once(output, engine, phase):
                made += 1
            else:  # the run ended before that phase: deal it again
                self.deck.append(phase)
            self.check_success_is_clean(output)
            for shard_id, marker in output.markers().items():
                finished.setdefault(shard_id, marker["finished_at"])
        done = self.run_to_end(output, engine)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "validation passed" in done.stdout
        self.check_success_is_clean(output)
        assert output.success()
        after = output.markers()
        recomputed = sorted(k for k, at in finished.items() if after[k]["finished_at"] != at)
        assert not recomputed, f"finished shards scored again: {recomputed}"
        assert output.shards() == self.clean.shards()
        assert output.parts() == self.clean.parts()
        assert not output.temps(), output.temps()
        assert not system_temps(self.systmp), system_temps(self.systmp)
        self.cases.append(f"{'local' if local else 's3'}/{engine}: {', '.join(phases)} ({made} killed)")

    def report(self) -> str:
        lines = [
            f"kill campaign (seed {SEED}): {sum(self.kills.values())} kills in {len(self.cases)} cases, "
            f"{self.runs} runs ({self.finished_runs} ran to the end), slowest run {self.slowest_run:.1f} s",
            "kills by phase: " + ", ".join(f"{p} {self.kills[p]}" for p in ORDER),
            "kills by point: " + ", ".join(f"{p} {n}" for p, n in sorted(self.points_hit.items())),
            *self.cases,
        ]
        return "\n".join(lines)


def test_kill_campaign(tabular, tmp_path, s3_server):
    campaign = Campaign(tabular, tmp_path, s3_server)
    clean = Output(str(tmp_path / "clean"))
    done = campaign.run_to_end(clean, "local")
    assert done.returncode == 0, done.stderr[-3000:]
    campaign.clean = clean
    assert len(clean.shards()) == 8 and len(clean.parts()) == 4

    index = 0
    while sum(campaign.kills.values()) < KILLS:
        assert index < 2 * KILLS, f"{sum(campaign.kills.values())} kills in {index} cases: runs end before their phase"
        campaign.case(index, min(KILLS - sum(campaign.kills.values()), campaign.rng.randint(2, 3)))
        index += 1
    summary = campaign.report()
    print(summary)
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "kill-campaign.txt").write_text(summary + "\n")
    assert sum(campaign.kills.values()) == KILLS
    if KILLS >= len(ORDER):
        assert all(campaign.kills[phase] for phase in ORDER), summary
