"""A simulated GPU host: physics, background load, jobs and faults, all seeded.

It stands in for NVML wherever there are no GPUs (demos, tests, CI) and is
meant to be realistic enough to exercise the whole product:

* power follows utilisation (idle + dynamic range x util**gamma), capped by the
  power limit (``sw_power_cap``, lower clocks);
* temperature follows power through a first-order thermal model
  dT/dt = (T_amb + R_th * P - T) / tau, so it lags a load step by tens of
  seconds; near the slowdown temperature clocks throttle, which cuts power and
  holds the temperature there;
* jobs occupy memory, utilisation and power; they slow down with the clocks,
  fail with OOM when memory overflows, fail "thermal" when a GPU overheats,
  and fail when their GPU is lost;
* faults (``headless_agent.faults``) alter the physics or the readings.

Time only moves inside calls that take ``now``; each advance is cut into
substeps of at most one second. Every random draw comes from generators seeded
by (seed, host, GPU index), never the global generator or the wall clock, so
the same seed and the same sequence of calls give identical samples.
"""

from __future__ import annotations

import math
import os.path
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from aether_protocol import GpuSample, JobSpec, Process
from headless_agent.backend import BackendError, JobOutcome, resolve_gpus
from headless_agent.faults import ActiveFault, Effects, FaultSpec, parse_fault
from headless_agent.gpu_models import GpuModel, parse_models
from headless_agent.sim_workload import INTENSITY, MEM_BW, Work, background_step, begin_background

