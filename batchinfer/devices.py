"""Devices: discovery, a lending pool (one device per running shard), and per-device model cache.

Each running shard borrows exactly one device from the pool and gives it back
in `finally`, so an exception mid-shard cannot leak it. Each device keeps one
loaded model, reused across the shards it runs; loading a different model on
that device replaces it. All of a device's torch work runs on that device's
own long-lived thread (`DevicePool.run`).
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from batchinfer.errors import DeviceError
from batchinfer.models.base import ModelSpec, Predictor

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Device:
    """A device a shard can hold: `name` is what reports show, `torch_name` what torch gets."""

    name: str
    torch_name: str

    @property
    def torch(self) -> torch.device:
        return torch.device(self.torch_name)

    @property
    def is_accelerator(self) -> bool:
        return self.torch_name.startswith(("cuda", "mps"))


def _cuda_names() -> list[str]:
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def discover(spec: str = "auto") -> list[Device]:
    """Resolve --devices: 'auto', a count, 'cpu', 'fake:N' or a list like 'cuda:0,cuda:2'."""
    spec = (spec or "auto").strip().lower()
    cuda = _cuda_names()
    if spec == "auto":
        if cuda:
            return [Device(n, n) for n in cuda]
        if _mps_available():
            return [Device("mps", "mps")]
        return [Device("cpu", "cpu")]
    if spec == "cpu":
        return [Device("cpu", "cpu")]
    if spec.startswith("fake:"):
        count = _count(spec.removeprefix("fake:"), spec)
        return [Device(f"fake:{i}", "cpu") for i in range(count)]
    if spec.isdigit() or (spec.startswith("-") and spec[1:].isdigit()):
        count = _count(spec, spec)
        if cuda:
            if count > len(cuda):
                raise DeviceError(f"--devices {count}: only {len(cuda)} CUDA device(s) are visible ({', '.join(cuda)})")
            return [Device(n, n) for n in cuda[:count]]
        if count == 1:
            return [Device("mps", "mps")] if _mps_available() else [Device("cpu", "cpu")]
        raise DeviceError(f"--devices {count}: no accelerator is visible on this machine; use --devices cpu")
    devices = []
    for name in (part.strip() for part in spec.split(",")):
        if name.startswith("cuda:") and name[5:].isdigit():
            if name not in cuda:
                seen = ", ".join(cuda) if cuda else "none"
                raise DeviceError(f"--devices: {name} does not exist (visible CUDA devices: {seen})")
        elif name == "mps":
            if not _mps_available():
                raise DeviceError("--devices: mps is not available on this machine")
        elif name != "cpu":
            raise DeviceError(f"--devices: {name!r} is not a device (use auto, N, cpu or cuda:I[,cuda:J])")
        if any(d.name == name for d in devices):
            raise DeviceError(f"--devices: {name} is listed twice")
        devices.append(Device(name, name))
    return devices


def _count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise DeviceError(f"--devices {spec!r}: {text!r} is not a number") from None
    if count < 1:
        raise DeviceError(f"--devices {spec!r}: need at least one device")
    return count


@dataclass
class LeaseRecord:
    device: str
    shard_id: str
    start: float
    end: float = 0.0


@dataclass
class DevicePool:
    """Lends each device to one shard at a time."""

    devices: list[Device]
    _free: queue.Queue = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _models: dict[str, tuple[str, Predictor]] = field(default_factory=dict, init=False, repr=False)
    _model_locks: dict[str, threading.Lock] = field(default_factory=dict, init=False, repr=False)
    _threads: dict[str, ThreadPoolExecutor] = field(default_factory=dict, init=False, repr=False)
    held: dict[str, str] = field(default_factory=dict, init=False)
    history: list[LeaseRecord] = field(default_factory=list, init=False)
    loads: list[tuple[str, str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._free = queue.Queue()
        for device in self.devices:
            self._free.put(device)
            self._model_locks[device.name] = threading.Lock()

    @contextmanager
    def lease(self, shard_id: str, timeout: float | None = None) -> Iterator[Device]:
        """Borrow a device for one shard; it goes back whatever happens."""
        try:
            device = self._free.get(timeout=timeout)
        except queue.Empty:
            raise DeviceError(f"no device became free within {timeout} s for shard {shard_id}") from None
        record = LeaseRecord(device.name, shard_id, time.monotonic())
        with self._lock:
            if device.name in self.held:
                raise RuntimeError(f"device {device.name} lent twice")  # a bug, never user input
            self.held[device.name] = shard_id
            self.history.append(record)
        try:
            yield device
        finally:
            record.end = time.monotonic()
            with self._lock:
                self.held.pop(device.name, None)
            self._free.put(device)

    def start(self, device: Device, fn: Callable[[], T]) -> Future[T]:
        """Start `fn` on the device's own long-lived thread, with the caller's torch thread count and context.

        Shards arrive on whichever thread the scheduler picked, but libgomp keeps one thread team for
        every thread that ever ran a parallel torch op; once team threads outnumber the cores it stops
        spinning between ops, and each op then waits for sleeping threads to wake. Measured on 2 cores:
        a 1,000,000-row MLP shard took 1.6 s at 3.1 CPU-s with one team, 1.8 s at 2.8 CPU-s with a
        second, idle team alive. One thread per device keeps one team per device.
        """
        with self._lock:
            executor = self._threads.get(device.name)
            if executor is None:
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batchinfer-{device.name}")
                self._threads[device.name] = executor
        threads = torch.get_num_threads()  # what configure_threads set for the caller
        context = contextvars.copy_context()  # the run's logging context follows the work

        def call() -> T:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return context.run(fn)

        return executor.submit(call)

    def run(self, device: Device, fn: Callable[[], T]) -> T:
        """`start` and wait for the result (or the exception)."""
        return self.start(device, fn).result()

    def model(self, device: Device, spec: ModelSpec) -> tuple[Predictor, bool]:
        """The model loaded on `device` (loading it at most once); returns (predictor, loaded_now)."""
        with self._model_locks[device.name]:
            cached = self._models.get(device.name)
            if cached and cached[0] == spec.fingerprint:
                return cached[1], False
            self._models.pop(device.name, None)
            log.info("loading model %s on %s", spec.name, device.name)
            predictor = spec.load(device.torch)
            self._models[device.name] = (spec.fingerprint, predictor)
            self.loads.append((device.name, spec.fingerprint))
            return predictor, True


_POOLS: dict[tuple[str, ...], DevicePool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(devices: list[Device]) -> DevicePool:
    """The process-wide pool for this set of devices (models stay warm across runs in one process)."""
    key = tuple(d.name for d in devices)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = DevicePool(list(devices))
        return pool


_ARENAS_LIMITED = False
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas so memory stays flat across shards.

    Every shard reads and writes in short-lived threads; glibc gives threads their own arenas
    (up to 8 per core) and keeps what they freed, so the process grew with the number of shards.
    Set once per process; a no-op where glibc is absent or MALLOC_ARENA_MAX is already set.
    """
    global _ARENAS_LIMITED
    if _ARENAS_LIMITED or os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    _ARENAS_LIMITED = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def configure_threads(devices: list[Device], cpu_threads: int | None) -> None:
    """Split the cores between CPU devices that run at once (fake devices in tests share the CPU)."""
    limit_malloc_arenas()
    cpu_devices = sum(1 for d in devices if not d.is_accelerator)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    elif cpu_devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_devices))
