"""One run at a time per output: a lock that a crashed holder cannot leave stuck.

On a local disk the lock is an exclusive `flock` on OUTPUT/.batchinfer.lock: the kernel drops it the
instant its holder dies, however it dies. On an object store it is a lease: the object
OUTPUT/.batchinfer.lock is created only where none exists (S3's If-None-Match), names its holder and an
expiry, and is renewed while the run lives (If-Match on the version the holder wrote last). A holder
that dies stops renewing, and the next run takes the lease over once it has run out (at once when the
dead holder ran on the same host: its process is visibly gone). Either way a
second run is refused at once, with a line naming the run that holds the output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from batchinfer.errors import BatchInferError, OutputInUseError, ValidationError
from batchinfer.storage import Storage

log = logging.getLogger(__name__)

LOCK_NAME = ".batchinfer.lock"
# How long a killed holder can keep an output on an object store from the next run; renewed 4 times as often.
LEASE_SECONDS = 60.0

_held: dict[str, OutputLock] = {}  # by run id: what merge checks before `_SUCCESS`
_local_fds: set[int] = set()


def _close_in_child() -> None:
    # A forked worker must not keep the lock alive after the run's process has died.
    for fd in list(_local_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _local_fds.clear()
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def lock_uri(output_uri: str) -> str:
    return Storage.join(output_uri, LOCK_NAME)


def _describe(info: dict[str, Any]) -> str:
    """'flow run 'x' (pid 12 on host, since 2026-12-01 22:09:01 UTC)' from what a holder wrote."""
    since = info.get("since")
    when = dt.datetime.fromtimestamp(since, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if since else "?"
    who = info.get("run") or f"run {info.get('run_id', '?')}"
    return f"{who} (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {when})"


def _in_use(output_uri: str, info: dict[str, Any] | None, lease: bool) -> OutputInUseError:
    holder = _describe(info) if info else "another run"
    if lease and info and info.get("expires"):
        until = dt.datetime.fromtimestamp(info["expires"], dt.UTC).strftime("%H:%M:%S UTC")
        holder += f", lease renewed until {until}"
    return OutputInUseError(
        f"--output {output_uri} is in use by {holder}; wait for that run to end or pick another output",
        uri=output_uri,
    )


class OutputLock:
    """This run's hold on an output: `check()` raises once it is no longer ours."""

    def __init__(self, storage: Storage, output_uri: str, run_id: str, run: str):
        self.storage, self.output_uri, self.run_id, self.run = storage, output_uri, run_id, run
        self.uri = lock_uri(output_uri)
        self._fd: int | None = None
        self._version = ""
        self._expires = 0.0
        self._lost = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _info(self, expires: float | None = None) -> dict[str, Any]:
        info = {"run_id": self.run_id, "run": self.run, "pid": os.getpid(), "host": socket.gethostname()}
        info["since"], info["started"] = self._since, _start_time(os.getpid())
        if expires is not None:
            info["expires"] = expires
        return info

    # -- taking and giving back -----------------------------------------------------
    def acquire(self) -> None:
        self._since = time.time()
        if self.storage.is_local:
            self._acquire_local()
        else:
            self._acquire_lease()
        _held[self.run_id] = self

    def release(self) -> None:
        _held.pop(self.run_id, None)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _local_fds.discard(fd)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._version and not self._lost:
            with contextlib.suppress(BatchInferError):
                self.storage.remove_if(self.uri, self._version)

    def check(self) -> None:
        """Raise when this run no longer holds the output (its lease ran out or another run took it)."""
        if self._fd is not None:
            return
        if not self._lost and time.time() >= self._expires:
            self._lost = "its lease ran out before it was renewed"
        if self._lost:
            raise ValidationError(
                f"this run lost its hold on --output {self.output_uri} ({self._lost}); "
                f"nothing was marked as succeeded: rerun the same command",
                uri=self.output_uri,
            )

    # -- a local disk: flock ------------------------------------------------------------
    def _acquire_local(self) -> None:
        path = self.storage.path(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_fd(fd)
            os.close(fd)
            raise _in_use(self.output_uri, info, lease=False) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _local_fds.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._info()).encode(), 0)

    # -- an object store: a lease ---------------------------------------------------------
    def _body(self, expires: float) -> bytes:
        # A fresh nonce each time: the version tag (an MD5 on S3) then changes with every renewal.
        return json.dumps({**self._info(expires), "nonce": uuid.uuid4().hex}).encode()

    def _acquire_lease(self) -> None:
        expires = time.time() + LEASE_SECONDS
        version = self.storage.create_new(self.uri, self._body(expires))
        if version is None:
            version = self._take_over_expired(expires)
        self._version, self._expires = version, expires
        self._renewer = threading.Thread(target=self._renew, name="batchinfer-output-lease", daemon=True)
        self._renewer.start()

    def _take_over_expired(self, expires: float) -> str:
        current = self.storage.read_versioned(self.uri)
        if current is None:  # given back in between: try once more
            version = self.storage.create_new(self.uri, self._body(expires))
            if version is not None:
                return version
            raise _in_use(self.output_uri, None, lease=True)
        data, version = current
        info = _parse(data)
        if _live_lease(info):
            raise _in_use(self.output_uri, info, lease=True)
        taken = self.storage.replace_if(self.uri, self._body(expires), version)
        if taken is None:  # another run took it first
            latest = self.storage.read_versioned(self.uri)
            raise _in_use(self.output_uri, _parse(latest[0]) if latest else None, lease=True)
        log.warning("took over the lease on %s from %s, which ended", self.output_uri, _describe(info or {}))
        return taken

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            expires = time.time() + LEASE_SECONDS
            try:
                version = self.storage.replace_if(self.uri, self._body(expires), self._version)
            except BatchInferError as exc:  # a passing outage: try at the next beat, while the lease lasts
                log.warning("could not renew the lease on %s: %s", self.output_uri, exc)
                continue
            if version is None:
                self._lost = "another run took the lease over"
                return
            self._version, self._expires = version, expires


