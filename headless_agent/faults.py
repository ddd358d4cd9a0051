"""Fault injection for the simulated backend: spec parsing, ground truth, effects.

A fault spec is one short string so it fits a command line and the
``inject_fault`` command::

    KIND:gpu=N[,at=SECONDS][,duration=SECONDS][,param=value...]

    fan_failure:gpu=2,at=60
    xid_storm:gpu=0,at=10,code=79
    gpu_lost:gpu=1,at=30,duration=120

``at`` counts from the fault's origin: the agent's start for faults given at
start-up, the injection time for faults injected while running. ``parse_fault``
is pure; ``FaultSpec.active`` is the ground-truth label that anomaly-detection
evaluations compare against. ``ActiveFault`` turns a spec into per-step effects
for ``headless_agent.simulate``; it draws randomness only from the generator it
is handed, so a seeded simulation stays reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

FAULT_KINDS: tuple[str, ...] = (
    "fan_failure",
    "thermal_runaway",
    "memory_leak",
    "power_spikes",
    "stuck_sensor",
    "xid_storm",
    "gpu_lost",
    "ecc_errors",
)

# Kind-specific parameters and their defaults (None: no default, optional).
# Kept beside the kinds so an error message can list exactly what a kind takes.
_PARAMS: dict[str, dict[str, float | None]] = {
    # rate: thermal-resistance increase per minute (0.25 = +25 %/min); max_factor caps it.
    "fan_failure": {"rate": 0.25, "max_factor": 4.0},
    # rate: extra heating in C/s; max_c caps the extra rise.
    "thermal_runaway": {"rate": 0.5, "max_c": 50.0},
    # rate: MiB leaked per second (until the GPU is full).
    "memory_leak": {"rate": 50.0},
    # rate: spikes per minute; amplitude: fraction of (TDP - idle) added; length: seconds each.
    "power_spikes": {"rate": 6.0, "amplitude": 0.6, "length": 2.0},
    # value: the frozen reading in C; by default the reading when the fault starts.
    "stuck_sensor": {"value": None},
    # code: XID reported; period: seconds between errors.
    "xid_storm": {"code": 79.0, "period": 5.0},
    "gpu_lost": {},
    # rate: double-bit ECC errors per minute (on average).
    "ecc_errors": {"rate": 2.0},
}
_INT_PARAMS = frozenset({"gpu", "code"})
_COMMON = ("gpu", "at", "duration")


@dataclass(frozen=True)
class FaultSpec:
    """One parsed fault: what, where, when (relative to its origin), and its parameters."""

    kind: str
    gpu: int
    at: float = 0.0
    duration: float | None = None  # None: lasts until the simulation ends
    params: tuple[tuple[str, float], ...] = ()

    def active(self, t_rel: float) -> bool:
        """Ground truth: is the fault in effect ``t_rel`` seconds after its origin?"""
        if t_rel < self.at:
            return False
        return self.duration is None or t_rel < self.at + self.duration

    def window(self, origin: float) -> tuple[float, float | None]:
        """Absolute [start, end) of the fault for an origin timestamp; end None = open."""
        start = origin + self.at
        return start, (None if self.duration is None else start + self.duration)

    def param(self, name: str) -> float | None:
        """A kind-specific parameter: the given value, else the kind's default."""
        for key, value in self.params:
            if key == name:
                return value
        return _PARAMS[self.kind][name]

    def num(self, name: str) -> float:
        """A parameter that has a numeric default (every one except stuck_sensor's value)."""
        value = self.param(name)
        if value is None:
            raise KeyError(f"{self.kind} parameter {name!r} has no default")
        return value

    def __str__(self) -> str:
        parts = [f"gpu={self.gpu}"]
        if self.at:
            parts.append(f"at={self.at:g}")
        if self.duration is not None:
            parts.append(f"duration={self.duration:g}")
        parts += [f"{k}={v:g}" for k, v in self.params]
        return f"{self.kind}:{','.join(parts)}"


