"""One wrapper for every NVML call, and the read of one GPU built on it.

After nvitop's ``nvmlQuery``: NVML is initialised lazily and once; a function
this pynvml or this driver lacks, or a metric this GPU does not support, is
``None`` (logged once) rather than an exception; a real error is reported to
the caller's ``on_failure`` so the backend can count failed reads, and only a
lost GPU raises, because every further call on it is pointless.

Nothing here knows about threads or timeouts: ``headless_agent.nvml`` runs each
``DeviceReader`` on its own worker with a deadline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aether_protocol import GpuSample, MigInstance, Process
from headless_agent.backend import BackendError

log = logging.getLogger(__name__)

# Values from nvml.h. They are part of NVML's stable ABI, so they are spelled
# here instead of read from the module, which may be an old pynvml or a fake
# (tests check them against the installed pynvml).
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_EVENT_TYPE_XID = 0x8  # nvmlEventTypeXidCriticalError

# "This GPU / this NVML cannot tell": the field is null, nothing is wrong.
UNSUPPORTED_CODES = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND})
# Codes that say the GPU or its driver is unwell (not just one metric): these
# count as a failed read; enough of them in a row and the GPU is reported lost.
FAILURE_CODES = frozenset(
    {
        NVML_ERROR_UNINITIALIZED,
        NVML_ERROR_DRIVER_NOT_LOADED,
        NVML_ERROR_TIMEOUT,
        NVML_ERROR_IRQ_ISSUE,
        NVML_ERROR_RESET_REQUIRED,
        NVML_ERROR_OPERATING_SYSTEM,
        NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        NVML_ERROR_GPU_NOT_FOUND,
        NVML_ERROR_UNKNOWN,
    }
)

# Clock event ("throttle") reason bits, nvmlClocksEventReason* in nvml.h.
THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x01, "gpu_idle"),
    (0x02, "app_clocks"),
    (0x04, "sw_power_cap"),
    (0x08, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal"),
    (0x40, "hw_thermal"),
    (0x80, "hw_power_brake"),
)

MIB = 1024 * 1024
# NVML_VALUE_NOT_AVAILABLE for unsigned long long; newer pynvml turns it into None itself.
_NOT_AVAILABLE_ULL = 2**64 - 1
# A storm of XIDs must not stall the tick: what is left is drained next tick.
MAX_EVENTS_PER_READ = 64

OnFailure = Callable[["NvmlCallError"], None]


def throttle_names(bits: int) -> list[str]:
    """Names of the active clock-throttle reasons in an NVML reasons bit mask."""
    return [name for bit, name in THROTTLE_BITS if bits & bit]


class NvmlCallError(Exception):
    """An NVML function returned an error (or does not exist in this pynvml)."""

    def __init__(self, function: str, code: int, message: str) -> None:
        super().__init__(f"{function}: {message}")
        self.function = function
        self.code = code
        self.message = message


class GpuLostError(NvmlCallError):
    """NVML_ERROR_GPU_IS_LOST: the GPU fell off the bus or stopped answering."""


class NvmlQuery:
    """The single door to NVML. Thread-safe: one instance serves every GPU worker."""

    def __init__(self, nvml: object) -> None:
        self._nvml = nvml
        self._error_type: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        self._lock = threading.Lock()
        self._initialised = False
        self._shut_down = False
        # Python-side absences are permanent for this process; asking again only costs a lookup,
        # but remembering them keeps the log-once promise obvious.
        self._missing: set[str] = set()
        self._logged: set[tuple[str, int]] = set()

    def has(self, name: str) -> bool:
        return hasattr(self._nvml, name)

    def constant(self, name: str) -> Any:
        return getattr(self._nvml, name, None)

    def init(self) -> None:
        """nvmlInit, once; a host without a driver gets a clear BackendError."""
        with self._lock:
            if self._initialised:
                return
            if self._shut_down:
                # A worker that was stuck in NVML may wake after close(); it must not re-initialise.
                raise BackendError("NVML was shut down")
            try:
                getattr(self._nvml, "nvmlInit")()  # noqa: B009 - the module is duck-typed (real or fake)
            except self._error_type as exc:
                raise BackendError(
                    f"NVML unavailable: {_message(exc)} (is the NVIDIA driver installed?)"
                ) from exc
            except OSError as exc:
                raise BackendError(f"NVML unavailable: {exc}") from exc
            self._initialised = True

    def shutdown(self) -> None:
        with self._lock:
            self._shut_down = True
            if not self._initialised:
                return
            self._initialised = False
            try:
                getattr(self._nvml, "nvmlShutdown")()  # noqa: B009
            except self._error_type as exc:
                log.warning("nvmlShutdown failed: %s", _message(exc))

    def invoke(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Strict call: any NVML error raises NvmlCallError (GpuLostError for a lost GPU)."""
        self.init()
        fn = None if name in self._missing else getattr(self._nvml, name, None)
        if fn is None:
            self._missing.add(name)
            raise NvmlCallError(name, NVML_ERROR_FUNCTION_NOT_FOUND, "not provided by this pynvml")
        try:
            return fn(*args, **kwargs)
        except self._error_type as exc:
            code = int(getattr(exc, "value", NVML_ERROR_UNKNOWN))
            kind = GpuLostError if code == NVML_ERROR_GPU_IS_LOST else NvmlCallError
            raise kind(name, code, _message(exc)) from None

    def get(self, name: str, *args: Any, on_failure: OnFailure | None = None, **kwargs: Any) -> Any:
        """Lenient call: the value, or None when NVML cannot tell; raises only GpuLostError."""
        try:
            return self.invoke(name, *args, **kwargs)
        except GpuLostError:
            raise
        except NvmlCallError as exc:
            self.report(exc, on_failure)
            return None

    def report(self, exc: NvmlCallError, on_failure: OnFailure | None) -> None:
        """Log an error once per (function, code) and pass real failures on."""
        if exc.code in FAILURE_CODES:
            self._log_once(exc, logging.WARNING, "NVML %s failed: %s")
            if on_failure is not None:
                on_failure(exc)
        elif exc.code == NVML_ERROR_FUNCTION_NOT_FOUND:
            self._log_once(
                exc, logging.INFO, "NVML function %s is not available here (%s); its field stays null"
            )
        elif exc.code == NVML_ERROR_NOT_SUPPORTED:
            self._log_once(exc, logging.DEBUG, "NVML %s: %s")
        else:
            # Permission, no data, invalid argument...: the field is null but an operator may
            # want to know why, once.
            self._log_once(exc, logging.WARNING, "NVML %s failed: %s; its field stays null")

    def _log_once(self, exc: NvmlCallError, level: int, fmt: str) -> None:
        key = (exc.function, exc.code)
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        log.log(level, fmt, exc.function, exc.message)


