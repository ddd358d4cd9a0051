"""A stand-in for the pynvml module: configurable GPUs and faults, no driver needed.

``FakeNvml`` exposes the pynvml names the NVML backend uses, with the real
constant values copied from the installed pynvml. Each ``FakeGpu`` holds raw
NVML values (bytes, mW, mJ) and its faults:

* ``faults[fn] = code``: that function raises ``NVMLError(code)`` for this GPU;
* ``lost = True``: every call on this GPU raises NVML_ERROR_GPU_IS_LOST;
* ``hangs.add(fn)``: that function blocks until ``FakeNvml.release`` is set;
* ``xids``: queued XID events; ``mig``: MIG slots (None = empty slot).

``FakeNvml.missing`` holds function names an old pynvml would not have.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml as _real  # type: ignore[import-untyped]

GIB = 1024**3
MIB = 1024**2


class NVMLError(Exception):
    """Like pynvml's: the NVML return code in ``value``; the same text as str()."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return str(_real.NVMLError._errcode_to_string.get(self.value, f"NVML Error with code {self.value}"))


@dataclass(frozen=True)
class FakeHandle:
    gpu: int
    mig: int | None = None


@dataclass
class FakeMig:
    uuid: str
    used: int
    total: int


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    temp_c: int = 45
    mem_total: int = 80 * GIB
    mem_used: int = 1 * GIB
    mem_reserved: int = 512 * MIB
    util_gpu: int = 37
    util_mem: int = 12
    power_mw: int = 120_500
    limit_mw: int = 700_000
    enforced_mw: int | None = None  # None: same as limit_mw
    min_mw: int = 200_000
    max_mw: int = 700_000
    default_mw: int = 700_000  # what the board sets at boot (NVML's default power limit)
    sm_clock: int = 1980
    mem_clock: int = 2619
    fan_pct: int | None = None  # None: passively cooled, NOT_SUPPORTED
    energy_mj: int = 123_456_700
    reasons: int = 0x4
    ecc_dbe: int = 0
    slowdown_c: int = 87
    compute_procs: list[tuple[int, int | None]] = field(default_factory=list)
    graphics_procs: list[tuple[int, int | None]] = field(default_factory=list)
    mig_enabled: bool | None = False  # None: MIG not supported
    mig: list[FakeMig | None] = field(default_factory=list)
    xids: list[int] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    hangs: set[str] = field(default_factory=set)
    lost: bool = False
    calls: Counter[str] = field(default_factory=Counter)


@dataclass
class FakeEventSet:
    gpus: list[int] = field(default_factory=list)
    freed: bool = False


_CONSTANTS = [name for name in dir(_real) if name.startswith(("NVML_", "nvmlClocks", "nvmlEventType"))]