def _number(kind: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"fault {kind}: {key}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"fault {kind}: {key}={text!r} must be finite")
    if key in _INT_PARAMS and value != int(value):
        raise ValueError(f"fault {kind}: {key}={text!r} must be a whole number")
    if value < 0:
        raise ValueError(f"fault {kind}: {key}={text!r} must not be negative")
    return value


def parse_fault(spec: str) -> FaultSpec:
    """Parse ``KIND:gpu=N[,at=S][,duration=S][,param=value...]``; ValueError says what is wrong."""
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r} in {spec!r}; valid kinds: {', '.join(FAULT_KINDS)}")
    if not sep or not rest.strip():
        raise ValueError(f"fault {kind}: missing 'gpu=N' (syntax: {kind}:gpu=N[,at=SECONDS][,param=value])")
    allowed = _COMMON + tuple(_PARAMS[kind])
    values: dict[str, float] = {}
    for item in rest.split(","):
        key, eq, val = (s.strip() for s in item.partition("="))
        if not eq or not key or not val:
            raise ValueError(f"fault {kind}: {item.strip()!r} is not key=value")
        key = key.lower()
        if key not in allowed:
            raise ValueError(f"fault {kind}: unknown parameter {key!r}; it takes {', '.join(allowed)}")
        if key in values:
            raise ValueError(f"fault {kind}: {key} given twice")
        values[key] = _number(kind, key, val)
    if "gpu" not in values:
        raise ValueError(f"fault {kind}: missing 'gpu=N' (which GPU index the fault hits)")
    duration = values.pop("duration", None)
    if duration is not None and duration <= 0:
        raise ValueError(f"fault {kind}: duration must be positive")
    gpu = int(values.pop("gpu"))
    at = values.pop("at", 0.0)
    return FaultSpec(kind=kind, gpu=gpu, at=at, duration=duration, params=tuple(sorted(values.items())))


# --------------------------------------------------------------------------- runtime effects


@dataclass
class Effects:
    """What all active faults do to one GPU during one simulation step."""

    lost: bool = False
    r_th_factor: float = 1.0
    fan_dead: bool = False
    heat_offset_c: float = 0.0
    runaway: bool = False
    leak_mib: float = 0.0  # MiB leaked during this step
    spike_frac: float = 0.0  # extra power as a fraction of (TDP - idle)
    stuck: bool = False
    stuck_value: float | None = None
    xid: int | None = None
    ecc_new: int = 0


@dataclass
class ActiveFault:
    """A fault scheduled in a running simulation, with its own small mutable state."""

    spec: FaultSpec
    origin: float  # absolute time that ``spec.at`` counts from
    rng: random.Random
    _spike_until: float = field(default=-math.inf, repr=False)
    _spike_frac: float = field(default=0.0, repr=False)
    _next_xid: float | None = field(default=None, repr=False)
    _ecc_opened: bool = field(default=False, repr=False)

    def active(self, now: float) -> bool:
        return self.spec.active(now - self.origin)

    def apply(self, t: float, dt: float, eff: Effects) -> None:
        """Add this fault's effect over the step ending at ``t`` (length ``dt``) to ``eff``."""
        spec = self.spec
        if not self.active(t):
            self._next_xid = None
            return
        elapsed = t - self.origin - spec.at
        kind = spec.kind
        if kind == "gpu_lost":
            eff.lost = True
        elif kind == "fan_failure":
            # Fan bearings seize / a chassis fan dies: cooling degrades steadily, not at once.
            factor = min(spec.num("max_factor"), 1.0 + spec.num("rate") * elapsed / 60.0)
            eff.r_th_factor *= max(1.0, factor)
            eff.fan_dead = True
        elif kind == "thermal_runaway":
            eff.heat_offset_c += min(spec.num("max_c"), spec.num("rate") * elapsed)
            eff.runaway = True
        elif kind == "memory_leak":
            eff.leak_mib += spec.num("rate") * dt
        elif kind == "power_spikes":
            self._spikes(t, dt, eff)
        elif kind == "stuck_sensor":
            eff.stuck = True
            eff.stuck_value = spec.param("value")
        elif kind == "xid_storm":
            self._xids(t, eff)
        elif kind == "ecc_errors":
            # Like an XID storm, the fault opens with its first error (its onset is when it shows);
            # more follow at ``rate`` per minute.
            if not self._ecc_opened:
                self._ecc_opened = True
                eff.ecc_new += 1
            eff.ecc_new += _poisson(self.rng, spec.num("rate") * dt / 60.0)

    def _spikes(self, t: float, dt: float, eff: Effects) -> None:
        spec = self.spec
        if t >= self._spike_until and self.rng.random() < spec.num("rate") * dt / 60.0:
            self._spike_until = t + spec.num("length") * self.rng.uniform(0.5, 1.5)
            self._spike_frac = spec.num("amplitude") * self.rng.uniform(0.8, 1.2)
        if t < self._spike_until:
            eff.spike_frac += self._spike_frac

    def _xids(self, t: float, eff: Effects) -> None:
        period = max(0.1, self.spec.num("period"))
        if self._next_xid is None:
            self._next_xid = t  # the storm opens with an error straight away
        if t >= self._next_xid:
            eff.xid = int(self.spec.num("code"))
            # A little jitter: real storms are not metronomic.
            self._next_xid = t + period * self.rng.uniform(0.7, 1.3)


def _poisson(rng: random.Random, lam: float) -> int:
    """Small-mean Poisson draw (Knuth); the step means here are far below 1."""
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1
