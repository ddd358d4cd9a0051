"""Replay a job trace on a simulated fleet under a scheduling policy, faster than real time.

Policies:
* ``fifo`` -- first come, first served, first fit: the queue head takes the
  lowest-numbered host with enough free GPU share and its lowest-numbered
  GPUs; it knows nothing of memory or temperature, and the head blocks the
  queue (no backfilling). Only a job with more GPUs than any host has is
  refused, as any admission check would.
* ``aether`` -- the ML scheduler (``Scheduler.place``) for each queued job in
  priority then arrival order, with backfilling; a job that has waited longer
  than ``starve_s`` stops later jobs from overtaking it.

Traces without ``mem_mib`` get a per-job memory need derived from
``model_name`` and a hash of (seed, job id), so the same seed always gives
the same jobs and memory contention is real. The operator's declared memory
is what the scheduler sees; the true peak differs from it by -8 %..+4 %.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aether_desktop.services.carbon import CarbonSeries
from aether_desktop.services.fleetsim import FleetSim, HostSpec, SimJob, SimOutcome
from aether_desktop.services.jobtypes import JobRequest
from aether_desktop.services.scheduler import Scheduler

POLICIES = ("fifo", "aether")
REQUIRED = ("job_id", "submit_s", "num_gpu", "duration_s")
ALIASES = {"submit_time": "submit_s", "duration": "duration_s", "num_gpus": "num_gpu"}  # Tiresias-style names
# Typical per-GPU training footprints (MiB) at the batch sizes of the Tiresias testbed.
MODEL_MEM_MIB = {
    "alexnet": 5200,
    "googlenet": 7000,
    "inception3": 11000,
    "inception4": 15500,
    "resnet50": 10000,
    "resnet101": 13500,
    "resnet152": 17000,
    "vgg11": 9000,
    "vgg16": 11000,
    "vgg19": 12000,
}
# Data-loading-bound models do not drive the GPU as hard.
MODEL_INTENSITY = {"alexnet": 0.75, "googlenet": 0.85, "vgg11": 0.88}
DEFAULT_START_TS = 1578301200.0  # 2020-01-06 09:00 UTC, a Monday with 17 days of carbon history before it
RECHECK_S = 60.0  # a waiting job is reconsidered at least this often (GPUs cool down)


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file, line and column."""


@dataclass(frozen=True)
class TraceJob:
    job_id: str
    submit_s: float
    num_gpu: int
    duration_s: float
    mem_mib: float | None = None
    kind: str = "training"
    deadline_s: float | None = None
    priority: int = 0
    gpu_milli: int = 1000
    model_name: str | None = None


@dataclass(frozen=True)
class ScheduleRow:
    job_id: str
    host: str
    gpus: tuple[int, ...]
    submit_s: float
    start_s: float | None
    end_s: float | None
    outcome: str  # ok | oom | thermal | failed | rejected
    energy_j: float
    reason: str = ""


@dataclass
class ReplayResult:
    rows: list[ScheduleRow]
    summary: dict[str, Any]