class FakeNvml:
    """Instances stand in for the ``pynvml`` module."""

    NVMLError = NVMLError
    nvmlMemory_v2 = _real.nvmlMemory_v2

    def __init__(self, gpus: list[FakeGpu]) -> None:
        for name in _CONSTANTS:
            setattr(self, name, getattr(_real, name))
        self.gpus = gpus
        self.init_error: int | None = None
        self.missing: set[str] = set()
        self.release = threading.Event()
        self.hang_limit_s = 30.0  # a forgotten release must not hang the test run forever
        self.initialised = 0
        self.shutdowns = 0
        self.event_sets: list[FakeEventSet] = []
        self.mem_v2_supported = True

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    # ------------------------------------------------------------------ helpers

    def _gpu(self, handle: FakeHandle, fn: str) -> FakeGpu:
        gpu = self.gpus[handle.gpu]
        gpu.calls[fn] += 1
        if gpu.lost:
            raise NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.faults:
            raise NVMLError(gpu.faults[fn])
        if fn in gpu.hangs:
            self.release.wait(self.hang_limit_s)
        return gpu

    # ------------------------------------------------------------------ library

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._gpu(FakeHandle(index), "nvmlDeviceGetHandleByIndex")
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeHandle:
        for i, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                self._gpu(FakeHandle(i), "nvmlDeviceGetHandleByUUID")
                return FakeHandle(i)
        raise NVMLError(_real.NVML_ERROR_NOT_FOUND)

    # ------------------------------------------------------------------ device queries

    def nvmlDeviceGetName(self, h: FakeHandle) -> str:
        return self._gpu(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        gpu = self._gpu(h, "nvmlDeviceGetUUID")
        return gpu.uuid if h.mig is None else self._mig(gpu, h).uuid

    def nvmlDeviceGetTemperature(self, h: FakeHandle, sensor: int) -> int:
        assert sensor == _real.NVML_TEMPERATURE_GPU
        return self._gpu(h, "nvmlDeviceGetTemperature").temp_c

    def nvmlDeviceGetTemperatureV(self, h: FakeHandle, sensor: int) -> int:
        assert sensor == _real.NVML_TEMPERATURE_GPU
        return self._gpu(h, "nvmlDeviceGetTemperatureV").temp_c

    def nvmlDeviceGetTemperatureThreshold(self, h: FakeHandle, threshold: int) -> int:
        assert threshold == _real.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return self._gpu(h, "nvmlDeviceGetTemperatureThreshold").slowdown_c

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle, version: int | None = None) -> SimpleNamespace:
        gpu = self._gpu(h, "nvmlDeviceGetMemoryInfo")
        if version is not None and not self.mem_v2_supported:
            raise NVMLError(_real.NVML_ERROR_FUNCTION_NOT_FOUND)
        if h.mig is not None:
            mig = self._mig(gpu, h)
            return SimpleNamespace(total=mig.total, used=mig.used, free=mig.total - mig.used)
        # v1's "used" includes the driver's reserved memory; v2 reports it apart.
        used = gpu.mem_used if version is not None else gpu.mem_used + gpu.mem_reserved
        return SimpleNamespace(total=gpu.mem_total, used=used, free=gpu.mem_total - used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeHandle) -> SimpleNamespace:
        gpu = self._gpu(h, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.util_gpu, memory=gpu.util_mem)

    def nvmlDeviceGetPowerUsage(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeHandle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetEnforcedPowerLimit")
        return gpu.limit_mw if gpu.enforced_mw is None else gpu.enforced_mw

    def nvmlDeviceGetPowerManagementLimit(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetPowerManagementLimit").limit_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: FakeHandle) -> list[int]:
        gpu = self._gpu(h, "nvmlDeviceGetPowerManagementLimitConstraints")
        return [gpu.min_mw, gpu.max_mw]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetPowerManagementDefaultLimit").default_mw

    def nvmlDeviceSetPowerManagementLimit(self, h: FakeHandle, limit: int) -> None:
        gpu = self._gpu(h, "nvmlDeviceSetPowerManagementLimit")
        if not gpu.min_mw <= limit <= gpu.max_mw:
            raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        gpu.limit_mw = limit

    def nvmlDeviceGetClockInfo(self, h: FakeHandle, clock: int) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetClockInfo")
        return {_real.NVML_CLOCK_SM: gpu.sm_clock, _real.NVML_CLOCK_MEM: gpu.mem_clock}[clock]

    def nvmlDeviceGetFanSpeed(self, h: FakeHandle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetFanSpeed")
        if gpu.fan_pct is None:
            raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.fan_pct

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetCurrentClocksEventReasons").reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: FakeHandle) -> int:
        return self._gpu(h, "nvmlDeviceGetCurrentClocksThrottleReasons").reasons

    def nvmlDeviceGetTotalEccErrors(self, h: FakeHandle, error_type: int, counter: int) -> int:
        assert error_type == _real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        assert counter == _real.NVML_VOLATILE_ECC
        return self._gpu(h, "nvmlDeviceGetTotalEccErrors").ecc_dbe

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeHandle) -> list[SimpleNamespace]:
        gpu = self._gpu(h, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in gpu.compute_procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: FakeHandle) -> list[SimpleNamespace]:
        gpu = self._gpu(h, "nvmlDeviceGetGraphicsRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in gpu.graphics_procs]

    # ------------------------------------------------------------------ MIG

    def _mig(self, gpu: FakeGpu, h: FakeHandle) -> FakeMig:
        assert h.mig is not None
        mig = gpu.mig[h.mig]
        assert mig is not None
        return mig

    def nvmlDeviceGetMigMode(self, h: FakeHandle) -> list[int]:
        gpu = self._gpu(h, "nvmlDeviceGetMigMode")
        if gpu.mig_enabled is None:
            raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
        mode = _real.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else _real.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeHandle) -> int:
        return len(self._gpu(h, "nvmlDeviceGetMaxMigDeviceCount").mig)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeHandle, index: int) -> FakeHandle:
        gpu = self._gpu(h, "nvmlDeviceGetMigDeviceHandleByIndex")
        if index >= len(gpu.mig) or gpu.mig[index] is None:
            raise NVMLError(_real.NVML_ERROR_NOT_FOUND)
        return FakeHandle(h.gpu, index)

    # ------------------------------------------------------------------ events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, h: FakeHandle, types: int, event_set: FakeEventSet) -> None:
        self._gpu(h, "nvmlDeviceRegisterEvents")
        assert types == _real.nvmlEventTypeXidCriticalError
        event_set.gpus.append(h.gpu)

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> SimpleNamespace:
        assert timeout_ms == 0  # the backend must never block waiting for events
        for index in event_set.gpus:
            gpu = self._gpu(FakeHandle(index), "nvmlEventSetWait_v2")
            if gpu.xids:
                return SimpleNamespace(
                    device=FakeHandle(index),
                    eventType=_real.nvmlEventTypeXidCriticalError,
                    eventData=gpu.xids.pop(0),
                    gpuInstanceId=0,
                    computeInstanceId=0,
                )
        raise NVMLError(_real.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        event_set.freed = True
