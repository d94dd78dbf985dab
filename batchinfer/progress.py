"""Progress events from the core, for whoever listens (the CLI's bar, the flow's artifacts).

The core calls `emit`; listeners must be cheap and thread-safe (shards run in threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    kind: str  # "plan", "rows", "shard_done", "shard_failed", "shard_skipped"
    shard_id: str = ""
    rows: int = 0
    total_rows: int = 0
    total_shards: int = 0


_listeners: list[Callable[[Event], None]] = []
_lock = threading.Lock()


def subscribe(listener: Callable[[Event], None]) -> Callable[[], None]:
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def emit(event: Event) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - a broken listener must not fail a shard
            pass
