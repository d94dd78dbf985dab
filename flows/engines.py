"""The task runner a run's shards go through, chosen by `compute.engine`, and what each shard asks of it.

Prefect's own runners do the scheduling; this only picks one, sizes it, and asks the engine for one GPU
per shard. With `local` (threads) and `processes`, at most one shard per device scores at once in the run;
with `dask` and `ray` the engine places each shard on a worker with a free GPU, so concurrency across the
cluster equals its GPUs. On every engine a shard owns its device on its host through the device's lock
(`batchinfer.devices.hold_device`), so runs sharing a host never share a device.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from batchinfer.config import RunConfig
from batchinfer.errors import ConfigError

TASKS_AHEAD = 3  # shard tasks started ahead of each device by the local engine


def task_runner(config: RunConfig, devices: int) -> TaskRunner:
    """A fresh task runner for the run's shards; a local process pool or cluster gets one worker per device."""
    compute, workers = config.compute, max(devices, 1)
    if compute.engine == "processes":
        return ProcessPoolTaskRunner(max_workers=workers, initializer=end_with_parent)
    if compute.engine == "dask":
        from prefect_dask import DaskTaskRunner

        if compute.engine_address:
            return DaskTaskRunner(address=compute.engine_address)
        cluster = {
            "n_workers": workers,
            "threads_per_worker": 1,
            "resources": {"GPU": 1},
            "dashboard_address": None,
            "env": worker_threads(workers),
        }
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)
    if compute.engine == "ray":
        from prefect_ray import RayTaskRunner

        if compute.engine_address:
            return RayTaskRunner(address=compute.engine_address)
        # A local Ray declares one GPU per device, so fake and CPU devices are placed like GPUs.
        return RayTaskRunner(init_kwargs={"num_gpus": workers, "include_dashboard": False})
    # Tasks ahead of each device: Prefect starts them (their states, their tag's check and the retries that
    # check can meet on SQLite) while the shards before them score; each then waits for a device inside
    # (`hold_device`). One ahead hides one retry; three hide two in a row (BENCHMARKS.md).
    return ThreadPoolTaskRunner(max_workers=(1 + TASKS_AHEAD) * workers)


def worker_threads(workers: int) -> dict[str, str]:
    """Torch threads for each of `workers` worker processes on one host: the cores split between them, as
    the local engine splits them between CPU devices (Ray sets OMP_NUM_THREADS in its workers itself)."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}


@contextlib.contextmanager
def one_gpu_per_shard(config: RunConfig, runner: TaskRunner) -> Iterator[None]:
    """Tasks submitted inside ask the engine for one GPU each (Dask's resources, Ray's num_gpus)."""
    engine = config.compute.engine
    if engine == "dask":
        import dask

        _require_gpus(engine, config, _dask_gpus(runner))
        with dask.annotate(resources={"GPU": 1}):
            yield
    elif engine == "ray":
        import ray
        from prefect_ray.context import remote_options

        _require_gpus(engine, config, ray.cluster_resources().get("GPU", 0))
        # max_calls=0: a worker process is kept across tasks, so it loads the model once (Ray's default for
        # GPU tasks starts a new process for each).
        with remote_options(num_gpus=1, num_cpus=0, max_calls=0):
            yield
    else:
        yield


def _dask_gpus(runner: Any) -> float:
    workers = runner.client.scheduler_info(n_workers=-1)["workers"].values()
    return sum(w.get("resources", {}).get("GPU", 0) for w in workers)


def _require_gpus(engine: str, config: RunConfig, gpus: float) -> None:
    """A shard that asks for a GPU no worker has would wait forever: refuse the run at once instead."""
    if gpus < 1:
        where = config.compute.engine_address or "the local cluster"
        how = "dask worker --resources GPU=1" if engine == "dask" else "ray start --num-gpus N"
        raise ConfigError(f"--engine {engine}: no worker of {where} offers a GPU; start workers with `{how}`")


def end_with_parent() -> None:
    """In each pool worker: end the worker when the flow's process is gone (a SIGKILL, an OOM kill), instead
    of scoring on for nobody. Waits on the parent's sentinel, which the kernel makes ready when it dies."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="batchinfer-parent-watch", daemon=True).start()
