"""Per-GPU rolling features that capture *relationships*, vectorised over the fleet.

A hot GPU is not an anomaly; a GPU hotter than its own power draw explains
is. Every feature therefore compares two signals:

* ``temp_resid`` - temperature minus this GPU's thermal-model expectation.
  The model is first order, T = a + R * P_f, with P_f the power low-passed by
  the board's thermal time constant (exact for dT/dt = (a + R*P - T)/tau).
  ``a`` (inlet + offset) and ``R`` (this board's thermal resistance) are fitted
  per GPU online (exponentially forgetting least squares, with a ridge prior
  toward the GPU model's values), and frozen while the GPU looks anomalous so
  a slow fault is never learnt as normal.
* ``temp_trend`` - slope of that residual (C/min): heating at constant power.
* ``flat_span`` - how far the expected temperature moved since the reading
  last changed: a stuck sensor keeps reading 64 C while the load says 75 C.
* ``power_excess`` - power above what the utilisation explains (per GPU-model
  curve), the max over a few seconds so a 2-second spike stays visible.
* ``mem_growth`` - memory slope (MiB/s) while the set of processes is
  unchanged, and ``unattributed_growth`` - slope of memory no process owns.
* ``clock_deficit`` - SM clock below the board's maximum while busy, and
  ``headroom`` - degrees left to the slowdown threshold (clocks vs temperature).
* ``util`` - load level, as context (variances differ between idle and busy).

Everything is held in per-slot numpy arrays; ``update`` takes one sample per
slot for any subset of slots and computes all features in a few array ops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from aether_protocol import GpuSample

FEATURE_NAMES: tuple[str, ...] = (
    "temp_resid", "temp_trend", "flat_span", "power_excess", "mem_growth",
    "unattributed_growth", "clock_deficit", "headroom", "util",
)
# Which alert kind a feature's deviation points at (the explanation of a model alert).
FEATURE_KIND: tuple[str, ...] = (
    "thermal_anomaly", "thermal_anomaly", "stuck_sensor", "power_anomaly", "memory_leak",
    "memory_leak", "clock_anomaly", "clock_anomaly", "thermal_anomaly",
)
# Which side of a feature's normal range is suspicious (low, high). Used by the
# model's range guard: a cool GPU (large headroom) or freed memory is never alarming.
FEATURE_GUARD: tuple[tuple[bool, bool], ...] = (
    (True, True), (True, True), (False, True), (False, True), (False, True),
    (False, True), (False, True), (True, False), (False, False),
)
N_FEATURES = len(FEATURE_NAMES)
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

UTIL_BINS = 21  # power curve knots at 0, 5, ..., 100 % utilisation


@dataclass(frozen=True)
class GpuModelParams:
    """What a GPU model's features are measured against (fitted from normal data)."""

    tau_s: float = 40.0  # thermal time constant
    amb_c: float = 30.0  # prior for ``a``
    r_k_per_w: float = 0.08  # prior for ``R``
    power_curve_w: tuple[float, ...] = tuple(50.0 + 3.5 * i * 5 for i in range(UTIL_BINS))
    max_sm_mhz: float = 1980.0
    slowdown_c: float = 88.0


