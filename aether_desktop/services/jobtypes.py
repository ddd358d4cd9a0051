"""Plain types shared by the scheduler, the dispatcher, the jobs store and the job widgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

JobKind = Literal["training", "inference"]
JobState = Literal["pending", "dispatched", "running", "finished", "failed", "cancelled", "rejected", "lost"]
TERMINAL_STATES: frozenset[str] = frozenset({"finished", "failed", "cancelled", "rejected", "lost"})


@dataclass(frozen=True)
class JobRequest:
    """What the operator asked for (dialog, `aether submit`, or a replayed trace)."""

    id: str
    argv: tuple[str, ...]
    num_gpus: int = 1
    # Specific GPUs, if the operator pinned them: host and indices on that host.
    host: str | None = None
    gpus: tuple[int, ...] | None = None
    mem_mib: float = 0.0
    kind: JobKind = "training"
    expected_s: float = 600.0
    priority: int = 0
    deadline_ts: float | None = None  # "finish by"; a deferrable job may wait for greener power until then
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    submitted_ts: float = 0.0


@dataclass(frozen=True)
class GpuCandidate:
    """One GPU's live state as the scheduler sees it."""

    host: str
    index: int
    model: str
    state: str  # "ok" | "sleeping" | "lost"
    temp_c: float
    mem_used_mib: float
    mem_total_mib: float
    util_pct: float
    power_w: float
    power_limit_w: float
    running_jobs: int = 0
    slowdown_temp_c: float | None = None


@dataclass(frozen=True)
class ScoredCandidate:
    host: str
    gpus: tuple[int, ...]
    p_success: float
    expected_slowdown: float
    score: float
    note: str = ""


@dataclass(frozen=True)
class Decision:
    """The scheduler's answer for one job, with the reason in words."""

    action: Literal["place", "wait", "defer", "reject"]
    reason: str
    host: str | None = None
    gpus: tuple[int, ...] = ()
    p_success: float | None = None
    expected_slowdown: float | None = None
    candidates: tuple[ScoredCandidate, ...] = ()
    not_before_ts: float | None = None  # for "defer": earliest start (greener window)
    model_version: str | None = None
