"""Devices: discovery, ownership on the host (one running shard per device), and the per-process model cache.

A running shard owns its device through an exclusive `flock` on a per-host,
per-device lock file (`hold_device`): runs on one host never share a device,
and the kernel frees a device the moment its holder dies, however it dies.
Each process keeps one loaded model per device, reused across the shards it
runs there; all of a device's torch work runs on that device's own long-lived
thread (`DeviceWorkers`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import fcntl
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from batchinfer.errors import DeviceError, NoHealthyDevice, Stopped
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


# Where the NVIDIA driver lists the GPUs it drives (one folder per GPU), whatever torch can see.
NVIDIA_GPUS_DIR = "/proc/driver/nvidia/gpus"
_warned_unusable = False


def visible_nvidia_gpus() -> list[str]:
    """The GPUs the NVIDIA driver lists on this host (their PCI addresses), unless CUDA_VISIBLE_DEVICES hides them all."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return []
    try:
        return sorted(os.listdir(NVIDIA_GPUS_DIR))
    except OSError:
        return []


def _warn_if_gpus_unusable() -> None:
    """devices=auto on the CPU while the driver lists GPUs: say so once per process, with the likely reason."""
    global _warned_unusable
    gpus = visible_nvidia_gpus()
    if _warned_unusable or not gpus:
        return
    _warned_unusable = True
    build = torch.version.cuda
    why = "a CPU-only build" if not build else f"built for CUDA {build}, but torch.cuda.is_available() is False"
    log.warning(
        "--devices auto: the NVIDIA driver lists %d GPU(s) but torch %s cannot use them (%s); running on the CPU",
        len(gpus),
        torch.__version__,
        why,
    )


def discover(spec: str = "auto") -> list[Device]:
    """Resolve --devices: 'auto', a count, 'cpu', 'fake:N' or a list like 'cuda:0,cuda:2'."""
    spec = (spec or "auto").strip().lower()
    cuda = _cuda_names()
    if spec == "auto":
        if cuda:
            return [Device(n, n) for n in cuda]
        if _mps_available():
            return [Device("mps", "mps")]
        _warn_if_gpus_unusable()
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


def engine_assigned(devices: list[Device]) -> list[Device]:
    """On a Dask or Ray worker, the one device of `devices` the engine gave this worker; elsewhere all of them.

    Ray sets CUDA_VISIBLE_DEVICES for a task that asked for a GPU, so torch sees that GPU alone and there
    is nothing to choose; its GPU id picks among devices that torch cannot narrow (fake devices). A worker
    of a local Dask cluster is pinned by its number; a Dask worker started with CUDA_VISIBLE_DEVICES sees
    one GPU anyway.
    """
    index = _engine_index()
    if index is None or len(devices) <= 1:
        return devices
    return [devices[index % len(devices)]]


def _engine_index() -> int | None:
    ray = _loaded("ray")
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        ids = ray.get_gpu_ids()
        return int(ids[0]) if ids else None
    if _loaded("distributed") is not None:
        from distributed import get_worker

        try:
            name = get_worker().name
        except ValueError:  # not in a worker
            return None
        return name if isinstance(name, int) else None
    return None


def _loaded(name: str) -> types.ModuleType | None:
    """The module if it has run. prefect-ray imports ray lazily; touching that placeholder would import ray
    into every run, and from several shard threads at once fails on Python 3.11 (its LazyLoader is not
    thread-safe). A placeholder's type is LazyLoader's subclass, and asking for it does not load it."""
    module = sys.modules.get(name)
    return module if type(module) is types.ModuleType else None


def _count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise DeviceError(f"--devices {spec!r}: {text!r} is not a number") from None
    if count < 1:
        raise DeviceError(f"--devices {spec!r}: need at least one device")
    return count


# Per-host device locks live here. Override with BATCHINFER_LOCK_DIR, for example on a host whose /tmp is
# private per service: every process that may use the same GPUs must see the same folder.
LOCK_DIR_ENV = "BATCHINFER_LOCK_DIR"


def lock_dir() -> str:
    folder = os.environ.get(LOCK_DIR_ENV) or os.path.join(tempfile.gettempdir(), "batchinfer-devices")
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
        with contextlib.suppress(OSError):  # shared by every user of the host's GPUs
            os.chmod(folder, 0o1777)
    return folder