@dataclass(frozen=True)
class FeatureParams:
    """Per-GPU-model parameters keyed by NVML name, with a fallback for unknown boards."""

    by_model: Mapping[str, GpuModelParams] = field(default_factory=dict)
    default: GpuModelParams = field(default_factory=GpuModelParams)

    def for_name(self, name: str) -> GpuModelParams:
        return self.by_model.get(name, self.default)

    def to_json(self) -> dict[str, Any]:
        return {"by_model": {k: asdict(v) for k, v in self.by_model.items()}, "default": asdict(self.default)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> FeatureParams:
        def one(x: Mapping[str, Any]) -> GpuModelParams:
            x = dict(x)
            x["power_curve_w"] = tuple(float(v) for v in x["power_curve_w"])
            return GpuModelParams(**x)

        return FeatureParams({k: one(v) for k, v in d["by_model"].items()}, one(d["default"]))


@dataclass
class Columns:
    """One sample per row, for the slots in ``slot`` (built by the pipeline from messages)."""

    slot: I64
    ts: F64
    temp: F64  # NaN where not reported
    power: F64
    util: F64
    mem: F64
    proc_mem: F64  # memory owned by listed processes; NaN: the process list was not read
    proc_sig: I64  # hash of the pid set; PROCS_UNKNOWN: the process list was not read
    sm_clock: F64
    slowdown: F64  # NaN: use the model's


WINDOW = 32  # samples kept per slot for slopes and maxima (long enough to average out integer readings)
MIN_SEEN = 30  # features are trusted only after this many consecutive samples
GAP_S = 10.0  # a longer silence restarts a slot's windows (not its thermal fit)
FORGET_S = 1800.0  # memory of the per-GPU thermal fit
# The GPU-model prior is worth this many samples: weak for the intercept (inlet
# temperature differs per rack and drifts), strong for the thermal resistance
# (it only becomes identifiable once the load has varied).
PRIOR_WEIGHT = np.array([2.0, 120.0])
SMOOTH = 4  # residual samples averaged (the reading is an integer: average out rounding)
# proc_sig of a sample whose process list could not be read (None, unlike [] = no
# processes). Python's hash() never returns -1, so no pid set collides with it.
PROCS_UNKNOWN = -1


class FeatureExtractor:
    """Holds per-GPU state in slot-indexed arrays; ``update`` advances a batch of slots by one sample."""

    # Per-slot state, (re)allocated by _alloc.
    tau: F64
    prior: F64
    curve: F64
    max_sm: F64
    slow: F64
    sxx: F64
    sxy: F64
    pf: F64
    last_ts: F64
    seen: I64
    head: I64
    r_ts: F64
    r_res: F64
    r_pex: F64
    r_mem: F64
    r_una: F64
    r_sig: I64
    last_temp: F64
    flat_lo: F64
    flat_hi: F64
    # Last reported value per slot, carried over a sample that misses it (NaN: never reported).
    last_mem: F64
    last_pmem: F64
    last_sig: I64
    last_util: F64

    def __init__(self, params: FeatureParams | None = None) -> None:
        self.params = params or FeatureParams()
        self._slots: dict[tuple[str, int], int] = {}
        self._names: list[str] = []
        self._cap = 0
        self._alloc(64)

    # ------------------------------------------------------------------ slots

    def slot(self, host: str, gpu: int, name: str) -> int:
        key = (host, gpu)
        s = self._slots.get(key)
        if s is not None and self._names[s] == name:
            return s
        if s is None:
            s = len(self._slots)
            self._slots[key] = s
            self._names.append(name)
            if s >= self._cap:
                self._alloc(self._cap * 2)
        else:
            self._names[s] = name  # board swapped: a fresh thermal fit below
        p = self.params.for_name(name)
        self.tau[s], self.prior[s] = p.tau_s, (p.amb_c, p.r_k_per_w * 100.0)
        self.curve[s] = p.power_curve_w
        self.max_sm[s], self.slow[s] = p.max_sm_mhz, p.slowdown_c
        self.sxx[s], self.sxy[s] = 0.0, 0.0
        self.seen[s] = 0
        self.last_mem[s] = self.last_pmem[s] = self.last_util[s] = math.nan
        self.last_sig[s] = PROCS_UNKNOWN
        return s

    def set_params(self, params: FeatureParams) -> None:
        """Adopt a retrained model's parameters; keep each GPU's own fit (it is still valid)."""
        self.params = params
        for s, name in enumerate(self._names):
            p = params.for_name(name)
            self.tau[s], self.prior[s] = p.tau_s, (p.amb_c, p.r_k_per_w * 100.0)
            self.curve[s], self.max_sm[s], self.slow[s] = p.power_curve_w, p.max_sm_mhz, p.slowdown_c

    def _alloc(self, cap: int) -> None:
        def grow(name: str, shape: tuple[int, ...], fill: float, dtype: type = np.float64) -> None:
            new: npt.NDArray[Any] = np.full((cap, *shape), fill, dtype=dtype)
            old = getattr(self, name, None)
            if old is not None:
                new[: self._cap] = old
            setattr(self, name, new)

        grow("tau", (), 40.0)
        grow("prior", (2,), 0.0)
        grow("curve", (UTIL_BINS,), 0.0)
        grow("max_sm", (), 1.0)
        grow("slow", (), 88.0)
        grow("sxx", (2, 2), 0.0)
        grow("sxy", (2,), 0.0)
        grow("pf", (), 0.0)
        grow("last_ts", (), -math.inf)
        grow("seen", (), 0, np.int64)
        grow("head", (), 0, np.int64)
        grow("r_ts", (WINDOW,), 0.0)
        grow("r_res", (WINDOW,), 0.0)
        grow("r_pex", (WINDOW,), 0.0)
        grow("r_mem", (WINDOW,), 0.0)
        grow("r_una", (WINDOW,), 0.0)
        grow("r_sig", (WINDOW,), 0, np.int64)
        grow("last_temp", (), math.nan)
        grow("flat_lo", (), 0.0)
        grow("flat_hi", (), 0.0)
        grow("last_mem", (), math.nan)
        grow("last_pmem", (), math.nan)
        grow("last_sig", (), PROCS_UNKNOWN, np.int64)
        grow("last_util", (), math.nan)
        self._cap = cap

    # ------------------------------------------------------------------ the update

    def thermal_coef(self, slots: I64) -> F64:
        """(a, R*100) per slot: the ridge solution of the forgetting least-squares fit."""
        a = self.sxx[slots] + np.diag(PRIOR_WEIGHT)
        b = self.sxy[slots] + PRIOR_WEIGHT * self.prior[slots]
        det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
        c0 = (a[:, 1, 1] * b[:, 0] - a[:, 0, 1] * b[:, 1]) / det
        c1 = (a[:, 0, 0] * b[:, 1] - a[:, 1, 0] * b[:, 0]) / det
        return np.stack([c0, c1], axis=1)

    def update(self, c: Columns, learn: B | None = None) -> tuple[F64, B]:
        """Advance each row's slot by its sample; return (features [n, F], valid [n])."""
        s = c.slot
        n = len(s)
        if learn is None:
            learn = np.ones(n, dtype=bool)
        has_t = np.isfinite(c.temp) & np.isfinite(c.power)
        dt = c.ts - self.last_ts[s]
        restart = ~(dt > 0) | (dt > GAP_S) | ~has_t
        dt = np.where(restart, 1.0, np.clip(dt, 0.0, GAP_S))
        self.seen[s] = np.where(restart, 0, self.seen[s])
        self.last_ts[s] = c.ts

        coef = self.thermal_coef(s)
        temp = np.where(has_t, c.temp, 0.0)
        power = np.where(has_t, c.power, 0.0)
        # A restarted slot assumes its temperature is in equilibrium with some power.
        pf0 = np.clip((temp - coef[:, 0]) / np.maximum(coef[:, 1], 1e-3) * 100.0, 0.0, None)
        alpha = 1.0 - np.exp(-dt / self.tau[s])
        pf = np.where(restart, pf0, self.pf[s] + alpha * (power - self.pf[s]))
        self.pf[s] = pf
        x1 = pf / 100.0
        texp = coef[:, 0] + coef[:, 1] * x1
        resid = temp - texp

        # Learn the per-GPU thermal fit (exponential forgetting), only from healthy samples.
        upd = learn & has_t & (self.seen[s] >= 2)
        keep = np.exp(-dt / FORGET_S)
        u = s[upd]
        k = keep[upd][:, None]
        xv = np.stack([np.ones(len(u)), x1[upd]], axis=1)
        self.sxx[u] = self.sxx[u] * k[:, :, None] + xv[:, :, None] * xv[:, None, :]
        self.sxy[u] = self.sxy[u] * k + xv * temp[upd][:, None]

        # One failed NVML read is a missing value, not a zero: carry the last one
        # reported (a dip to 0 MiB and back would look like a leak's slope).
        util_in = np.where(np.isfinite(c.util), c.util, self.last_util[s])
        mem_in = np.where(np.isfinite(c.mem), c.mem, self.last_mem[s])
        procs_known = c.proc_sig != PROCS_UNKNOWN
        pmem_in = np.where(procs_known, c.proc_mem, self.last_pmem[s])
        sig = np.where(procs_known, c.proc_sig, self.last_sig[s])
        self.last_util[s], self.last_mem[s], self.last_pmem[s], self.last_sig[s] = util_in, mem_in, pmem_in, sig

        # Power explained by utilisation (piecewise-linear curve per GPU model).
        util = np.clip(np.nan_to_num(util_in, nan=0.0), 0.0, 100.0)
        pos = util / (100.0 / (UTIL_BINS - 1))
        lo = np.minimum(pos.astype(np.int64), UTIL_BINS - 2)
        frac = pos - lo
        curve = self.curve[s]
        rows = np.arange(n)
        p_exp = curve[rows, lo] * (1 - frac) + curve[rows, lo + 1] * frac
        span = np.maximum(curve[:, -1] - curve[:, 0], 1.0)
        pex = np.where(np.isfinite(c.power), (c.power - p_exp) / span, 0.0)

        # Never reported: NaN stays in the window, its slope is NaN and the feature reads 0.
        mem = mem_in
        una = mem_in - pmem_in

        # Ring buffers: restarted slots are refilled with the current sample.
        h = (self.head[s] + 1) % WINDOW
        self.head[s] = h
        for name, val in (("r_ts", c.ts), ("r_res", resid), ("r_pex", pex), ("r_mem", mem), ("r_una", una),
                          ("r_sig", sig)):
            ring = getattr(self, name)
            ring[s[restart]] = val[restart][:, None]
            ring[s, h] = val

        # Stuck sensor: span of the expected temperature since the reading last changed.
        changed = restart | (temp != self.last_temp[s])
        self.flat_lo[s] = np.where(changed, texp, np.minimum(self.flat_lo[s], texp))
        self.flat_hi[s] = np.where(changed, texp, np.maximum(self.flat_hi[s], texp))
        self.last_temp[s] = np.where(has_t, temp, math.nan)
        flat_span = self.flat_hi[s] - self.flat_lo[s]

        self.seen[s] += 1
        ts_w = self.r_ts[s]
        order = (np.arange(WINDOW)[None, :] - h[:, None] - 1) % WINDOW  # 0 = oldest
        recent = order >= WINDOW - SMOOTH
        res_w = self.r_res[s]
        temp_resid = np.where(recent, res_w, 0.0).sum(axis=1) / SMOOTH
        temp_trend = _slope(ts_w, res_w) * 60.0
        pex_max = np.where(order >= WINDOW - 5, self.r_pex[s], -np.inf).max(axis=1)
        sig = self.r_sig[s]
        same_procs = (sig == sig[rows, h][:, None]).all(axis=1)
        mem_growth = np.where(same_procs, _slope(ts_w, self.r_mem[s]), 0.0)
        una_growth = _slope(ts_w, self.r_una[s])
        busy = util >= 5.0
        clk = np.where(np.isfinite(c.sm_clock), c.sm_clock, self.max_sm[s])
        clock_deficit = np.where(busy, np.clip(1.0 - clk / self.max_sm[s], 0.0, 1.0), 0.0)
        slow = np.where(np.isfinite(c.slowdown), c.slowdown, self.slow[s])
        headroom = slow - temp

        feats = np.stack([temp_resid, temp_trend, flat_span, pex_max, mem_growth, una_growth, clock_deficit,
                          headroom, util / 100.0], axis=1)
        valid = has_t & (self.seen[s] >= MIN_SEEN)
        return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0), valid

    def columns(self, rows: Sequence[tuple[str, float, GpuSample]]) -> Columns:
        """Turn (host, ts, sample) rows into column arrays, assigning slots (one Python pass)."""
        n = len(rows)
        slot = np.empty(n, dtype=np.int64)
        sig = np.empty(n, dtype=np.int64)
        vals = np.full((n, 8), math.nan)
        nan = math.nan
        for i, (host, ts, g) in enumerate(rows):
            slot[i] = self.slot(host, g.index, g.name)
            if g.processes is None:  # not read this time: unknown, not "no processes"
                sig[i], pm = PROCS_UNKNOWN, nan
            else:
                sig[i] = hash(tuple(sorted(p.pid for p in g.processes)))
                pm = sum(p.mem_used_mib or 0.0 for p in g.processes)
            vals[i] = (ts, nan if g.temp_c is None else g.temp_c, nan if g.power_w is None else g.power_w,
                       nan if g.util_pct is None else g.util_pct,
                       nan if g.mem_used_mib is None else g.mem_used_mib, pm,
                       nan if g.sm_clock_mhz is None else g.sm_clock_mhz,
                       nan if g.slowdown_temp_c is None else g.slowdown_temp_c)
        return Columns(slot, vals[:, 0], vals[:, 1], vals[:, 2], vals[:, 3], vals[:, 4], vals[:, 5], sig,
                       vals[:, 6], vals[:, 7])

    def expected_temp(self, host: str, gpu: int) -> float | None:
        """The thermal model's current expectation for one GPU (for messages and plots)."""
        s = self._slots.get((host, gpu))
        if s is None:
            return None
        coef = self.thermal_coef(np.array([s]))
        return float(coef[0, 0] + coef[0, 1] * self.pf[s] / 100.0)


