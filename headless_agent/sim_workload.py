"""The simulated workload: what loads a simulated GPU, and the synthetic background users.

A ``Work`` is either an explicit job or a background phase (``job`` None) that
makes an idle fleet look like a shared cluster: training runs flat out with
short dips, inference is bursty. Every draw comes from the generator it is
handed (the GPU's own, seeded), so the simulation stays reproducible; the
order of draws is part of that contract and must not change.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aether_protocol import JobSpec
from headless_agent.gpu_models import GpuModel

LOAD_S = 3.0  # a job allocates its memory over its first seconds, as a model loads
INTENSITY = {"training": 1.0, "inference": 0.85}  # power per % util
MEM_BW = {"training": 0.5, "inference": 0.3}  # memory-controller busy per % util


@dataclass(eq=False)
class Work:
    """Something loading GPUs: an explicit job, or a synthetic background phase (job None)."""

    kind: str
    mem_mib: float
    pid: int
    name: str
    gpus: tuple[int, ...]
    start: float
    end: float = math.inf  # background only: when the phase ends
    job: JobSpec | None = None
    expected_s: float = 0.0
    progress: float = 0.0
    energy_j: float = 0.0
    level: float = 0.0  # current utilisation demand, %
    dip_until: float = -math.inf
    alloc_mib: float = 0.0

    def ramp(self, t: float) -> float:
        if self.job is None:
            return 1.0
        return min(1.0, max(0.0, (t - self.start) / LOAD_S))

    def update_level(self, t: float, dt: float, rng: random.Random) -> None:
        """Training runs flat out with short dips (eval, checkpoints); inference is bursty."""
        if self.kind == "training":
            if t >= self.dip_until and rng.random() < 0.01 * dt:
                self.dip_until = t + rng.uniform(2.0, 6.0)
                self.level = rng.uniform(20.0, 50.0)
            elif t >= self.dip_until:
                self.level = min(100.0, 96.0 + rng.gauss(0.0, 1.5))
        else:
            if rng.random() < 1.0 - math.exp(-dt / 3.0):
                self.level = rng.uniform(20.0, 80.0)
            self.level = min(100.0, max(0.0, self.level + rng.gauss(0.0, 3.0)))


class LoadedGpu(Protocol):
    """The part of a simulated GPU the background generator reads and changes."""

    index: int
    model: GpuModel
    rng: random.Random
    works: list[Work]
    bg: Work | None
    bg_next: float  # when an idle background gap ends


def begin_background(g: LoadedGpu, t: float, remaining: bool, new_pid: Callable[[], int]) -> None:
    """Start a background phase on ``g``; ``remaining``: it was already running when we started watching."""
    rng = g.rng
    training = rng.random() < 0.6
    duration = rng.uniform(180.0, 1200.0) if training else rng.uniform(60.0, 600.0)
    frac = rng.uniform(0.25, 0.7) if training else rng.uniform(0.1, 0.3)
    if remaining:
        duration *= rng.random()
    w = Work(
        kind="training" if training else "inference",
        mem_mib=float(round(g.model.mem_total_mib * frac)),
        pid=new_pid(),
        name="python" if training else "tritonserver",
        gpus=(g.index,),
        start=t,
        end=t + duration,
        level=90.0 if training else 40.0,
    )
    g.bg = w
    g.works.insert(0, w)


def background_step(g: LoadedGpu, t: float, dt: float, enabled: bool, new_pid: Callable[[], int]) -> None:
    """Advance ``g``'s background user by one step: vary its load, end it, or start the next one."""
    if g.bg is not None:
        g.bg.update_level(t, dt, g.rng)
        if t >= g.bg.end:
            g.works.remove(g.bg)
            g.bg = None
            g.bg_next = t + 30.0 + g.rng.expovariate(1.0 / 240.0)
    elif enabled and t >= g.bg_next:
        if any(w.job is not None for w in g.works):
            g.bg_next = t + 60.0  # someone's job holds it; look again later
        else:
            begin_background(g, t, remaining=False, new_pid=new_pid)
