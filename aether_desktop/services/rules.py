"""Health rules: the obvious faults, detected without any model.

XID errors, a rising double-bit ECC count, a lost GPU, a temperature at or
above the board's slowdown threshold, and hardware thermal/power-brake
throttling. Rules are pure per-sample checks with a little per-GPU memory
(the previous ECC count); hysteresis and grouping happen in ``alerts``.

Thresholds come per GPU model from ``RulesConfig`` (matched by a substring of
the NVML name), because 85 C is routine for one board and alarming for
another; a ``slowdown_temp_c`` reported by the agent itself wins over the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from aether_protocol import GpuSample

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class XidInfo:
    code: int
    title: str
    meaning: str
    action: str
    severity: Severity


# Meanings and actions follow NVIDIA's XID catalogue, shortened to what an
# operator needs on the spot: is it the job or the board, and what to do now.
XID_TABLE: Mapping[int, XidInfo] = {
    x.code: x
    for x in (
        XidInfo(13, "Graphics engine exception",
                "usually the application (out-of-range access, illegal instruction); rarely hardware",
                "check the job's log and rerun it under compute-sanitizer; if it recurs across jobs, run dcgmi diag",
                "warning"),
        XidInfo(31, "GPU memory page fault",
                "the application touched an invalid address (or a driver bug)",
                "debug the job (compute-sanitizer); if unrelated jobs hit it too, update the driver",
                "warning"),
        XidInfo(43, "GPU stopped processing",
                "a user application faulted and its channel was reset; the GPU itself is healthy",
                "no hardware action; look at the job that failed",
                "info"),
        XidInfo(45, "Preemptive cleanup",
                "the driver tore down a context, normally after an earlier error or a killed process",
                "look for the XID that preceded it; act on that one",
                "info"),
        XidInfo(48, "Double-bit ECC error",
                "an uncorrectable memory error; the data on the GPU is not trustworthy",
                "drain the GPU, reset it (nvidia-smi -r); if it recurs, RMA the board",
                "critical"),
        XidInfo(61, "Internal micro-controller breakpoint",
                "the GPU's PMU firmware hit an internal error",
                "drain and reset the GPU; if it recurs, collect nvidia-bug-report and contact NVIDIA",
                "critical"),
        XidInfo(62, "Internal micro-controller halt",
                "the GPU's firmware halted (often thermal or power related)",
                "drain and reset the GPU, check cooling and power; RMA if it recurs",
                "critical"),
        XidInfo(63, "ECC page retirement / row remapping event",
                "the GPU recorded a retired page or remapped row after memory errors",
                "reset the GPU when it is idle so the remap takes effect; watch the count",
                "warning"),
        XidInfo(64, "ECC page retirement / row remapping failure",
                "the GPU could not record a retirement or remap: memory is degrading",
                "drain the GPU and plan an RMA",
                "critical"),
        XidInfo(74, "NVLink error",
                "an NVLink connection reported errors; multi-GPU jobs may hang or fail",
                "drain the host, reseat/check NVLink bridges or the baseboard, reset the GPUs",
                "critical"),
        XidInfo(79, "GPU has fallen off the bus",
                "the GPU stopped answering on PCIe (power, thermal, or hardware failure)",
                "drain the host and reboot it; check power cabling and temperatures; RMA if it recurs",
                "critical"),
        XidInfo(92, "High single-bit ECC error rate",
                "memory corrects errors unusually often; a sign of degrading memory",
                "keep running but schedule a reset and watch for XID 48/63/64",
                "warning"),
        XidInfo(94, "Contained ECC error",
                "an uncorrectable error was contained; only the affected application was stopped",
                "restart the affected job; reset the GPU when idle to remap the row",
                "warning"),
        XidInfo(95, "Uncontained ECC error",
                "an uncorrectable error could not be contained; every application on the GPU is affected",
                "drain and reset the GPU now; RMA if it recurs",
                "critical"),
        XidInfo(119, "GSP RPC timeout",
                "the GPU System Processor stopped responding to the driver",
                "drain and reset the GPU (or reboot); update the driver; collect nvidia-bug-report if it recurs",
                "critical"),
    )
}


def xid_info(code: int) -> XidInfo:
    """The table entry, or a generic one for codes outside it (never raises)."""
    info = XID_TABLE.get(code)
    if info is not None:
        return info
    return XidInfo(code, f"XID {code}", "an XID error outside Aether's table",
                   "look the code up in NVIDIA's XID catalogue and check the host's kernel log", "warning")


@dataclass(frozen=True)
class GpuThresholds:
    slowdown_c: float
    shutdown_c: float


@dataclass(frozen=True)
class RulesConfig:
    """Per-GPU-model thresholds, matched by substring of the NVML name (first match wins)."""

    thresholds: tuple[tuple[str, GpuThresholds], ...] = (
        ("H100", GpuThresholds(87.0, 92.0)),
        ("H200", GpuThresholds(87.0, 92.0)),
        ("A100", GpuThresholds(89.0, 92.0)),
        ("L40S", GpuThresholds(88.0, 93.0)),
        ("L4", GpuThresholds(90.0, 95.0)),
        ("4090", GpuThresholds(90.0, 95.0)),
    )
    default: GpuThresholds = field(default_factory=lambda: GpuThresholds(88.0, 93.0))
    # Throttle reasons that mean the hardware is protecting itself, not policy.
    hw_throttle_reasons: frozenset[str] = frozenset({"hw_thermal", "hw_slowdown", "hw_power_brake"})

    def for_gpu(self, name: str, reported_slowdown_c: float | None = None) -> GpuThresholds:
        base = self.default
        for needle, th in self.thresholds:
            if needle.lower() in name.lower():
                base = th
                break
        if reported_slowdown_c is not None:
            return GpuThresholds(reported_slowdown_c, max(base.shutdown_c, reported_slowdown_c + 3.0))
        return base


# Rule names double as alert kinds and as hysteresis detector ids.
RULE_KINDS = ("xid", "ecc_dbe", "gpu_lost", "over_slowdown_temp", "hw_throttle")


@dataclass(frozen=True)
class Finding:
    """One detector's verdict on one GPU sample; the alert manager turns these into alerts."""

    host: str
    gpu: int
    ts: float
    detector: str  # hysteresis key: a rule kind, or "model"
    kind: str  # alert kind shown to the operator
    severity: Severity
    source: Literal["rule", "model"]
    score: float
    message: str