def load_trace(path: str | Path) -> list[TraceJob]:
    p = Path(path)
    try:
        with p.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [ALIASES.get(h.strip(), h.strip()) for h in (reader.fieldnames or [])]
            raw_rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {p}: {getattr(exc, 'strerror', None) or exc}") from exc
    except csv.Error as exc:
        raise TraceError(f"{p}: not a CSV file ({exc})") from exc
    if not header:
        raise TraceError(f"{p}: empty file; expected a header with {', '.join(REQUIRED)}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise TraceError(f"{p}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    if not raw_rows:
        raise TraceError(f"{p}: no jobs after the header")
    jobs: list[TraceJob] = []
    seen: set[str] = set()
    for line, raw in enumerate(raw_rows, start=2):
        row = {
            ALIASES.get((k or "").strip(), (k or "").strip()): (v or "").strip() for k, v in raw.items() if k
        }
        jobs.append(_parse_row(p, line, row, seen))
    jobs.sort(key=lambda j: (j.submit_s, j.job_id))
    return jobs


def _parse_row(p: Path, line: int, row: dict[str, str], seen: set[str]) -> TraceJob:
    def num(col: str, *, optional: bool = False, lo: float = 0.0) -> float | None:
        text = row.get(col, "")
        if text == "" and optional:
            return None
        try:
            value = float(text)
        except ValueError:
            raise TraceError(f"{p} line {line}: {col}={text!r} is not a number") from None
        if not math.isfinite(value) or value < lo:
            raise TraceError(f"{p} line {line}: {col}={text!r} must be a finite number >= {lo:g}")
        return value

    job_id = row.get("job_id", "")
    if not job_id:
        raise TraceError(f"{p} line {line}: job_id is empty")
    if job_id in seen:
        raise TraceError(f"{p} line {line}: job_id {job_id!r} appears twice")
    seen.add(job_id)
    n_gpu = num("num_gpu", lo=1)
    assert n_gpu is not None
    if n_gpu != int(n_gpu):
        raise TraceError(f"{p} line {line}: num_gpu={row['num_gpu']!r} must be a whole number")
    duration = num("duration_s", lo=0)
    if not duration:
        raise TraceError(f"{p} line {line}: duration_s must be > 0")
    kind = row.get("kind", "") or "training"
    if kind not in ("training", "inference"):
        raise TraceError(f"{p} line {line}: kind={kind!r} must be training or inference")
    milli = num("gpu_milli", optional=True, lo=1)
    if milli is not None and milli > 1000:
        raise TraceError(f"{p} line {line}: gpu_milli={row['gpu_milli']!r} must be 1..1000")
    priority = num("priority", optional=True, lo=-1e9)
    return TraceJob(
        job_id=job_id,
        submit_s=float(num("submit_s") or 0.0),
        num_gpu=int(n_gpu),
        duration_s=float(duration),
        mem_mib=num("mem_mib", optional=True),
        kind=kind,
        deadline_s=num("deadline_s", optional=True),
        priority=int(priority or 0),
        gpu_milli=int(milli) if milli is not None else 1000,
        model_name=row.get("model_name") or None,
    )


def _unit(seed: int, *parts: str) -> float:
    """A deterministic uniform number in [0, 1) from the seed and some labels."""
    digest = hashlib.blake2b("|".join((str(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def declared_memory(job: TraceJob, seed: int) -> float:
    """The memory need the operator declares: the trace's, else one derived from the model and the seed."""
    if job.mem_mib is not None:
        return job.mem_mib
    base = MODEL_MEM_MIB.get((job.model_name or "").lower(), 10_000)
    # Batch sizes vary: most jobs near the base footprint, a tail up to ~2.7x.
    return round(base * (0.7 + 2.0 * _unit(seed, job.job_id, "mem") ** 2))


def sim_job(job: TraceJob, seed: int) -> SimJob:
    declared = declared_memory(job, seed)
    intensity = MODEL_INTENSITY.get((job.model_name or "").lower(), 0.95 if job.kind == "training" else 0.55)
    return SimJob(
        job_id=job.job_id,
        mem_mib=declared * (0.92 + 0.12 * _unit(seed, job.job_id, "peak")),
        work_s=job.duration_s,
        share=job.gpu_milli / 1000.0,
        intensity=intensity,
        kind=job.kind,
    )


@dataclass
class _Queued:
    job: TraceJob
    sim: SimJob  # carries the true peak memory
    declared_mib: float  # what the operator said: all the scheduler may know
    not_before_s: float = 0.0
    reason: str = ""


@dataclass
class _State:
    sim: FleetSim
    queue: list[_Queued] = field(default_factory=list)
    rows: dict[str, ScheduleRow] = field(default_factory=dict)
    started: dict[str, tuple[_Queued, str]] = field(default_factory=dict)


def run_replay(
    jobs: Sequence[TraceJob],
    hosts: Sequence[HostSpec],
    policy: str,
    *,
    seed: int = 0,
    scheduler: Scheduler | None = None,
    carbon: CarbonSeries | None = None,
    start_ts: float = DEFAULT_START_TS,
    starve_s: float = 1800.0,
) -> ReplayResult:
    """Replay ``jobs`` (sorted by submit time) on ``hosts``; deterministic for a given seed and model."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if policy == "aether" and scheduler is None:
        raise ValueError("the aether policy needs a Scheduler")
    st = _State(FleetSim(hosts, seed=seed))
    arrivals = sorted(jobs, key=lambda j: (j.submit_s, j.job_id))
    nxt = 0
    max_host = max(h.n_gpus for h in hosts)
    idle_rounds = 0
    while nxt < len(arrivals) or st.queue or st.sim.runs:
        t_arrival = arrivals[nxt].submit_s if nxt < len(arrivals) else math.inf
        t_wake = min((q.not_before_s for q in st.queue if q.not_before_s > st.sim.now), default=math.inf)
        t_recheck = st.sim.now + RECHECK_S if st.queue else math.inf
        t_next = min(t_arrival, t_wake, t_recheck, st.sim.now + 86_400.0)
        _record(st, st.sim.advance(max(t_next, st.sim.now), stop_at_end=True))
        while nxt < len(arrivals) and arrivals[nxt].submit_s <= st.sim.now + 1e-9:
            j = arrivals[nxt]
            st.queue.append(_Queued(j, sim_job(j, seed), declared_memory(j, seed)))
            nxt += 1
        placed = (
            _fifo_round(st, max_host)
            if policy == "fifo"
            else _aether_round(st, scheduler, start_ts, starve_s)
        )
        # Nothing runs, nothing arrives, nothing placed for a simulated day: report instead of spinning.
        stuck = not placed and not st.sim.runs and nxt >= len(arrivals) and bool(st.queue)
        idle_rounds = idle_rounds + 1 if stuck else 0
        if idle_rounds > 86_400.0 / RECHECK_S:
            for q in st.queue:
                _reject(st, q, f"could not be placed: {q.reason or 'no GPU fits'}")
            st.queue.clear()
    rows = [st.rows[j.job_id] for j in jobs]
    return ReplayResult(rows, summarize(rows, st.sim, carbon, start_ts))


def _fifo_round(st: _State, max_host: int) -> int:
    placed = 0
    while st.queue:
        q = st.queue[0]
        if q.job.num_gpu > max_host:
            _reject(st, q, f"needs {q.job.num_gpu} GPUs on one host; the largest host has {max_host}")
            st.queue.pop(0)
            continue
        room = st.sim.free_share() >= q.sim.share - 1e-9
        choice = None
        for h, host in enumerate(st.sim.hosts):
            first = int(st.sim.first_gpu[h])
            free = np.nonzero(room[first : first + host.n_gpus])[0]
            if len(free) >= q.job.num_gpu:
                choice = (h, [int(g) for g in free[: q.job.num_gpu]])
                break
        if choice is None:
            return placed  # head-of-line blocking: that is what FIFO means
        st.queue.pop(0)
        _start(st, q, *choice)
        placed += 1
    return placed


def _aether_round(st: _State, scheduler: Scheduler | None, start_ts: float, starve_s: float) -> int:
    assert scheduler is not None
    placed = 0
    now = st.sim.now
    cands = st.sim.candidates()
    host_no = {h.name: i for i, h in enumerate(st.sim.hosts)}
    for q in sorted(st.queue, key=lambda q: (-q.job.priority, q.job.submit_s, q.job.job_id)):
        if q.not_before_s > now:
            continue
        req = JobRequest(
            id=q.job.job_id,
            argv=("replay",),
            num_gpus=q.job.num_gpu,
            mem_mib=q.declared_mib,
            kind="inference" if q.job.kind == "inference" else "training",
            expected_s=q.job.duration_s,
            priority=q.job.priority,
            deadline_ts=None if q.job.deadline_s is None else start_ts + q.job.deadline_s,
            submitted_ts=start_ts + q.job.submit_s,
        )
        available = st.sim.free_share() >= q.sim.share - 1e-9
        d = scheduler.place(req, cands, start_ts + now, available=available)
        q.reason = d.reason
        if d.action == "place" and d.host is not None:
            st.queue.remove(q)
            _start(st, q, host_no[d.host], list(d.gpus))
            placed += 1
            cands = st.sim.candidates()
            continue
        if d.action == "reject":
            st.queue.remove(q)
            _reject(st, q, d.reason)
            continue
        if d.action == "defer" and d.not_before_ts is not None:
            q.not_before_s = d.not_before_ts - start_ts
            continue
        if now - q.job.submit_s > starve_s:
            break  # it has waited long enough: nobody overtakes it any more
    return placed


def _start(st: _State, q: _Queued, host: int, gpus: list[int]) -> None:
    name = st.sim.hosts[host].name
    st.started[q.job.job_id] = (q, name)
    immediate = st.sim.start(q.sim, host, gpus)
    if immediate is not None:
        _record(st, [immediate])


def _reject(st: _State, q: _Queued, reason: str) -> None:
    st.rows[q.job.job_id] = ScheduleRow(
        q.job.job_id, "", (), q.job.submit_s, None, None, "rejected", 0.0, reason
    )


def _record(st: _State, outs: Sequence[SimOutcome]) -> None:
    for o in outs:
        q, _host = st.started.pop(o.job_id)
        st.rows[o.job_id] = ScheduleRow(
            o.job_id,
            o.host,
            o.gpus,
            q.job.submit_s,
            o.start_s,
            o.end_s,
            o.outcome,
            round(o.energy_j, 1),
            q.reason,
        )


def summarize(
    rows: Sequence[ScheduleRow], sim: FleetSim | None, carbon: CarbonSeries | None, start_ts: float
) -> dict[str, Any]:
    ok = [r for r in rows if r.outcome == "ok"]
    ran = [r for r in rows if r.start_s is not None]
    jct = np.array([r.end_s - r.submit_s for r in ok if r.end_s is not None])
    wait = np.array([r.start_s - r.submit_s for r in ran if r.start_s is not None])
    ends = [r.end_s for r in ran if r.end_s is not None]
    out: dict[str, Any] = {
        "jobs": len(rows),
        "completed": len(ok),
        "failed": sum(r.outcome in ("oom", "thermal", "failed") for r in rows),
        "oom": sum(r.outcome == "oom" for r in rows),
        "thermal": sum(r.outcome == "thermal" for r in rows),
        "rejected": sum(r.outcome == "rejected" for r in rows),
        "mean_jct_s": round(float(jct.mean()), 1) if len(jct) else None,
        "p95_jct_s": round(float(np.percentile(jct, 95)), 1) if len(jct) else None,
        "mean_wait_s": round(float(wait.mean()), 1) if len(wait) else None,
        "makespan_s": round(max(ends) - min(r.submit_s for r in rows), 1) if ends else 0.0,
        "energy_kwh": round(sum(r.energy_j for r in rows) / 3.6e6, 3),
    }
    if sim is not None:
        out["fleet_energy_kwh"] = round(float(sim.gpu_energy.sum()) / 3.6e6, 3)  # idle GPUs included
    if carbon is not None:
        grams = sum(
            r.energy_j / 3.6e6 * carbon.mean_between(start_ts + r.start_s, start_ts + r.end_s)
            for r in ran
            if r.start_s is not None and r.end_s is not None
        )
        out["carbon_kg"] = round(grams / 1000.0, 3)
    return out


def write_schedule(rows: Sequence[ScheduleRow], path: str | Path) -> None:
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["job_id", "host", "gpus", "submit_s", "start_s", "end_s", "outcome", "energy_j"])
        for r in rows:
            w.writerow(
                [
                    r.job_id,
                    r.host,
                    ";".join(str(g) for g in r.gpus),
                    _fmt(r.submit_s),
                    _fmt(r.start_s),
                    _fmt(r.end_s),
                    r.outcome,
                    _fmt(r.energy_j),
                ]
            )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"