def _start_time(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, from /proc), or '' where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _dead_here(info: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone (or whose pid now names another process)."""
    if info.get("host") != socket.gethostname() or not info.get("pid"):
        return False
    started = _start_time(int(info["pid"]))
    return not started or bool(info.get("started")) and started != info["started"]


def _live_lease(info: dict[str, Any] | None) -> bool:
    """A lease that still holds: not run out, and not held by a process of this host that has died."""
    return info is not None and float(info.get("expires") or 0) > time.time() and not _dead_here(info)


def _read_fd(fd: int) -> dict[str, Any] | None:
    try:
        return _parse(os.pread(fd, 4096, 0))
    except OSError:
        return None


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(data or b"null")
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def hold_output(
    output_uri: str, storage_options: dict[str, Any], *, run: str, run_id: str | None = None
) -> Iterator[OutputLock]:
    """Hold the output for this run, or raise `OutputInUseError` naming the run that holds it."""
    lock = OutputLock(Storage(output_uri, storage_options), output_uri.rstrip("/"), run_id or uuid.uuid4().hex, run)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def holder(output_uri: str, storage_options: dict[str, Any]) -> str | None:
    """Who holds the output now ('flow run ... (pid ...)'), or None when no run does."""
    storage = Storage(output_uri, storage_options)
    uri = lock_uri(output_uri.rstrip("/"))
    if storage.is_local:
        path = storage.path(uri)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_fd(fd)
                return _describe(info) if info else "another run"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)
    current = storage.read_versioned(uri)
    info = _parse(current[0]) if current else None
    return _describe(info) if _live_lease(info) else None


def check_free(output_uri: str, storage_options: dict[str, Any]) -> None:
    """Refuse at once when another run holds the output (checked again, for good, when the run takes it)."""
    storage = Storage(output_uri, storage_options)
    uri = lock_uri(output_uri.rstrip("/"))
    if storage.is_local:
        found = holder(output_uri, storage_options)
        if found is not None:
            info = None if found == "another run" else _read_info(storage.path(uri))
            raise _in_use(output_uri.rstrip("/"), info, lease=False)
        return
    current = storage.read_versioned(uri)
    info = _parse(current[0]) if current else None
    if _live_lease(info):
        raise _in_use(output_uri.rstrip("/"), info, lease=True)


def _read_info(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            return _parse(handle.read(4096))
    except OSError:
        return None


def verify(run_id: str) -> None:
    """Before `_SUCCESS`: raise if this process took the output for run `run_id` and has lost it since."""
    lock = _held.get(run_id)
    if lock is not None:
        lock.check()