class RuleEngine:
    """Applies the health rules to samples; remembers the last ECC count per GPU."""

    def __init__(self, config: RulesConfig | None = None) -> None:
        self.config = config or RulesConfig()
        self._ecc: dict[tuple[str, int], int] = {}

    def check(self, host: str, ts: float, s: GpuSample) -> list[Finding]:
        out: list[Finding] = []
        if s.state == "lost":
            out.append(Finding(host, s.index, ts, "gpu_lost", "gpu_lost", "critical", "rule", 1.0,
                               f"GPU {s.index} ({s.name}) is lost: the driver no longer reaches it"))
            return out  # a lost GPU reports no metrics; nothing else to check
        if s.xid is not None:
            info = xid_info(s.xid)
            out.append(Finding(host, s.index, ts, "xid", "xid", info.severity, "rule", float(s.xid),
                               f"XID {s.xid} {info.title}: {info.meaning}. Action: {info.action}"))
        if s.ecc_dbe is not None:
            key = (host, s.index)
            prev = self._ecc.get(key)
            self._ecc[key] = s.ecc_dbe
            # Only an increase counts: a board that came up with a non-zero
            # volatile count was already handled before this station saw it.
            if prev is not None and s.ecc_dbe > prev:
                out.append(Finding(host, s.index, ts, "ecc_dbe", "ecc_dbe", "critical", "rule",
                                   float(s.ecc_dbe - prev),
                                   f"double-bit ECC errors rose {prev} -> {s.ecc_dbe}: uncorrectable memory "
                                   "errors; drain and reset the GPU, RMA if it recurs"))
        if s.temp_c is not None:
            th = self.config.for_gpu(s.name, s.slowdown_temp_c)
            if s.temp_c >= th.slowdown_c:
                sev: Severity = "critical"
                out.append(Finding(host, s.index, ts, "over_slowdown_temp", "over_slowdown_temp", sev, "rule",
                                   s.temp_c - th.slowdown_c,
                                   f"{s.temp_c:.0f} C is at or above this board's slowdown threshold "
                                   f"({th.slowdown_c:.0f} C; shutdown at {th.shutdown_c:.0f} C): check cooling"))
        if s.throttle:
            hw = sorted(self.config.hw_throttle_reasons.intersection(s.throttle))
            if hw:
                out.append(Finding(host, s.index, ts, "hw_throttle", "hw_throttle", "warning", "rule",
                                   float(len(hw)),
                                   f"hardware throttling ({', '.join(hw)}): the board is protecting itself "
                                   "from heat or a power-supply limit"))
        return out

    def forget(self, host: str) -> None:
        """Drop memory for a host (e.g. a new agent boot resets the volatile ECC count)."""
        for key in [k for k in self._ecc if k[0] == host]:
            del self._ecc[key]