def device_key(device: Device) -> str:
    """What names a device on this host whatever CUDA_VISIBLE_DEVICES says: the GPU's UUID where torch has it."""
    if device.torch_name.startswith("cuda"):
        index = device.torch.index or 0
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            return f"cuda-{uuid}"
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return f"cuda-{visible[index] if index < len(visible) else index}"
    return device.name.replace(":", "-")


@dataclass
class Lease:
    """A device held by this shard: released by the kernel when the process ends, however it ends."""

    device: Device
    waited_seconds: float = 0.0
    waited_for: str = ""  # who held the device while this shard waited, as the lock file said


_RECORD_BYTES = 512


def _holder(fd: int) -> str:
    """The holder a lock file names ('pid 123 on host, shard ..., run ...'), or '' when unknown."""
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict) or "pid" not in info:
        return ""
    parts = [f"pid {info.get('pid')} on {info.get('host')}", f"shard {info.get('shard')}"]
    if info.get("run"):
        parts.append(str(info["run"]))
    return ", ".join(parts)


def _open_lock(device: Device) -> int:
    path = os.path.join(lock_dir(), device_key(device) + ".lock")
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock needs no write access
        return os.open(path, os.O_RDONLY)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def hold_device(
    devices: list[Device],
    shard_id: str,
    *,
    run: str = "",
    prefer: Sequence[str] = (),
    broken: Callable[[], Mapping[str, str]] | None = None,
    on_wait: Callable[[str], None],
) -> Iterator[Lease]:
    """Own one of `devices` for a shard, through an exclusive `flock` on the device's lock file on this host.

    A free device is taken at once, those in `prefer` (say, with the model already loaded here) first.
    When every device is held, by this run or by another process, the shard takes the first of them to
    come free, and `on_wait` is told which devices and who holds each. flock, not lockf: it also excludes
    other threads of this process, and the kernel drops it the moment the holder dies, so a killed run
    leaks nothing.
    Devices that `broken()` names (name -> why) have left this process's pool and are never taken, also
    when one leaves while the shard waits for it; when that is every device, `NoHealthyDevice` says why.
    """
    while True:
        fd, lease = _take(devices, shard_id, prefer, dict(broken() if broken else {}), on_wait)
        if not (broken and lease.device.name in broken()):
            break
        os.close(fd)  # the device left the pool while this shard waited for it: choose again
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "shard": shard_id, "run": run, "since": time.time()}
        with contextlib.suppress(OSError):  # a read-only lock file still locks; it just names no holder
            # One write over the old record, padded, never an empty file: a shard reading it meanwhile
            # sees the old holder or the new one.
            record = json.dumps(info).encode().ljust(_RECORD_BYTES)
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
        yield lease
    finally:
        os.close(fd)  # closing the only descriptor drops its flock


def _take(
    devices: list[Device],
    shard_id: str,
    prefer: Sequence[str],
    broken: Mapping[str, str],
    on_wait: Callable[[str], None],
) -> tuple[int, Lease]:
    """Lock one healthy device (waiting when all are held): its lock's descriptor and the lease."""
    healthy = [d for d in devices if d.name not in broken]
    if not healthy:
        reasons = "; ".join(f"{d.name}: {broken[d.name]}" for d in devices)
        raise NoHealthyDevice(f"every device left the pool in this process ({reasons})")
    ordered = sorted(healthy, key=lambda d: d.name not in prefer)
    fds = {d.name: _open_lock(d) for d in ordered}
    lease: Lease | None = None
    try:
        for device in ordered:
            if _try_lock(fds[device.name]):
                lease = Lease(device)
                break
        if lease is None:
            holders = {name: _holder(fd) for name, fd in fds.items()}
            waiting = "; or ".join(f"{name}, held by {who or 'another process'}" for name, who in holders.items())
            on_wait(f"shard {shard_id} is waiting for {waiting}")
            started = time.perf_counter()
            name = _wait_for_any(fds, shard_id)
            device = next(d for d in ordered if d.name == name)
            # Unnamed when the wait began (a read-only lock file): the record the last holder left.
            lease = Lease(device, round(time.perf_counter() - started, 3), holders[name] or _holder(fds[name]))
        return fds.pop(lease.device.name), lease
    finally:
        for other in fds.values():
            os.close(other)


_stopping = threading.Event()
_waiting: set[threading.Event] = set()
_waiting_lock = threading.Lock()


