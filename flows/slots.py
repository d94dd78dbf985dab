"""Device slots shared by every run on one Prefect server: a global concurrency limit of N slots.

The flow thread takes one slot before it lets a shard start and, when the shard's task has
finished, hands the slot to the next shard of the run or gives it back (without waiting for the
server), so at most N shards run at once across all runs that use the same limit.

Why not a tag concurrency limit on the task: on Prefect 3.9 a task that waits for a `tag:`
slot is admitted about 2 s after the previous holder finished (measured here, every shard,
even with a free slot), which cost a 1,000,000-row MLP shard half its time on 2 cores. Slots
taken directly from the flow thread are granted in a few milliseconds. The inference task
keeps its `gpu` tag for the UI and for any limit a user adds on it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectAlreadyExists

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # the server's minimum; a killed process frees its slots when the lease runs out
QUICK_RETRIES = 50


class DeviceSlots:
    """Take and give back slots of the global concurrency limit `name` (created or resized to `limit`)."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        self._leases: set[UUID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = get_client(sync_client=True)
        self._client.__enter__()
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="batchinfer-slot-release")
        self._ensure_limit()
        self._renewer = threading.Thread(target=self._renew, name="batchinfer-slot-leases", daemon=True)
        self._renewer.start()

    def _ensure_limit(self) -> None:
        """Create the limit or resize it to `limit`.

        Prefect's upsert reads, then creates: two runs starting together can both find no limit,
        and the slower create fails with ObjectAlreadyExists. The limit exists then, so upsert
        again, which now reads it and resizes it if needed.
        """
        for attempt in range(3):
            try:
                self._client.upsert_global_concurrency_limit_by_name(self.name, self.limit)
                return
            except ObjectAlreadyExists:
                if attempt == 2:
                    raise

    def try_take(self) -> UUID | None:
        """A slot's lease id, or None when every slot is held (by this run or others)."""
        response = self._post(
            "/v2/concurrency_limits/increment-with-lease",
            {"names": [self.name], "slots": 1, "mode": "concurrency", "lease_duration": LEASE_SECONDS},
        )
        if response.status_code == 423:
            return None
        response.raise_for_status()
        lease_id = UUID(response.json()["lease_id"])
        with self._lock:
            self._leases.add(lease_id)
        return lease_id

    def give_back(self, lease_id: UUID) -> None:
        """Release a slot without waiting for the server: the flow goes on at once (close() waits)."""
        with self._lock:
            self._leases.discard(lease_id)
        self._releaser.submit(self._release, lease_id)

    def _release(self, lease_id: UUID) -> None:
        try:  # on failure the lease runs out on its own (LEASE_SECONDS); only other runs wait longer
            response = self._post("/v2/concurrency_limits/decrement-with-lease", {"lease_id": str(lease_id)})
            if response.status_code >= 400:
                log.warning("could not give back slot lease %s: HTTP %d", lease_id, response.status_code)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not give back slot lease %s: %s", lease_id, exc)

    def _post(self, path: str, body: dict) -> httpx.Response:
        """POST with quick retries of SQLite's "database is locked" (503).

        Prefect's client waits 2 s, then 4 s, before retrying a 503; on a SQLite-backed server a slot
        request meets one whenever a task run commits at the same moment, and the next shard would
        start seconds late. The lock clears within milliseconds, so retry after a few.
        """
        http = self._client._client  # the client's own httpx session: base URL, auth and headers
        for attempt in range(QUICK_RETRIES):
            response = httpx.Client.send(http, http.build_request("POST", path, json=body))
            if response.status_code != 503:
                return response
            time.sleep(0.02 * (attempt + 1))
        return response

    def close(self) -> None:
        """Stop renewing and give back every slot still held, without waiting for the server.

        The releases and the client's shutdown run on the release thread, which the interpreter
        joins before it exits: a process that ends normally leaves no slot held.
        """
        self._stop.set()
        with self._lock:
            leases = list(self._leases)
            self._leases.clear()
        for lease_id in leases:
            self._releaser.submit(self._release, lease_id)
        self._releaser.submit(self._finish)
        self._releaser.shutdown(wait=False)

    def _finish(self) -> None:
        self._renewer.join(timeout=5)
        self._client.__exit__(None, None, None)

    def __enter__(self) -> DeviceSlots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _renew(self) -> None:
        with get_client(sync_client=True) as client:
            while not self._stop.wait(LEASE_SECONDS / 4):
                with self._lock:
                    leases = list(self._leases)
                for lease_id in leases:
                    try:
                        client.renew_concurrency_lease(lease_id=lease_id, lease_duration=LEASE_SECONDS)
                    except Exception:  # noqa: BLE001 - retried at the next tick
                        pass