def _message(exc: BaseException) -> str:
    # str() of a real NVMLError asks libnvidia-ml for the text; it cannot fail usefully here.
    text = str(exc)
    return text or type(exc).__name__


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):  # pynvml before 11.x returned bytes
        return value.decode(errors="replace")
    return str(value)


def _num(value: Any, scale: float = 1.0) -> float | None:
    return None if value is None else float(value) / scale


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _mib(value: Any) -> int | None:
    if value is None or int(value) >= _NOT_AVAILABLE_ULL:
        return None
    return int(value) // MIB


@dataclass
class ReadResult:
    """One GPU's read attempt: metrics (state is set by the backend) and what went wrong."""

    sample: GpuSample | None
    failures: list[str] = field(default_factory=list)
    lost: bool = False


class DeviceReader:
    """Reads one GPU. Used by one worker thread at a time; keeps that GPU's cached static facts."""

    def __init__(self, query: NvmlQuery, index: int, proc_root: Path) -> None:
        self.index = index
        self.name = "unknown"
        self.uuid = ""
        self.query = query
        self._q = query
        self._proc_root = proc_root
        self._handle: Any = None
        self._identity_known = False
        self._slowdown_read = False
        self._slowdown_c: float | None = None
        self._mem_total_mib: int | None = None
        self._mem_v2: Any = query.constant("nvmlMemory_v2")
        self._event_set: Any = None
        self._events_supported = True
        self._wait_fn = "nvmlEventSetWait_v2" if query.has("nvmlEventSetWait_v2") else "nvmlEventSetWait"
        # nvmlDeviceGetTemperature is deprecated for removal in CUDA 14; a pynvml without it has the V form.
        self._temp_fn = (
            "nvmlDeviceGetTemperature"
            if query.has("nvmlDeviceGetTemperature")
            else "nvmlDeviceGetTemperatureV"
        )

    # ------------------------------------------------------------------ one tick

    def read(self) -> ReadResult:
        failures: list[str] = []

        def fail(exc: NvmlCallError) -> None:
            failures.append(str(exc))

        try:
            handle = self._get_handle(fail)
            if handle is None:
                return ReadResult(None, failures or ["no NVML handle"])
            self._read_static(handle, fail)
            sample = self._read_metrics(handle, fail)
        except GpuLostError as exc:
            # A lost GPU's handle may be stale after a reset; find it again by UUID next time.
            self._handle = None
            self._drop_events()
            return ReadResult(None, [str(exc)], lost=True)
        return ReadResult(sample, failures)

    def handle(self) -> Any:
        """The handle for control calls; raises NvmlCallError when NVML will not give one."""
        if self._handle is None:
            if self._identity_known:
                # Indices can shift after a GPU falls off the bus; the UUID cannot.
                self._handle = self._q.invoke("nvmlDeviceGetHandleByUUID", self.uuid)
            else:
                self._handle = self._q.invoke("nvmlDeviceGetHandleByIndex", self.index)
        return self._handle

    def close(self) -> None:
        self._drop_events()

    # ------------------------------------------------------------------ parts

    def _get_handle(self, fail: OnFailure) -> Any:
        try:
            return self.handle()
        except GpuLostError:
            raise
        except NvmlCallError as exc:
            # Whatever the code, a GPU without a handle cannot be read: that is a failed read.
            self._q.report(exc, None)
            fail(exc)
            return None

    def _read_static(self, h: Any, fail: OnFailure) -> None:
        if not self._identity_known:
            name = _text(self._q.get("nvmlDeviceGetName", h, on_failure=fail))
            uuid = _text(self._q.get("nvmlDeviceGetUUID", h, on_failure=fail))
            self.name = name or self.name
            self.uuid = uuid or self.uuid
            self._identity_known = name is not None and uuid is not None
        if not self._slowdown_read:
            value = self._q.get(
                "nvmlDeviceGetTemperatureThreshold", h, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, on_failure=fail
            )
            self._slowdown_c = _num(value)
            self._slowdown_read = True

    def _read_metrics(self, h: Any, fail: OnFailure) -> GpuSample:
        q = self._q.get
        mem_used, mem_total = self._memory(h, fail)
        if mem_total is not None:
            self._mem_total_mib = mem_total
        util = q("nvmlDeviceGetUtilizationRates", h, on_failure=fail)
        limit = q("nvmlDeviceGetEnforcedPowerLimit", h, on_failure=fail)
        if limit is None:
            limit = q("nvmlDeviceGetPowerManagementLimit", h, on_failure=fail)
        reasons = q("nvmlDeviceGetCurrentClocksEventReasons", h, on_failure=fail)
        if reasons is None:  # pynvml/driver older than the 2023 rename
            reasons = q("nvmlDeviceGetCurrentClocksThrottleReasons", h, on_failure=fail)
        ecc = q(
            "nvmlDeviceGetTotalEccErrors",
            h,
            NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            NVML_VOLATILE_ECC,
            on_failure=fail,
        )
        return GpuSample(
            index=self.index,
            uuid=self.uuid,
            name=self.name,
            state="ok",
            temp_c=_num(q(self._temp_fn, h, NVML_TEMPERATURE_GPU, on_failure=fail)),
            mem_used_mib=mem_used,
            mem_total_mib=self._mem_total_mib,
            util_pct=None if util is None else float(util.gpu),
            mem_util_pct=None if util is None else float(util.memory),
            power_w=_num(q("nvmlDeviceGetPowerUsage", h, on_failure=fail), 1000.0),
            power_limit_w=_num(limit, 1000.0),
            sm_clock_mhz=_int(q("nvmlDeviceGetClockInfo", h, NVML_CLOCK_SM, on_failure=fail)),
            mem_clock_mhz=_int(q("nvmlDeviceGetClockInfo", h, NVML_CLOCK_MEM, on_failure=fail)),
            fan_pct=_num(q("nvmlDeviceGetFanSpeed", h, on_failure=fail)),
            energy_j=_num(q("nvmlDeviceGetTotalEnergyConsumption", h, on_failure=fail), 1000.0),
            throttle=None if reasons is None else throttle_names(int(reasons)),
            ecc_dbe=None if ecc is None else int(ecc),
            xid=self._drain_xid(h, fail),
            processes=self._processes(h, fail),
            mig=self._mig(h, fail),
            slowdown_temp_c=self._slowdown_c,
        )

    def _memory(self, h: Any, fail: OnFailure) -> tuple[int | None, int | None]:
        if self._mem_v2 is not None:
            # v2 reports "used" without the driver's reserved memory, as nvidia-smi does.
            try:
                info = self._q.invoke("nvmlDeviceGetMemoryInfo", h, version=self._mem_v2)
                return _mib(info.used), _mib(info.total)
            except GpuLostError:
                raise
            except NvmlCallError as exc:
                self._q.report(exc, fail)
                if exc.code not in UNSUPPORTED_CODES:
                    return None, None
                self._mem_v2 = None  # an older driver: use v1 from now on
        info = self._q.get("nvmlDeviceGetMemoryInfo", h, on_failure=fail)
        if info is None:
            return None, None
        return _mib(info.used), _mib(info.total)

    def _drain_xid(self, h: Any, fail: OnFailure) -> int | None:
        """The most recent XID since the previous read, from this GPU's own event set."""
        if not self._events_supported:
            return None
        if self._event_set is None and not self._register_events(h, fail):
            return None
        latest: int | None = None
        for _ in range(MAX_EVENTS_PER_READ):
            try:
                data = self._q.invoke(self._wait_fn, self._event_set, 0)
            except GpuLostError:
                raise
            except NvmlCallError as exc:
                if exc.code != NVML_ERROR_TIMEOUT:  # TIMEOUT with a 0 ms wait just means "no event"
                    self._q.report(exc, fail)
                break
            if int(data.eventType) & NVML_EVENT_TYPE_XID:
                latest = int(data.eventData)
        return latest

    def _register_events(self, h: Any, fail: OnFailure) -> bool:
        event_set: Any = None
        try:
            event_set = self._q.invoke("nvmlEventSetCreate")
            self._q.invoke("nvmlDeviceRegisterEvents", h, NVML_EVENT_TYPE_XID, event_set)
        except GpuLostError:
            raise
        except NvmlCallError as exc:
            self._q.report(exc, fail)
            if event_set is not None:
                self._q.get("nvmlEventSetFree", event_set)
            if exc.code not in FAILURE_CODES:
                # Not supported or not permitted will not change: stop asking. A real failure is
                # retried next tick.
                self._events_supported = False
            return False
        self._event_set = event_set
        return True

    def _drop_events(self) -> None:
        if self._event_set is not None:
            event_set, self._event_set = self._event_set, None
            self._q.get("nvmlEventSetFree", event_set)

    def _processes(self, h: Any, fail: OnFailure) -> list[Process] | None:
        compute = self._q.get("nvmlDeviceGetComputeRunningProcesses", h, on_failure=fail)
        graphics = self._q.get("nvmlDeviceGetGraphicsRunningProcesses", h, on_failure=fail)
        if compute is None and graphics is None:
            return None
        by_pid: dict[int, Process] = {}
        for info in [*(compute or []), *(graphics or [])]:
            pid = int(info.pid)
            mem = _mib(getattr(info, "usedGpuMemory", None))
            known = by_pid.get(pid)
            # A process using CUDA and graphics is listed twice; keep one entry, with memory if any.
            if known is not None and (known.mem_used_mib is not None or mem is None):
                continue
            by_pid[pid] = Process(pid=pid, name=self._process_name(pid), mem_used_mib=mem)
        return list(by_pid.values())

    def _process_name(self, pid: int) -> str | None:
        # NVML reports host PIDs; inside a container /proc may not show them.
        try:
            text = (self._proc_root / str(pid) / "comm").read_text(errors="replace")
        except OSError:
            return None
        return text.strip()[:256] or None

    def _mig(self, h: Any, fail: OnFailure) -> list[MigInstance] | None:
        mode = self._q.get("nvmlDeviceGetMigMode", h, on_failure=fail)
        if mode is None or int(mode[0]) != NVML_DEVICE_MIG_ENABLE:
            return None
        count = self._q.get("nvmlDeviceGetMaxMigDeviceCount", h, on_failure=fail) or 0
        instances: list[MigInstance] = []
        for i in range(int(count)):
            try:
                mig_handle = self._q.invoke("nvmlDeviceGetMigDeviceHandleByIndex", h, i)
            except GpuLostError:
                raise
            except NvmlCallError as exc:
                if exc.code != NVML_ERROR_NOT_FOUND:  # NOT_FOUND: this slot holds no instance
                    self._q.report(exc, fail)
                continue
            used, total = self._memory(mig_handle, fail)
            uuid = _text(self._q.get("nvmlDeviceGetUUID", mig_handle, on_failure=fail))
            instances.append(MigInstance(index=i, uuid=uuid, mem_used_mib=used, mem_total_mib=total))
        return instances