def stop() -> None:
    """This process is stopping (an interrupt, a cancelled run): shards waiting for a device give up
    (`Stopped`) now, and `stopping()` tells scoring to stop, until `resume()`."""
    with _waiting_lock:
        _stopping.set()
        for wake in _waiting:
            wake.set()


def stopping() -> bool:
    return _stopping.is_set()


def resume() -> None:
    """A new run starts in this process: scoring may go on, and every device is in the pool again."""
    _stopping.clear()
    WORKERS.forget_broken()


def _wait_for_any(fds: dict[str, int], shard_id: str) -> str:
    """Block until the first of the locks in `fds` is ours and return its device's name (its descriptor
    left in `fds`), or raise `Stopped` on `stop()`.

    Each blocking flock runs on a daemon thread, so a stopping process never waits for another run's
    shard to end. A thread whose lock comes after another one won, or after the shard gave up, drops it at once.
    """
    wake, state = threading.Event(), {"winner": "", "gave_up": False}
    guard = threading.Lock()
    waiting = {name: fds.pop(name) for name in list(fds)}

    def take(name: str, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with guard:
            if state["winner"] or state["gave_up"]:
                os.close(fd)  # drops the lock it just got
                return
            state["winner"] = name
        wake.set()

    with _waiting_lock:
        if _stopping.is_set():
            for fd in waiting.values():
                os.close(fd)
            raise Stopped(f"shard {shard_id} did not start: the run is stopping")
        _waiting.add(wake)
    try:
        for name, fd in waiting.items():
            threading.Thread(target=take, args=(name, fd), name=f"batchinfer-wait-{name}", daemon=True).start()
        wake.wait()
    finally:
        with _waiting_lock:
            _waiting.discard(wake)
    with guard:
        if not state["winner"]:
            state["gave_up"] = True
            raise Stopped(f"shard {shard_id} did not start: the run is stopping")
        winner = str(state["winner"])
    fds[winner] = waiting[winner]
    return winner


def use_device(device: Device) -> None:
    """Make `device` this thread's current CUDA device, so that work a model starts without naming a device
    (`.cuda()`, `torch.empty(..., device="cuda")`) lands on the device the shard holds, not on cuda:0."""
    if device.torch_name.startswith("cuda"):
        torch.cuda.set_device(device.torch)


class DeviceWorkers:
    """Per process: each device's own long-lived thread, and the model loaded on each device.

    A model is loaded once per process and device and reused by every shard that process runs there;
    loading a different model on that device replaces it. This is a cache, not a schedule: which shard
    runs where is decided by `hold_device` and the task runner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, tuple[str, Predictor]] = {}
        self._model_locks: dict[str, threading.Lock] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        # run -> device name -> (why it left the pool, the shards that failed there). Per run, because a
        # long-lived worker process (Dask, Ray) serves many runs: a device whose model failed to load for
        # one run may serve the next, and one whose CUDA context broke fails the next run's first shard
        # on it at once and leaves that run's pool too.
        self._broken: dict[str, dict[str, tuple[str, set[str]]]] = {}
        self.loads: list[tuple[str, str]] = []

    def broken(self, run: str = "") -> dict[str, str]:
        """Devices that left this process's pool in `run`, and why."""
        with self._lock:
            return {name: why for name, (why, _) in self._broken.get(run, {}).items()}

    def mark_broken(self, device: Device, why: str, shard_id: str, run: str = "") -> None:
        """`device` takes no more shards of `run` in this process (its CUDA context, or its model, is unusable)."""
        with self._lock:
            if run not in self._broken and len(self._broken) >= 16:
                self._broken.pop(next(iter(self._broken)))  # the oldest run's record
            devices = self._broken.setdefault(run, {})
            first = device.name not in devices
            devices.setdefault(device.name, (why, set()))[1].add(shard_id)
            self._models.pop(device.name, None)
        if first:
            log.warning("%s left the pool of pid %d: %s", device.name, os.getpid(), why)

    def broke_under(self, shard_id: str, run: str = "") -> dict[str, str]:
        """The devices that left the pool while scoring `shard_id`, and why (for that shard's record)."""
        with self._lock:
            return {name: why for name, (why, shards) in self._broken.get(run, {}).items() if shard_id in shards}

    def forget_broken(self) -> None:
        """A new run in this process: every device is in the pool again."""
        with self._lock:
            self._broken.clear()

    def loaded(self, spec: ModelSpec) -> list[str]:
        """Devices on which this process holds `spec` already."""
        with self._lock:
            return [name for name, (fingerprint, _) in self._models.items() if fingerprint == spec.fingerprint]

    def run(self, device: Device, fn: Callable[[], T]) -> T:
        """Run `fn` on the device's own long-lived thread, with the caller's torch thread count and context.

        Shards arrive on whichever thread the task runner picked, but libgomp keeps one thread team for
        every thread that ever ran a parallel torch op; once team threads outnumber the cores it stops
        spinning between ops, and each op waits for sleeping threads to wake (BENCHMARKS.md). One thread
        per device keeps one team per device.
        """
        with self._lock:
            executor = self._threads.get(device.name)
            if executor is None:
                executor = ThreadPoolExecutor(
                    max_workers=1,
                    thread_name_prefix=f"batchinfer-{device.name}",
                    initializer=use_device,
                    initargs=(device,),
                )
                self._threads[device.name] = executor
                self._model_locks[device.name] = threading.Lock()
        threads = torch.get_num_threads()  # what configure_threads set for the caller
        context = contextvars.copy_context()  # the run's logging context follows the work

        def call() -> T:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return context.run(fn)

        return executor.submit(call).result()

    def model(self, device: Device, spec: ModelSpec) -> tuple[Predictor, bool]:
        """The model loaded on `device` (loading it at most once); returns (predictor, loaded_now)."""
        with self._lock:
            lock = self._model_locks.setdefault(device.name, threading.Lock())
        with lock:
            cached = self._models.get(device.name)
            if cached and cached[0] == spec.fingerprint:
                return cached[1], False
            self._models.pop(device.name, None)
            log.info("loading model %s on %s (pid %d)", spec.name, device.name, os.getpid())
            predictor = spec.load(device.torch)
            with self._lock:
                self._models[device.name] = (spec.fingerprint, predictor)
            self.loads.append((device.name, spec.fingerprint))
            return predictor, True


WORKERS = DeviceWorkers()


_MALLOC_SET = False
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's own ceiling: 32 MiB on 64 bits
# Setting any of these turns glibc's dynamic mmap threshold off for the process (mallopt(3)).
_FIXED_THRESHOLDS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_malloc(arenas: int = 2) -> None:
    """Tune glibc's malloc once per process, so memory stays flat and buffers are reused across batches.

    - Arenas: every shard reads and writes in short-lived threads; glibc gives threads their own arenas
      (up to 8 per core) and keeps what they freed, so the process grew with the number of shards. Capped
      unless MALLOC_ARENA_MAX is set.
    - The mmap threshold: where the environment fixes a threshold (Dask's nanny gives its workers
      MALLOC_TRIM_THRESHOLD_), glibc stops raising its mmap threshold from 128 KiB, so every batch's
      buffers above that are mapped, faulted in and unmapped anew, and a Dask worker's shards ran far
      slower (BENCHMARKS.md, "Engines"). Then set it to glibc's dynamic ceiling, unless
      MALLOC_MMAP_THRESHOLD_ is set; Dask's trimming is kept.

    A no-op where glibc is absent.
    """
    global _MALLOC_SET
    if _MALLOC_SET or not sys.platform.startswith("linux"):
        return
    _MALLOC_SET = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not os.environ.get("MALLOC_ARENA_MAX"):
            libc.mallopt(_M_ARENA_MAX, arenas)
        if any(os.environ.get(name) for name in _FIXED_THRESHOLDS) and not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    except (OSError, AttributeError):
        pass


_IMPORTS_FROZEN = False


def freeze_imports() -> None:
    """Once per process, once torch and Prefect are imported: move every object alive now out of the
    garbage collector's sight. Modules live as long as the process, yet each full collection during the
    run, and those of Python's finalization at exit, would walk their hundreds of thousands of objects
    again (BENCHMARKS.md, "Start-up"). Once only: a later call would also hide what has become garbage."""
    global _IMPORTS_FROZEN
    if not _IMPORTS_FROZEN:
        _IMPORTS_FROZEN = True
        gc.freeze()


def configure_threads(devices: list[Device], cpu_threads: int | None) -> None:
    """Split the cores between CPU devices that run at once (fake devices in tests share the CPU)."""
    tune_malloc()
    cpu_devices = sum(1 for d in devices if not d.is_accelerator)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    elif cpu_devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_devices))
