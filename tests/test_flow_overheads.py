"""What the flow does to keep Prefect's own bookkeeping off the time a run takes."""

from __future__ import annotations

import logging
import threading

import prefect.flow_engine

from flows.batch_inference import end_runs_without_waiting_for_the_heartbeat


class _Engine:
    """Just what prefect.flow_engine._send_heartbeats asks of a flow run engine."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger("test-heartbeats")

    def __init__(self) -> None:
        self.beats = 0

    def _build_heartbeat_event_template(self):
        return {}, []

    def _emit_flow_run_heartbeat(self, resource, related) -> None:
        self.beats += 1


def test_a_finished_run_does_not_wait_for_the_heartbeat_thread_and_the_thread_still_stops():
    assert end_runs_without_waiting_for_the_heartbeat()  # importing flows.batch_inference did this already
    assert end_runs_without_waiting_for_the_heartbeat()  # and doing it again changes nothing
    engine = _Engine()
    before = set(threading.enumerate())
    with prefect.flow_engine._send_heartbeats(engine):  # as the sync engine calls it
        started = set(threading.enumerate()) - before
        (heartbeat,) = [t for t in started if getattr(getattr(t, "_target", None), "__name__", "") == "run"]
    assert heartbeat.is_alive()  # the run goes on while the thread still sleeps (Prefect joined it here)
    heartbeat.join(timeout=3)
    assert not heartbeat.is_alive()  # it ends at its next wake
    assert engine.beats == 1  # heartbeats while the run went on are unchanged
