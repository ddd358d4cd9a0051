"""Fast event-driven simulator of a GPU fleet, for replay and for training the scheduler.

Physics follow the agent's simulated backend (``headless_agent/simulate.py``)
in kind, but advance from event to event instead of once per wall-clock
second, so a day of fleet time replays in well under a second:

* memory: a job allocates 75 % of its peak at start and grows to its peak by
  10 % progress; the job whose allocation overflows the GPU dies with OOM;
* power: idle + (TDP - idle) x demanded load, capped by the power limit
  (the cap slows the job in proportion);
* heat: first-order lag towards inlet + host recirculation + R x power;
  above the model's slowdown temperature clocks drop (slowdown, less power);
  above its critical temperature every job on the GPU runs a failure hazard;
* sharing: jobs with a fractional share (``gpu_milli``) time-slice a GPU and
  interfere a little with each other.

Between events the state is piecewise constant; while any job runs the step
is bounded (``max_step_s``) so temperature, throttling and the failure
hazard are resolved finely enough. An idle fleet jumps straight to the next
event. Everything random comes from one seeded generator: same seed, same run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aether_desktop.services.jobtypes import GpuCandidate


@dataclass(frozen=True)
class GpuModelSpec:
    name: str
    mem_mib: float
    tdp_w: float
    idle_w: float
    slowdown_c: float
    crit_c: float
    r_k_per_w: float  # die-to-inlet thermal resistance of a healthy board


# Figures are rounded public datasheet values; the thermal resistance is chosen
# so a healthy board at full load in a 25 °C inlet sits near 75 °C.
GPU_MODELS: dict[str, GpuModelSpec] = {
    m.name: m
    for m in (
        GpuModelSpec("T4-16GB", 15360, 70, 10, 84, 92, 0.62),
        GpuModelSpec("V100-16GB", 16160, 300, 40, 87, 94, 0.155),
        GpuModelSpec("V100-32GB", 32510, 300, 40, 87, 94, 0.155),
        GpuModelSpec("A100-40GB", 40536, 400, 55, 88, 95, 0.118),
        GpuModelSpec("A100-80GB", 81920, 400, 60, 88, 95, 0.118),
        GpuModelSpec("L40S-48GB", 46068, 350, 35, 86, 93, 0.135),
        GpuModelSpec("H100-80GB", 81559, 700, 70, 87, 94, 0.068),
    )
}
DEFAULT_GPU_MODEL = "A100-40GB"
HOST_RECIRC_K_PER_W = 0.018  # inlet rise per watt of mean GPU power on the same host
TAU_S = 90.0  # thermal time constant of a board with its heatsink
THROTTLE_PER_K = 0.05  # clock loss per kelvin above the slowdown temperature
THERMAL_HAZARD_PER_K_S = 1.0 / 400.0  # failure rate per kelvin above critical
INTERFERENCE = 0.08  # extra slowdown per co-running job on a time-sliced GPU
FLEET_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?::\s*([A-Za-z0-9_.-]+))?\s*$")


class FleetSpecError(ValueError):
    """A --fleet string that cannot be understood; the message says why."""


@dataclass(frozen=True)
class HostSpec:
    name: str
    model: str
    n_gpus: int


def parse_fleet(spec: str, default_model: str = DEFAULT_GPU_MODEL) -> list[HostSpec]:
    """``2x8``, ``2x8:H100-80GB`` or ``1x8:A100-80GB,2x4:V100-16GB`` -> hosts gpu-node-01..."""
    hosts: list[HostSpec] = []
    for part in spec.split(","):
        m = FLEET_RE.match(part)
        if not m:
            raise FleetSpecError(
                f"fleet part {part.strip()!r} is not HOSTSxGPUS[:MODEL] (e.g. 2x8:A100-40GB)"
            )
        n_hosts, n_gpus, model = int(m.group(1)), int(m.group(2)), m.group(3) or default_model
        if model not in GPU_MODELS:
            raise FleetSpecError(f"unknown GPU model {model!r}; known: {', '.join(GPU_MODELS)}")
        if not (1 <= n_hosts <= 4096 and 1 <= n_gpus <= 64):
            raise FleetSpecError(f"fleet part {part.strip()!r}: need 1-4096 hosts of 1-64 GPUs")
        for _ in range(n_hosts):
            hosts.append(HostSpec(f"gpu-node-{len(hosts) + 1:02d}", model, n_gpus))
    return hosts


@dataclass(frozen=True)
class SimJob:
    job_id: str
    mem_mib: float  # true peak per GPU (may differ from what the operator declared)
    work_s: float  # run time on an unloaded, cool GPU
    share: float = 1.0  # fraction of a GPU (gpu_milli / 1000)
    intensity: float = 0.9  # fraction of the TDP headroom the job drives at full share
    kind: str = "training"


@dataclass(frozen=True)
class SimOutcome:
    job_id: str
    host: str
    gpus: tuple[int, ...]
    start_s: float
    end_s: float
    outcome: str  # "ok" | "oom" | "thermal"
    energy_j: float
    slowdown: float  # wall time / work time
    gpu_slowdown: tuple[float, ...]  # time-averaged slowdown per GPU
    cause_gpu: int | None  # local index of the GPU whose failure ended the job


@dataclass
class _Run:
    job: SimJob
    host: int
    gpus: np.ndarray  # global GPU indices
    start_s: float
    remaining: float
    mem_now: float
    # Per-GPU running integrals at the job's start; the difference at its end
    # gives its mean slowdown and its energy without per-job work each step.
    slow0: np.ndarray
    eps0: np.ndarray


class FleetSim:
    """A fleet of simulated GPUs that jobs really run on."""

    def __init__(
        self,
        hosts: Sequence[HostSpec],
        seed: int = 0,
        *,
        bad_gpu_fraction: float = 0.07,
        inlet_c: Sequence[float] | None = None,
        max_step_s: float = 15.0,
        start_s: float = 0.0,
    ) -> None:
        if not hosts:
            raise FleetSpecError("a fleet needs at least one host")
        self.hosts = list(hosts)
        self.rng = np.random.default_rng(seed)
        self.max_step_s = max_step_s
        self.now = start_s
        specs = [GPU_MODELS[h.model] for h in self.hosts for _ in range(h.n_gpus)]
        self.n = len(specs)
        self.host_of = np.array(
            [i for i, h in enumerate(self.hosts) for _ in range(h.n_gpus)], dtype=np.int64
        )
        self.local = np.array([g for h in self.hosts for g in range(h.n_gpus)], dtype=np.int64)
        self.first_gpu = np.cumsum([0] + [h.n_gpus for h in self.hosts])[:-1]
        self.mem_cap = np.array([s.mem_mib for s in specs])
        self.tdp = np.array([s.tdp_w for s in specs])
        self.idle_w = np.array([s.idle_w for s in specs])
        self.power_limit = self.tdp.copy()
        self.slow_c = np.array([s.slowdown_c for s in specs])
        self.crit_c = np.array([s.crit_c for s in specs])
        # A few boards cool badly (clogged fins, a dead fan, the hot slot of a
        # chassis); that is what makes placement by temperature matter.
        bad = self.rng.random(self.n) < bad_gpu_fraction
        self.r_th = np.array([s.r_k_per_w for s in specs]) * self.rng.lognormal(0.0, 0.05, self.n)
        self.r_th[bad] *= self.rng.uniform(1.3, 1.5, int(bad.sum()))
        if inlet_c is None:
            self.inlet = self.rng.normal(25.0, 2.5, len(self.hosts)).clip(18.0, 35.0)
        else:
            self.inlet = np.asarray(inlet_c, dtype=float)
        self.power = self.idle_w.copy()
        self.temp = self._steady_temp(self.power)
        self.gpu_energy = np.zeros(self.n)
        self.runs: dict[str, _Run] = {}
        self._share = np.zeros(self.n)
        self._demand = np.zeros(self.n)
        self._mem = np.zeros(self.n)
        self._jobs = np.zeros(self.n)
        self._order: list[str] = []  # start order: the newest allocation is the one that OOMs
        self._host_names = [self.hosts[h].name for h in self.host_of.tolist()]
        self._models = [self.hosts[h].model for h in self.host_of.tolist()]
        self._local = self.local.tolist()
        self._cum_slow = np.zeros(self.n)  # integral of each GPU's slowdown over time
        self._cum_eps = np.zeros(self.n)  # integral of each GPU's power per unit of share
        self._dirty = True
        self._rem = np.zeros(0)  # remaining work of the runs in _order (authoritative while clean)
        self._idx = np.zeros(0, dtype=np.int64)
        self._off = np.zeros(0, dtype=np.int64)

    # ----------------------------------------------------------------- state
    def _per_gpu_load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Share, demanded load, memory and job count per GPU (kept incrementally: this is the hot path)."""
        return self._share, self._demand, self._mem, self._jobs

    def _book(self, r: _Run, sign: float) -> None:
        self._share[r.gpus] += sign * r.job.share
        self._demand[r.gpus] += sign * r.job.share * r.job.intensity
        self._mem[r.gpus] += sign * r.mem_now
        self._jobs[r.gpus] += sign
        if sign < 0 and not self.runs:
            # Nothing runs: clear float residue so an idle GPU reads exactly idle.
            for a in (self._share, self._demand, self._mem, self._jobs):
                a[:] = 0.0

    def _steady_temp(self, power: np.ndarray) -> np.ndarray:
        host_mean = np.bincount(self.host_of, weights=power, minlength=len(self.hosts)) / np.bincount(
            self.host_of, minlength=len(self.hosts)
        )
        temp: np.ndarray = (
            self.inlet[self.host_of] + HOST_RECIRC_K_PER_W * host_mean[self.host_of] + self.r_th * power
        )
        return temp

    def _rates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-GPU slowdown, drawn power and the load share, from the state now."""
        share, demand, _mem, jobs = self._per_gpu_load()
        want_w = self.idle_w + (self.tdp - self.idle_w) * np.minimum(demand, 1.0)
        s_power = np.maximum(1.0, (want_w - self.idle_w) / np.maximum(self.power_limit - self.idle_w, 1.0))
        s_power = np.where(demand > 0, s_power, 1.0)
        s_thermal = 1.0 + THROTTLE_PER_K * np.maximum(0.0, self.temp - self.slow_c)
        s_share = np.maximum(1.0, share) * (1.0 + INTERFERENCE * np.maximum(0.0, jobs - 1))
        drawn = self.idle_w + (np.minimum(want_w, self.power_limit) - self.idle_w) / s_thermal
        return s_share * s_power * s_thermal, drawn, share

    def free_share(self) -> np.ndarray:
        return 1.0 - self._per_gpu_load()[0]

    def mem_used(self) -> np.ndarray:
        """Memory in use per GPU as telemetry would show it (jobs plus the driver's context)."""
        return self._mem + 300.0

    def gpu_index(self, host: int, local: int) -> int:
        return int(self.first_gpu[host] + local)

    def candidates(self) -> list[GpuCandidate]:
        """The fleet as the scheduler sees it: one live snapshot per GPU."""
        share, _demand, mem, jobs = self._per_gpu_load()
        util = (np.minimum(share, 1.0) * np.where(jobs > 0, 97.0, 0.0)).tolist()
        temp = np.round(self.temp, 1).tolist()
        power = np.round(self.power, 1).tolist()
        used = (mem + 300.0).tolist()  # + driver context
        cap, limit, slow_c = self.mem_cap.tolist(), self.power_limit.tolist(), self.slow_c.tolist()
        n_jobs = jobs.astype(np.int64).tolist()
        return [
            GpuCandidate(
                self._host_names[i],
                self._local[i],
                self._models[i],
                "ok",
                temp[i],
                used[i],
                cap[i],
                util[i],
                power[i],
                limit[i],
                n_jobs[i],
                slow_c[i],
            )  # fmt: skip
            for i in range(self.n)
        ]

    # ---------------------------------------------------------------- control
    def start(self, job: SimJob, host: int, gpus: Sequence[int]) -> SimOutcome | None:
        """Start ``job`` on local ``gpus`` of ``host``; an immediate OOM is returned at once."""
        idx = np.array([self.gpu_index(host, g) for g in gpus], dtype=np.int64)
        if job.job_id in self.runs:
            raise ValueError(f"job {job.job_id} is already running")
        run = _Run(
            job,
            host,
            idx,
            self.now,
            job.work_s,
            0.75 * job.mem_mib,
            self._cum_slow[idx].copy(),
            self._cum_eps[idx].copy(),
        )
        _s, _d, mem, _j = self._per_gpu_load()
        over = np.nonzero(mem[idx] + run.mem_now + 300.0 > self.mem_cap[idx])[0]
        if len(over):
            # Dies while allocating: a few seconds of CUDA init, then OOM.
            return self._outcome(run, self.now + 5.0, "oom", int(over[0]))
        self._sync()
        self.runs[job.job_id] = run
        self._order.append(job.job_id)
        self._book(run, 1.0)
        return None

    def set_power_limit(self, host: int, gpus: Sequence[int], watts: float) -> None:
        for g in gpus:
            i = self.gpu_index(host, g)
            self.power_limit[i] = float(np.clip(watts, self.idle_w[i] + 10.0, self.tdp[i]))

    def next_completion(self) -> float:
        """When the earliest running job would finish if nothing changed (inf when idle)."""
        if not self.runs:
            return math.inf
        self._prepare()
        slow, _drawn, _share = self._rates()
        job_slow = np.maximum.reduceat(slow[self._idx], self._off)
        return self.now + float((self._rem * job_slow).min())

    def advance(self, until: float, stop_at_end: bool = False) -> list[SimOutcome]:
        """Run the fleet to ``until`` and return the jobs that ended, in time order.

        With ``stop_at_end`` it returns as soon as any job has ended (``now`` is
        then that moment), so a replay can use the freed GPUs at once.
        """
        done: list[SimOutcome] = []
        while self.now < until - 1e-9:
            if not self.runs:
                self._step_thermal(until - self.now, self.idle_w.copy(), np.ones(self.n), np.zeros(self.n))
                self.now = until
                break
            self._prepare()
            slow, drawn, share = self._rates()
            job_slow = np.maximum.reduceat(slow[self._idx], self._off)
            dt = min(until - self.now, self.max_step_s, float((self._rem * job_slow).min()))
            dt = max(dt, 1e-6)
            self._step_thermal(dt, drawn, slow, share)
            t_end = self.now + dt
            self._rem -= dt / job_slow
            for k, jid in enumerate(self._order):
                r = self.runs[jid]
                if r.mem_now < r.job.mem_mib:
                    # Allocation grows to its peak over the first 10 % of the work.
                    progress = 1.0 - float(self._rem[k]) / r.job.work_s
                    grown = r.job.mem_mib * (0.75 + 0.25 * min(1.0, progress / 0.1))
                    self._mem[r.gpus] += grown - r.mem_now
                    r.mem_now = grown
            for k in np.nonzero(self._rem <= 1e-6)[0][::-1]:
                done.append(self._finish(self._order[k], t_end, "ok", None))
            done.extend(self._check_oom(t_end))
            done.extend(self._check_thermal(t_end, dt))
            self.now = t_end
            if stop_at_end and done:
                break
        return done

    def _prepare(self) -> None:
        """Rebuild the flat (run, GPU) index after runs started or ended."""
        if not self._dirty:
            return
        runs = [self.runs[j] for j in self._order]
        self._rem = np.array([r.remaining for r in runs], dtype=float)
        self._idx = np.concatenate([r.gpus for r in runs]) if runs else np.zeros(0, dtype=np.int64)
        self._off = np.cumsum([0] + [len(r.gpus) for r in runs])[:-1].astype(np.int64)
        self._dirty = False

    def _sync(self) -> None:
        """Write the vectorised remaining work back to the runs before the set of runs changes."""
        if not self._dirty:
            for k, jid in enumerate(self._order):
                self.runs[jid].remaining = float(self._rem[k])
        self._dirty = True

    # ---------------------------------------------------------------- physics
    def _step_thermal(self, dt: float, drawn: np.ndarray, slow: np.ndarray, share: np.ndarray) -> None:
        target = self._steady_temp(drawn)
        self.temp = target + (self.temp - target) * math.exp(-dt / TAU_S)
        self.power = drawn
        self.gpu_energy += drawn * dt
        self._cum_slow += slow * dt
        # A job's energy is its share of the power of its GPUs.
        self._cum_eps += np.where(share > 0, drawn / np.maximum(share, 1e-9), 0.0) * dt

    def _check_oom(self, t: float) -> list[SimOutcome]:
        out: list[SimOutcome] = []
        _s, _d, mem, _j = self._per_gpu_load()
        over = mem + 300.0 > self.mem_cap
        if not over.any():
            return out
        for jid in reversed(list(self._order)):  # newest allocation fails first
            r = self.runs[jid]
            hit = np.nonzero(over[r.gpus])[0]
            if len(hit):
                out.append(self._finish(jid, t, "oom", int(hit[0])))
                _s, _d, mem, _j = self._per_gpu_load()
                over = mem + 300.0 > self.mem_cap
                if not over.any():
                    break
        return out

    def _check_thermal(self, t: float, dt: float) -> list[SimOutcome]:
        hot = self.temp > self.crit_c
        if not hot.any():
            return []
        out: list[SimOutcome] = []
        p_fail = 1.0 - np.exp(-dt * THERMAL_HAZARD_PER_K_S * np.maximum(0.0, self.temp - self.crit_c))
        for jid in list(self._order):
            r = self.runs[jid]
            draws = self.rng.random(len(r.gpus))
            hit = np.nonzero(hot[r.gpus] & (draws < p_fail[r.gpus]))[0]
            if len(hit):
                out.append(self._finish(jid, t, "thermal", int(hit[0])))
        return out

    def _finish(self, jid: str, t: float, outcome: str, cause: int | None) -> SimOutcome:
        self._sync()
        r = self.runs.pop(jid)
        self._order.remove(jid)
        self._book(r, -1.0)
        return self._outcome(r, t, outcome, cause)

    def _outcome(self, r: _Run, t: float, outcome: str, cause: int | None) -> SimOutcome:
        wall = max(t - r.start_s, 1e-9)
        done_work = max(r.job.work_s - max(r.remaining, 0.0), 1e-9)
        ran = t - r.start_s if r.remaining < r.job.work_s else 0.0  # an immediate OOM never ran
        slow_sum = self._cum_slow[r.gpus] - r.slow0
        gpu_slow = tuple(float(x) for x in (slow_sum / ran if ran > 0 else np.ones(len(r.gpus))))
        energy = r.job.share * float((self._cum_eps[r.gpus] - r.eps0).sum())
        return SimOutcome(
            job_id=r.job.job_id,
            host=self.hosts[r.host].name,
            gpus=tuple(int(self.local[g]) for g in r.gpus),
            start_s=r.start_s,
            end_s=t,
            outcome=outcome,
            energy_j=energy,
            slowdown=wall / done_work if outcome == "ok" else max(gpu_slow),
            gpu_slowdown=gpu_slow,
            cause_gpu=None if cause is None else int(self.local[r.gpus[cause]]),
        )
