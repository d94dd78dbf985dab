"""The core's INFO lines in the run's log, from the flow's process and from the engines' workers.

PREFECT_LOGGING_EXTRA_LOGGERS=batchinfer gives the `batchinfer` logger Prefect's API handler but leaves its
level unset, so INFO records would stop at the root logger's WARNING. Both helpers give it the level Prefect
gives its own extra loggers (PREFECT_LOGGING_LEVEL).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from prefect.context import FlowRunContext

CORE = logging.getLogger("batchinfer")


def _take_run_level() -> None:
    if CORE.level == logging.NOTSET and CORE.handlers:
        CORE.setLevel(logging.getLogger("prefect.extra").level or logging.INFO)


@contextlib.contextmanager
def core_logs_in_flow() -> Iterator[None]:
    """While the flow runs, in its own process; the old level comes back after it, as outside a run the
    API handler has nowhere to send the lines."""
    previous = CORE.level
    _take_run_level()
    try:
        yield
    finally:
        CORE.setLevel(previous)


@contextlib.contextmanager
def core_logs_in_worker() -> Iterator[None]:
    """Around a task in a worker of a process pool, Dask or Ray; nothing in the flow's own process.

    A worker keeps the level once set (only tasks log there). Prefect sends logs in batches and does not
    flush a remote worker's at the end of a task, and an engine may stop its workers right after the last
    one, so the task flushes them itself.
    """
    context = FlowRunContext.get()
    if context is None or not context.detached:  # the flow's own process
        yield
        return
    _take_run_level()
    try:
        yield
    finally:
        for handler in CORE.handlers:
            handler.flush()