MAX_DT_S = 1.0
# A gap longer than this many substeps (a suspended laptop, a stalled loop) is
# crossed in coarser steps: the thermal update is exact for any dt, and
# simulating a day second by second would stall the agent.
MAX_SUBSTEPS = 3600
DRIVER_BASE_MIB = 500.0
SLEEP_POWER_FRACTION = 0.3
SLEEP_SM_MHZ = 210
SLEEP_MEM_MHZ = 405
# A job gives up after this long at/above the slowdown temperature (leaky: time
# below it counts back down). Brief excursions are normal; minutes are not.
THERMAL_FAIL_S = 300.0
DEFAULT_EXPECTED_S = 60.0
@dataclass(eq=False)
class _Gpu:
    index: int
    model: GpuModel
    uuid: str
    rng: random.Random
    r_th: float  # this board's thermal resistance (slot position, paste, airflow)
    amb_offset: float
    power_limit: float
    state: str = "ok"
    temp: float = 30.0
    power: float = 0.0
    util: float = 0.0
    mem_util: float = 0.0
    perf: float = 1.0  # sm clock / max clock under load: how fast work progresses
    share: float = 1.0  # fraction of each work's demand served when oversubscribed
    sm_mhz: float = 0.0
    throttle: list[str] = field(default_factory=list)
    energy_j: float = 0.0
    hot_s: float = 0.0
    leak_mib: float = 0.0
    ecc_dbe: int = 0
    xid: int | None = None
    stuck_temp: float | None = None
    fan_dead: bool = False
    works: list[Work] = field(default_factory=list)
    bg: Work | None = None
    bg_next: float = 0.0  # when an idle background gap ends


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class SimulatedBackend:
    """A seeded simulated host implementing ``GpuBackend`` and ``SimulatedJobs``."""

    def __init__(
        self,
        n_gpus: int,
        seed: int = 0,
        model: str = "H100",
        host: str = "sim",
        faults: Sequence[str] = (),
        start_ts: float | None = None,
        background_load: bool = True,
    ) -> None:
        if n_gpus < 0:
            raise ValueError(f"n_gpus must not be negative, got {n_gpus}")
        # The host is part of every seed so a demo fleet of agents sharing one
        # --seed still gets hosts that differ.
        self._key = f"{seed}:{host}"
        self._rng = random.Random(f"{self._key}:host")
        self._background = background_load
        self._amb_base = 25.0 + self._rng.uniform(0.0, 5.0)
        self._ambient = self._amb_base
        self._next_pid = self._rng.randint(2000, 30000)
        self._gpus: list[_Gpu] = []
        for i, m in enumerate(parse_models(model, n_gpus) if n_gpus else []):
            rng = random.Random(f"{self._key}:{i}")
            self._gpus.append(
                _Gpu(
                    index=i,
                    model=m,
                    uuid=_uuid(random.Random(f"{self._key}:uuid:{i}")),
                    rng=rng,
                    r_th=m.r_th_k_per_w * rng.uniform(0.93, 1.07),
                    amb_offset=rng.uniform(0.0, 3.0),
                    power_limit=m.tdp_w,
                )
            )
        self._jobs: dict[str, Work] = {}
        self._outcomes: list[JobOutcome] = []
        self._faults: list[ActiveFault] = []
        self._pending_faults = [self._checked(s) for s in faults]
        self._start_ts = start_ts
        self._t: float | None = None
        # The agent reads in an executor thread while commands arrive on the
        # event loop, so every public call holds this lock.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ GpuBackend

    def gpu_count(self) -> int:
        return len(self._gpus)

    def read(self, now: float) -> list[GpuSample]:
        with self._lock:
            self._advance(now)
            return [self._sample(g) for g in self._gpus]

    def sleep(self, gpus: Sequence[int] | None) -> None:
        with self._lock:
            targets = self._controllable(gpus, "put to sleep")
            for g in targets:
                running = [w.job.id for w in g.works if w.job is not None]
                if running:
                    raise BackendError(
                        f"GPU {g.index} is running job {running[0]}; cancel it before sleeping the GPU"
                    )
            for g in targets:
                # Synthetic background users are evicted silently: they exist only for show.
                g.works.clear()
                g.bg = None
                g.state = "sleeping"

    def wake(self, gpus: Sequence[int] | None) -> None:
        with self._lock:
            for g in self._controllable(gpus, "woken"):
                if g.state == "sleeping":
                    g.state = "ok"
                    g.bg_next = (self._t or 0.0) + g.rng.uniform(30.0, 300.0)

    def set_power_limit(self, gpus: Sequence[int] | None, watts: float) -> None:
        with self._lock:
            targets = self._controllable(gpus, "given a power limit")
            for g in targets:
                m = g.model
                if not m.min_limit_w <= watts <= m.max_limit_w:
                    raise BackendError(
                        f"power limit {watts:g} W is outside GPU {g.index}'s range "
                        f"{m.min_limit_w:g}-{m.max_limit_w:g} W ({m.name})"
                    )
            for g in targets:
                g.power_limit = float(watts)

    def close(self) -> None:
        """Nothing to release: the simulation holds no OS resources."""

    # ------------------------------------------------------------------ SimulatedJobs

    def start_job(self, job: JobSpec, now: float) -> None:
        with self._lock:
            self._advance(now)
            if not job.gpus:
                raise BackendError(f"job {job.id} names no GPU")
            if job.id in self._jobs:
                raise BackendError(f"job {job.id} is already running")
            gpus = [self._gpus[i] for i in resolve_gpus(job.gpus, len(self._gpus))]
            for g in gpus:
                if g.state == "sleeping":
                    raise BackendError(f"GPU {g.index} is sleeping; wake it first")
                if g.state == "lost":
                    raise BackendError(f"GPU {g.index} is lost (not responding); it cannot run jobs")
            kind = job.kind or "training"
            smallest = min(g.model.mem_total_mib for g in gpus)
            mem = job.mem_mib if job.mem_mib is not None else smallest * (0.25 if kind == "training" else 0.1)
            work = Work(
                kind=kind,
                mem_mib=float(mem),
                pid=self._new_pid(),
                name=os.path.basename(job.argv[0]) or job.argv[0],
                gpus=tuple(g.index for g in gpus),
                start=self._t if self._t is not None else now,
                job=job,
                expected_s=DEFAULT_EXPECTED_S if job.expected_s is None else float(job.expected_s),
                level=10.0,
            )
            self._jobs[job.id] = work
            for g in gpus:
                g.works.append(work)

    def cancel_job(self, job_id: str, now: float) -> bool:
        with self._lock:
            self._advance(now)
            work = self._jobs.get(job_id)
            if work is None:
                return False
            self._end(work, "job_cancelled", -15, "cancelled (SIGTERM)")
            return True

    def poll_jobs(self, now: float) -> list[JobOutcome]:
        with self._lock:
            self._advance(now)
            out, self._outcomes = self._outcomes, []
            return out

    def inject_fault(self, spec: str, now: float) -> None:
        with self._lock:
            fault = self._checked(spec)
            self._advance(now)
            self._add_fault(fault, now)

    # ------------------------------------------------------------------ ground truth

    @property
    def faults(self) -> list[tuple[FaultSpec, float]]:
        """Every scheduled fault with the absolute time its ``at`` counts from."""
        return [(f.spec, f.origin) for f in self._faults]

    def active_faults(self, now: float) -> list[FaultSpec]:
        """Faults in effect at ``now``: the labels an anomaly detector is scored against."""
        with self._lock:
            return [f.spec for f in self._faults if f.active(now)]

    # ------------------------------------------------------------------ internals

    def _checked(self, spec: str) -> FaultSpec:
        fault = parse_fault(spec)
        if fault.gpu >= len(self._gpus):
            raise ValueError(f"fault {spec!r}: no GPU {fault.gpu} on this host (it has {len(self._gpus)})")
        return fault

    def _add_fault(self, spec: FaultSpec, origin: float) -> None:
        rng = random.Random(f"{self._key}:fault:{len(self._faults)}:{spec}")
        self._faults.append(ActiveFault(spec=spec, origin=origin, rng=rng))

    def _controllable(self, gpus: Sequence[int] | None, verb: str) -> list[_Gpu]:
        """GPUs a control call acts on; a lost GPU is an error only when named explicitly."""
        targets = [self._gpus[i] for i in resolve_gpus(gpus, len(self._gpus))]
        if gpus is None:
            return [g for g in targets if g.state != "lost"]
        for g in targets:
            if g.state == "lost":
                raise BackendError(f"GPU {g.index} is lost (not responding); it cannot be {verb}")
        return targets

    def _new_pid(self) -> int:
        self._next_pid += self._rng.randint(1, 40)
        return self._next_pid

    def _start_clock(self, t0: float) -> None:
        self._t = t0
        for spec in self._pending_faults:
            self._add_fault(spec, t0)
        self._pending_faults = []
        for g in self._gpus:
            load = 0.0
            if self._background and g.rng.random() < 0.5:
                begin_background(g, t0, remaining=True, new_pid=self._new_pid)
                load = 0.9
            p = g.model.idle_w + (g.model.tdp_w - g.model.idle_w) * load**g.model.gamma
            g.temp = self._ambient + g.amb_offset + g.r_th * p
            g.power = p
            if g.bg is None:
                g.bg_next = t0 + g.rng.expovariate(1.0 / 120.0)
        # A zero-length step fills in power, clocks and throttle reasons so the
        # very first read already looks like a running GPU.
        self._step(t0, 0.0)

    def _advance(self, now: float) -> None:
        if self._t is None:
            self._start_clock(now if self._start_ts is None else min(self._start_ts, now))
        assert self._t is not None
        t0 = self._t
        gap = now - t0
        if gap <= 0:
            return  # time never runs backwards; a stale `now` just re-reads the state
        n = min(MAX_SUBSTEPS, max(1, math.ceil(gap / MAX_DT_S - 1e-9)))
        for i in range(1, n + 1):
            t = now if i == n else t0 + gap * i / n
            self._step(t, gap / n)
        self._t = now

    def _step(self, t: float, dt: float) -> None:
        # Room temperature wanders slowly around the host's base (mean-reverting walk).
        drift = (self._amb_base - self._ambient) * dt / 600.0
        self._ambient += drift + self._rng.gauss(0.0, 0.03) * math.sqrt(dt)
        for w in self._jobs.values():
            w.update_level(t, dt, self._gpus[w.gpus[0]].rng)
        for g in self._gpus:
            eff = Effects()
            for f in self._faults:
                if f.spec.gpu == g.index:
                    f.apply(t, dt, eff)
            self._physics(g, t, dt, eff)
        for w in list(self._jobs.values()):
            self._progress(w, dt)

    def _physics(self, g: _Gpu, t: float, dt: float, eff: Effects) -> None:
        m = g.model
        amb = self._ambient + g.amb_offset
        if eff.lost:
            if g.state != "lost":
                self._lose(g)
            # Off the bus and unpowered: it just cools towards the room.
            g.temp += (amb - g.temp) * (1.0 - math.exp(-dt / m.tau_s))
            return
        if g.state == "lost":
            g.state, g.leak_mib, g.bg_next = "ok", 0.0, t + g.rng.uniform(30.0, 300.0)
        if eff.xid is not None:
            g.xid = eff.xid
        g.ecc_dbe += eff.ecc_new
        g.fan_dead = eff.fan_dead
        if not eff.stuck:
            g.stuck_temp = None
        elif g.stuck_temp is None:
            g.stuck_temp = eff.stuck_value if eff.stuck_value is not None else float(round(g.temp))
        if g.state == "sleeping":
            g.power = m.idle_w * SLEEP_POWER_FRACTION * (1.0 + g.rng.gauss(0.0, 0.02))
            g.util = g.mem_util = 0.0
            g.perf, g.share, g.sm_mhz, g.throttle = 0.0, 1.0, SLEEP_SM_MHZ, ["gpu_idle"]
        else:
            background_step(g, t, dt, self._background, self._new_pid)
            self._power(g, t, dt, eff)
        g.power = max(0.0, g.power)
        g.energy_j += g.power * dt
        t_eq = amb + g.r_th * eff.r_th_factor * g.power + eff.heat_offset_c
        g.temp += (t_eq - g.temp) * (1.0 - math.exp(-dt / m.tau_s))
        if g.temp >= m.slowdown_c:
            g.hot_s += dt
        else:
            g.hot_s = max(0.0, g.hot_s - dt)
        if g.state != "sleeping":
            self._memory(g, t, eff)

    def _power(self, g: _Gpu, t: float, dt: float, eff: Effects) -> None:
        m = g.model
        demands = [(w, w.level * w.ramp(t)) for w in g.works]
        demand = sum(d for _, d in demands)
        g.share = min(1.0, 100.0 / demand) if demand > 0 else 1.0
        g.util = min(100.0, demand)
        g.mem_util = min(100.0, sum(d * MEM_BW[w.kind] for w, d in demands) * g.share)
        load = min(1.0, sum(d * INTENSITY[w.kind] for w, d in demands) * g.share / 100.0)
        dyn_range = m.tdp_w - m.idle_w
        f_th, reasons = m.thermal_throttle(g.temp, eff.runaway)
        # Dynamic power goes roughly as f * V^2 and V follows f, so ~f**1.5 here.
        p_dyn = dyn_range * load**m.gamma * f_th**1.5 * (1.0 + g.rng.gauss(0.0, 0.015))
        p_idle = m.idle_w * (1.0 + g.rng.gauss(0.0, 0.01))
        factor = f_th
        if p_idle + p_dyn > g.power_limit and p_dyn > 0:
            factor *= min(1.0, max(0.0, (g.power_limit - p_idle) / p_dyn)) ** (1.0 / 1.5)
            g.power = g.power_limit * (1.0 - abs(g.rng.gauss(0.0, 0.004)))
            reasons.insert(0, "sw_power_cap")
        else:
            g.power = p_idle + p_dyn
        # Spikes are transients the limiter is too slow to catch, so they may exceed it.
        g.power += eff.spike_frac * dyn_range
        if g.util < 1.0:
            reasons.insert(0, "gpu_idle")
            g.sm_mhz = m.idle_sm_mhz
        else:
            g.sm_mhz = max(m.idle_sm_mhz, m.max_sm_mhz * factor)
        g.perf = factor
        g.throttle = reasons
        if demand > 0:
            # Each work is billed its utilisation share of the whole board's power.
            for w, d in demands:
                w.energy_j += g.power * (d / demand) * dt

    def _memory(self, g: _Gpu, t: float, eff: Effects) -> None:
        total = g.model.mem_total_mib
        used = DRIVER_BASE_MIB + g.leak_mib
        for w in list(g.works):
            want = w.mem_mib * w.ramp(t)
            if used + want > total and w.job is not None:
                detail = (
                    f"CUDA out of memory: tried to allocate {want - w.alloc_mib:.0f} MiB on GPU {g.index} "
                    f"({total} MiB total capacity; {used:.0f} MiB already in use)"
                )
                self._end(w, "job_failed", 1, detail)
                continue
            w.alloc_mib = want
            used += want
        # A leak fills only the free space: the leaking process never fails itself,
        # new jobs do, which is what operators see in practice.
        g.leak_mib += min(eff.leak_mib, max(0.0, total - used))

    def _progress(self, w: Work, dt: float) -> None:
        gpus = [self._gpus[i] for i in w.gpus]
        for g in gpus:
            m, why = g.model, None
            if g.temp >= m.shutdown_c:
                why = f"GPU {g.index} reached {g.temp:.0f} C (shutdown temperature {m.shutdown_c:g} C)"
            elif g.hot_s >= THERMAL_FAIL_S:
                why = f"GPU {g.index} held at or above {m.slowdown_c:g} C (slowdown) for {THERMAL_FAIL_S:g} s"
            if why:
                self._end(w, "job_failed", 1, f"thermal: {why}")
                return
        # A multi-GPU job is as fast as its slowest GPU (they synchronise every step).
        w.progress += dt * min(g.perf * g.share for g in gpus)
        if w.progress >= w.expected_s:
            self._end(w, "job_finished", 0, None)

    def _lose(self, g: _Gpu) -> None:
        g.state = "lost"
        for w in list(g.works):
            if w.job is not None:
                self._end(w, "job_failed", 1, f"GPU {g.index} lost: Xid 79 (GPU has fallen off the bus)")
        g.works.clear()
        g.bg = None
        g.xid = None
        g.stuck_temp = None

    def _end(self, w: Work, kind: str, exit_code: int | None, detail: str | None) -> None:
        assert w.job is not None
        for i in w.gpus:
            works = self._gpus[i].works
            if w in works:
                works.remove(w)
        self._jobs.pop(w.job.id, None)
        self._outcomes.append(
            JobOutcome(w.job.id, w.gpus, kind, exit_code, detail, energy_j=round(w.energy_j, 1))
        )

    def _sample(self, g: _Gpu) -> GpuSample:
        m = g.model
        if g.state == "lost":
            return GpuSample(index=g.index, uuid=g.uuid, name=m.name, state="lost")
        rng = g.rng
        sleeping = g.state == "sleeping"
        temp = g.stuck_temp if g.stuck_temp is not None else float(round(g.temp + rng.gauss(0.0, 0.25)))
        used = 0.0 if sleeping else DRIVER_BASE_MIB + g.leak_mib + sum(w.alloc_mib for w in g.works)
        fan: float | None = None
        if m.has_fan:
            fan = 0.0 if g.fan_dead else float(round(min(100.0, max(30.0, 30.0 + (g.temp - 35.0) * 1.4))))
        xid, g.xid = g.xid, None
        return GpuSample(
            index=g.index,
            uuid=g.uuid,
            name=m.name,
            state="sleeping" if sleeping else "ok",
            temp_c=temp,
            mem_used_mib=float(round(min(m.mem_total_mib, used + (rng.uniform(-4, 4) if used else 0.0)))),
            mem_total_mib=float(m.mem_total_mib),
            util_pct=float(round(g.util)),
            mem_util_pct=float(round(g.mem_util)),
            power_w=round(g.power, 1),
            power_limit_w=g.power_limit,
            # Real clocks move in 15 MHz steps.
            sm_clock_mhz=float(round(g.sm_mhz / 15.0) * 15),
            mem_clock_mhz=float(SLEEP_MEM_MHZ if sleeping else m.mem_clock_mhz),
            fan_pct=fan,
            energy_j=round(g.energy_j, 1),
            throttle=list(g.throttle),
            ecc_dbe=g.ecc_dbe,
            xid=xid,
            processes=[
                Process(pid=w.pid, name=w.name, mem_used_mib=float(round(w.alloc_mib)))
                for w in g.works
                if w.alloc_mib > 0 or w.job is not None
            ],
            slowdown_temp_c=m.slowdown_c,
        )
