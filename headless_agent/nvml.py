"""The NVML GpuBackend: real NVIDIA GPUs, read once per tick with a deadline.

Each GPU has its own daemon worker thread and every NVML call for that GPU runs
there, so a call that hangs on a dying GPU stalls only that GPU: the tick
returns at its deadline with the other GPUs' samples, and the stuck GPU counts
a failed read each tick until it answers again. Daemon threads (not a
ThreadPoolExecutor, whose threads are joined at exit) so that a call stuck in
the driver never keeps the agent from exiting.

"Sleep" is the one power saving NVML offers per GPU: the power limit lowered
to its minimum (there is no per-GPU power-off), restored on wake. The GPU keeps
that limit when the agent stops, so the state is read back from the GPU at start:
a GPU whose limit is at its minimum, below its default, is reported sleeping, and
waking a GPU whose earlier limit is not known restores NVML's default limit.
"""

from __future__ import annotations

import functools
import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from aether_protocol import GpuSample
from aether_protocol.messages import GpuState
from headless_agent.backend import BackendError, PartialControlError, resolve_gpus
from headless_agent.nvml_query import (
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    UNSUPPORTED_CODES,
    DeviceReader,
    GpuLostError,
    NvmlCallError,
    NvmlQuery,
    ReadResult,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_READ_TIMEOUT_S = 0.5
DEFAULT_CONTROL_TIMEOUT_S = 5.0
DEFAULT_FAIL_THRESHOLD = 3


class _Worker:
    """One daemon thread running a GPU's NVML calls in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        return fut

    def stop(self, join_s: float) -> None:
        self._jobs.put(None)
        self._thread.join(join_s)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue  # the caller gave up before it started (a control call that timed out)
            try:
                result = fn()
            except Exception as exc:  # handed to the waiting caller, never lost
                fut.set_exception(exc)
            else:
                fut.set_result(result)


@dataclass
class _Gpu:
    reader: DeviceReader
    worker: _Worker
    pending: Future[ReadResult] | None = None
    stuck: bool = False  # a read outlived its tick's deadline and has not returned yet
    failures: int = 0
    lost: bool = False
    sleeping: bool = False
    saved_limit_mw: int | None = None  # what wake restores; None: the GPU's default limit


def _load_pynvml() -> object:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise BackendError(
            "NVML unavailable: the nvidia-ml-py package (module pynvml) is not installed"
        ) from exc


class NvmlBackend:
    """GpuBackend over NVML. ``nvml`` is the pynvml module (a fake in tests)."""

    def __init__(
        self,
        nvml: object | None = None,
        *,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        control_timeout_s: float = DEFAULT_CONTROL_TIMEOUT_S,
        fail_threshold: int = DEFAULT_FAIL_THRESHOLD,
        proc_root: str | Path = "/proc",
    ) -> None:
        if read_timeout_s <= 0 or control_timeout_s <= 0 or fail_threshold < 1:
            raise ValueError("timeouts must be positive and fail_threshold at least 1")
        self._query = NvmlQuery(_load_pynvml() if nvml is None else nvml)
        self._query.init()  # BackendError("NVML unavailable: ...") on a host without a driver
        try:
            count = int(self._query.invoke("nvmlDeviceGetCount"))
        except NvmlCallError as exc:
            self._query.shutdown()
            raise BackendError(f"NVML unavailable: cannot count GPUs ({exc.message})") from exc
        self._read_timeout_s = read_timeout_s
        self._control_timeout_s = control_timeout_s
        self._fail_threshold = fail_threshold
        self._lock = threading.Lock()
        self._closed = False
        # NVML enumerates GPUs once at nvmlInit: the count is fixed for this process.
        self._gpus = [
            _Gpu(DeviceReader(self._query, i, Path(proc_root)), _Worker(f"nvml-gpu{i}")) for i in range(count)
        ]
        if count == 0:
            log.warning("NVML found no GPUs on this host")
        self._find_sleeping()

    # ------------------------------------------------------------------ reading

    def gpu_count(self) -> int:
        return len(self._gpus)

    def read(self, now: float) -> list[GpuSample]:
        """Read every GPU in parallel; returns by the deadline whatever answered.

        ``now`` is unused: NVML reports the present state, and the agent stamps the message.
        """
        if self._closed:
            raise BackendError("the NVML backend is closed")
        deadline = time.monotonic() + self._read_timeout_s
        fresh: list[Future[ReadResult]] = []
        for gpu in self._gpus:
            if gpu.pending is not None and not gpu.pending.done():
                # Still stuck in an earlier tick's call: do not queue another read behind it
                # (and do not wait for it again), it is a failure until it answers.
                continue
            gpu.pending = gpu.worker.submit(gpu.reader.read)
            fresh.append(gpu.pending)
        wait(fresh, timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            return [self._settle(gpu) for gpu in self._gpus]

    def _settle(self, gpu: _Gpu) -> GpuSample:
        result = self._take_result(gpu)
        index = gpu.reader.index
        if result.lost:
            if not gpu.lost:
                log.error("GPU %d is lost: %s", index, "; ".join(result.failures))
            gpu.lost = True
            gpu.failures = max(gpu.failures + 1, self._fail_threshold)
        elif result.failures:
            gpu.failures += 1
            if gpu.failures >= self._fail_threshold and not gpu.lost:
                log.error(
                    "GPU %d marked lost after %d failed reads: %s",
                    index,
                    gpu.failures,
                    "; ".join(result.failures),
                )
                gpu.lost = True
        else:
            if gpu.lost:
                log.warning("GPU %d answers NVML again: recovered", index)
            gpu.lost = False
            gpu.failures = 0
        if gpu.lost:
            return GpuSample(index=index, uuid=gpu.reader.uuid, name=gpu.reader.name, state="lost")
        state: GpuState = "sleeping" if gpu.sleeping else "ok"
        if result.sample is None:  # a failed read below the threshold: nothing known this tick
            return GpuSample(index=index, uuid=gpu.reader.uuid, name=gpu.reader.name, state=state)
        return msgspec.structs.replace(result.sample, state=state)

    def _take_result(self, gpu: _Gpu) -> ReadResult:
        fut = gpu.pending
        if fut is None or not fut.done():
            gpu.stuck = True
            return ReadResult(None, [f"no answer within {self._read_timeout_s:g} s"])
        gpu.pending = None
        gpu.stuck = False
        try:
            return fut.result()
        except Exception as exc:  # a bug or ctypes error in one GPU's read must not end the tick
            log.exception("reading GPU %d failed", gpu.reader.index)
            return ReadResult(None, [f"{type(exc).__name__}: {exc}"])

    def _find_sleeping(self) -> None:
        """Mark GPUs that an earlier agent put to sleep (their limit is still at the minimum).

        Asked of every GPU in parallel, with the control deadline: a GPU that does not
        answer in time is taken as awake, as before.
        """
        asked = [(gpu, gpu.worker.submit(functools.partial(_at_sleep_floor, gpu.reader))) for gpu in self._gpus]
        wait([f for _, f in asked], timeout=self._control_timeout_s)
        for gpu, fut in asked:
            if not fut.done():
                fut.cancel()
                continue
            try:
                floor = fut.result()
            except NvmlCallError as exc:  # no limits on this GPU (or lost): it cannot be asleep
                log.debug("GPU %d: cannot tell whether it is asleep (%s)", gpu.reader.index, exc.message)
                continue
            if floor is not None:
                low, default = floor
                log.info("GPU %d is at its minimum power limit (%g W, default %g W): reporting it sleeping; "
                         "wake restores the default", gpu.reader.index, low / 1000, default / 1000)
                gpu.sleeping = True
                gpu.saved_limit_mw = None

    # ------------------------------------------------------------------ control

    def sleep(self, gpus: Sequence[int] | None) -> None:
        """Lower each GPU's power limit to its minimum, remembering the limit to restore."""
        errors: list[str] = []
        done: list[int] = []
        for index in self._targets(gpus):
            gpu = self._gpus[index]
            if gpu.sleeping:
                continue  # sleeping twice must not overwrite the limit to restore with the minimum
            try:
                saved = self._control(gpu, _sleep_gpu, "put to sleep")
            except BackendError as exc:
                errors.append(str(exc))
                continue
            with self._lock:
                gpu.saved_limit_mw = saved
                gpu.sleeping = True
            done.append(index)
        _raise_collected(errors, done)

    def wake(self, gpus: Sequence[int] | None) -> None:
        """Restore the power limit each sleeping GPU had before sleep (its default limit if unknown)."""
        errors: list[str] = []
        done: list[int] = []
        for index in self._targets(gpus):
            gpu = self._gpus[index]
            if not gpu.sleeping:
                continue
            try:
                self._control(gpu, functools.partial(_wake_gpu, saved_mw=gpu.saved_limit_mw), "wake")
            except BackendError as exc:
                errors.append(str(exc))
                continue
            with self._lock:
                gpu.sleeping = False
                gpu.saved_limit_mw = None
            done.append(index)
        _raise_collected(errors, done)

    def set_power_limit(self, gpus: Sequence[int] | None, watts: float) -> None:
        """Set the power limit, after checking it against every target GPU's allowed range.

        A sleeping GPU keeps its minimum limit; the new one is what wake restores.
        """
        targets = self._targets(gpus)
        milliwatts = round(watts * 1000)
        for index in targets:
            low, high = self._control(self._gpus[index], _constraints, "read the power limit range of")
            if not low <= milliwatts <= high:
                raise BackendError(
                    f"{watts:g} W is outside GPU {index}'s power limit range {low / 1000:g}-{high / 1000:g} W"
                )
        errors: list[str] = []
        done: list[int] = []
        for index in targets:
            gpu = self._gpus[index]
            with self._lock:
                if gpu.sleeping:
                    gpu.saved_limit_mw = milliwatts
                    done.append(index)
                    continue
            try:
                self._control(
                    gpu, functools.partial(_set_limit, milliwatts=milliwatts), "set the power limit of"
                )
            except BackendError as exc:
                errors.append(str(exc))
                continue
            done.append(index)
        _raise_collected(errors, done)

    def _targets(self, gpus: Sequence[int] | None) -> list[int]:
        """GPUs a control call acts on: "every GPU" (None) skips lost ones; a named lost GPU is an error."""
        targets = resolve_gpus(gpus, len(self._gpus))
        if gpus is None:
            return [i for i in targets if not self._gpus[i].lost]
        return targets

    def _control(self, gpu: _Gpu, op: Callable[[DeviceReader], T], what: str) -> T:
        """Run a control call on the GPU's worker with a deadline; errors become BackendError."""
        index = gpu.reader.index
        if self._closed:
            raise BackendError("the NVML backend is closed")
        if gpu.lost:
            raise BackendError(f"GPU {index} is lost; cannot {what} it")
        if gpu.stuck and gpu.pending is not None and not gpu.pending.done():
            # Queued behind a hung call it would only time out; say so at once.
            raise BackendError(f"GPU {index} is not answering NVML; cannot {what} it")
        # A read in progress is fine: the worker runs this right after it.
        fut = gpu.worker.submit(lambda: op(gpu.reader))
        try:
            return fut.result(timeout=self._control_timeout_s)
        except FutureTimeout:
            # If it has not started it never will; if it has, it may still land later.
            fut.cancel()
            raise BackendError(
                f"GPU {index} did not answer NVML within {self._control_timeout_s:g} s; cannot {what} it"
            ) from None
        except GpuLostError as exc:
            raise BackendError(f"GPU {index} is lost (NVML: {exc.message}); cannot {what} it") from exc
        except NvmlCallError as exc:
            raise BackendError(_control_message(index, exc)) from exc

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free event sets, stop the workers and shut NVML down (unless a call is stuck in it)."""
        if self._closed:
            return
        self._closed = True
        stuck = [g.reader.index for g in self._gpus if g.pending is not None and not g.pending.done()]
        for gpu in self._gpus:
            if gpu.reader.index not in stuck:
                gpu.worker.submit(gpu.reader.close)
            gpu.worker.stop(join_s=0.0 if gpu.reader.index in stuck else self._control_timeout_s)
        if stuck:
            # nvmlShutdown would wait on the same driver lock the stuck call holds.
            log.warning("GPU(s) %s still inside an NVML call; leaving NVML initialised", stuck)
            return
        self._query.shutdown()


# ---------------------------------------------------------------------- control ops (run on a worker)


def _constraints(reader: DeviceReader) -> tuple[int, int]:
    low, high = reader.query.invoke("nvmlDeviceGetPowerManagementLimitConstraints", reader.handle())
    return int(low), int(high)


def _set_limit(reader: DeviceReader, milliwatts: int) -> None:
    reader.query.invoke("nvmlDeviceSetPowerManagementLimit", reader.handle(), milliwatts)


def _default_limit(reader: DeviceReader) -> int:
    return int(reader.query.invoke("nvmlDeviceGetPowerManagementDefaultLimit", reader.handle()))


def _sleep_gpu(reader: DeviceReader) -> int | None:
    """Drop to the minimum power limit; returns the limit to restore on wake.

    None when the GPU is already at the minimum (slept by an earlier agent, or set
    there): the minimum is never what wake restores, the default limit is then.
    """
    current = int(reader.query.invoke("nvmlDeviceGetPowerManagementLimit", reader.handle()))
    low, _high = _constraints(reader)
    _set_limit(reader, low)
    return current if current > low else None


def _wake_gpu(reader: DeviceReader, saved_mw: int | None) -> None:
    if saved_mw is None:
        try:
            saved_mw = _default_limit(reader)
        except GpuLostError:
            raise  # said as "lost" by _control, not as a missing default
        except NvmlCallError as exc:
            raise BackendError(
                f"GPU {reader.index}: no power limit to restore is known and NVML has no default limit "
                f"({exc.message}); set one with set_power_limit"
            ) from exc
    _set_limit(reader, saved_mw)


def _at_sleep_floor(reader: DeviceReader) -> tuple[int, int] | None:
    """(minimum, default) when the GPU's limit is at its minimum and that is below its default."""
    current = int(reader.query.invoke("nvmlDeviceGetPowerManagementLimit", reader.handle()))
    low, _high = _constraints(reader)
    if current > low:
        return None
    default = _default_limit(reader)
    return (low, default) if default > low else None


def _control_message(index: int, exc: NvmlCallError) -> str:
    if exc.code == NVML_ERROR_NO_PERMISSION:
        return f"setting the power limit needs root on this host (NVML: {exc.message})"
    if exc.code in UNSUPPORTED_CODES:
        return f"GPU {index} does not support changing its power limit (NVML: {exc.message})"
    if exc.code == NVML_ERROR_INVALID_ARGUMENT:
        return f"NVML refused the power limit for GPU {index} (NVML: {exc.message})"
    return f"GPU {index}: {exc.function} failed (NVML: {exc.message})"


def _raise_collected(errors: list[str], done: Sequence[int] = ()) -> None:
    """One BackendError for a multi-GPU request; the same reason for every GPU is said once.

    When some GPUs did change, it is a PartialControlError naming them, so their events still go out.
    """
    unique = list(dict.fromkeys(errors))
    if not unique:
        return
    if done:
        raise PartialControlError("; ".join(unique), done)
    raise BackendError("; ".join(unique))