def _slope(t: F64, y: F64) -> F64:
    """Least-squares slope of y over t, row-wise (per unit of t)."""
    tc = t - t.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    var = (tc * tc).sum(axis=1)
    out: F64 = np.where(var > 0, (tc * yc).sum(axis=1) / np.where(var > 0, var, 1.0), 0.0)
    return out


# ---------------------------------------------------------------------- fitting the per-model parameters


def fit_thermal(series: list[tuple[F64, F64, F64]], taus: tuple[float, ...] = tuple(range(15, 95, 5))
                ) -> tuple[float, float, float]:
    """Fit (tau, a, R) from per-GPU (ts, power, temp) series of normal operation.

    tau is shared (grid search on the pooled error); a and R are fitted per GPU
    and their medians become the GPU model's prior.
    """
    best: tuple[float, float, float, float] | None = None
    for tau in taus:
        sse, coefs = 0.0, []
        for ts, p, t in series:
            if len(ts) < 6 * tau:
                continue
            pf = _lowpass(ts, p, tau)
            # The filter starts from an unknown thermal state: skip ~3 time constants.
            skip = int(3 * tau)
            x = np.stack([np.ones(len(pf)), pf], axis=1)[skip:]
            y = t[skip:]
            c, *_ = np.linalg.lstsq(x, y, rcond=None)
            sse += float(((x @ c - y) ** 2).sum())
            coefs.append(c)
        if coefs and (best is None or sse < best[0]):
            cm = np.median(np.array(coefs), axis=0)
            best = (sse, tau, float(cm[0]), float(cm[1]))
    if best is None:
        raise ValueError("not enough data to fit the thermal model")
    return best[1], best[2], best[3]


def _lowpass(ts: F64, p: F64, tau: float) -> F64:
    out = np.empty_like(p)
    acc = p[0]
    dts = np.diff(ts, prepend=ts[0])
    alphas = 1.0 - np.exp(-np.clip(dts, 0.0, GAP_S) / tau)
    for i in range(len(p)):
        acc += alphas[i] * (p[i] - acc)
        out[i] = acc
    return out


def fit_power_curve(util: F64, power: F64) -> tuple[float, ...]:
    """Median power per utilisation knot (linear interpolation fills empty bins)."""
    knots = np.linspace(0.0, 100.0, UTIL_BINS)
    idx = np.clip(np.rint(util / 5.0).astype(np.int64), 0, UTIL_BINS - 1)
    med = np.full(UTIL_BINS, np.nan)
    for i in range(UTIL_BINS):
        sel = power[idx == i]
        if len(sel) >= 20:
            med[i] = float(np.median(sel))
    ok = np.isfinite(med)
    if ok.sum() < 2:
        raise ValueError("not enough utilisation spread to fit the power curve")
    med = np.interp(knots, knots[ok], med[ok])
    return tuple(float(v) for v in np.maximum.accumulate(med))
