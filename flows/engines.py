"""The task runner a run's shards go through, chosen by `compute.engine`.

Prefect's own runners do the scheduling; this only picks one and sizes it. With
`local` (threads) and `processes`, at most one shard per device runs at once in
the run, and a device is owned on the host by the shard that holds its lock
(`batchinfer.devices.hold_device`), so runs sharing a host never share a device.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from batchinfer.config import RunConfig


def task_runner(config: RunConfig, devices: int) -> TaskRunner:
    """A fresh task runner for the run's shards: one worker per device."""
    workers = max(devices, 1)
    if config.compute.engine == "processes":
        return ProcessPoolTaskRunner(max_workers=workers, initializer=end_with_parent)
    return ThreadPoolTaskRunner(max_workers=workers)


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
