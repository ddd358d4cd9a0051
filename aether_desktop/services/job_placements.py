"""Placement feature rows in PostgreSQL, and the fleet's training examples built from them.

At dispatch the scheduler's feature row of every chosen GPU is stored with the job
(``job_placements``, migration 021). When the job ends, those rows plus what happened
become training examples for the placement model:

* ``finished``: success, with slowdown = wall time / the expected duration;
* ``failed`` with an out-of-memory or thermal reason: failure (what the model predicts);
* any other failure (a bad exit code, a lost GPU) says nothing about placement and
  is left out, as are cancelled, rejected and lost jobs.

No XGBoost here: ``aether submit`` imports the jobs store, and this module with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from aether_desktop.services.jobtypes import Decision

# A real job's expected duration is the operator's guess: a job declared "10m" that
# ran 2 h tells little about the GPU. Clipping keeps such guesses from dominating
# the slowdown regressor; the simulator's slowdowns stay well inside this range.
SLOWDOWN_RANGE = (1.0, 10.0)
_GPU_RE = re.compile(r"\bGPU (\d+)\b")


@dataclass(frozen=True)
class PlacementRows:
    """The scheduler's feature rows for the GPUs a job was placed on (``gpus`` order)."""

    names: tuple[str, ...]
    rows: Sequence[Sequence[float]]


@dataclass(frozen=True)
class PlacementOutcome:
    """One ended job with the feature rows recorded when it was placed."""

    job_id: str
    state: str
    reason: str | None
    gpus: tuple[int, ...]
    names: tuple[str, ...]
    features: np.ndarray  # (len(gpus), len(names))
    started_ts: float | None = None
    ended_ts: float | None = None
    expected_s: float = 0.0
    expected_slowdown: float | None = None


@dataclass(frozen=True)
class FleetExamples:
    x: np.ndarray  # float32 (n, n_features)
    success: np.ndarray  # (n,) 0/1
    slowdown: np.ndarray  # (n,)
    jobs: int  # jobs that contributed at least one row
    skipped: int  # ended jobs whose outcome says nothing about placement

    def __len__(self) -> int:
        return len(self.success)


# --------------------------------------------------------------------------- pure rules


def failure_cause(reason: str | None) -> Literal["oom", "thermal"] | None:
    """What a failure reason says about placement: OOM, thermal, or nothing."""
    low = (reason or "").lower()
    if "out of memory" in low or "oom" in low.split():
        return "oom"
    if low.startswith("thermal") or "thermal:" in low:
        return "thermal"
    return None


def outcome_examples(o: PlacementOutcome) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Training rows, success labels and slowdowns for one job; None if it teaches nothing.

    A failed multi-GPU job whose reason names the GPU (the agent says "on GPU 3")
    labels only that GPU, as the simulated training data do; its other GPUs' rows are
    dropped because their own outcome is unknown.
    """
    x = np.asarray(o.features, dtype=np.float32).reshape(len(o.gpus), -1)
    if len(x) == 0:
        return None
    if o.state == "finished":
        slow = _slowdown(o)
        return x, np.ones(len(x)), np.full(len(x), slow)
    if o.state != "failed" or failure_cause(o.reason) is None:
        return None
    m = _GPU_RE.search(o.reason or "")
    if m is not None and int(m.group(1)) in o.gpus:
        x = x[[o.gpus.index(int(m.group(1)))]]
    return x, np.zeros(len(x)), np.ones(len(x))


def _slowdown(o: PlacementOutcome) -> float:
    if o.started_ts is not None and o.ended_ts is not None and o.expected_s > 0:
        raw = (o.ended_ts - o.started_ts) / o.expected_s
    else:
        # Times unknown (the start event never arrived): the model's own estimate adds no error.
        raw = o.expected_slowdown if o.expected_slowdown is not None else 1.0
    return float(np.clip(raw, *SLOWDOWN_RANGE))


def fleet_examples(outcomes: Sequence[PlacementOutcome], names: Sequence[str]) -> FleetExamples:
    """All jobs' examples stacked; rows recorded under other feature names are skipped."""
    xs, oks, slows = [], [], []
    jobs = skipped = 0
    for o in outcomes:
        got = outcome_examples(o) if tuple(o.names) == tuple(names) else None
        if got is None:
            skipped += 1
            continue
        jobs += 1
        xs.append(got[0])
        oks.append(got[1])
        slows.append(got[2])
    if not xs:
        empty = np.zeros(0)
        return FleetExamples(np.zeros((0, len(names)), dtype=np.float32), empty, empty, 0, skipped)
    return FleetExamples(
        np.concatenate(xs).astype(np.float32), np.concatenate(oks), np.concatenate(slows), jobs, skipped
    )


# --------------------------------------------------------------------------- SQL


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


async def record_placement(
    conn: AsyncConnection[Any], job_id: str, decision: Decision, features: PlacementRows, now: float
) -> None:
    """Store a placement's feature rows (inside the dispatch's transaction)."""
    rows = np.asarray(features.rows, dtype=np.float64).reshape(len(decision.gpus), len(features.names))
    await conn.execute(
        "INSERT INTO job_placements (job_id, decided_at, model_version, host, gpus, feature_names, features, "
        "expected_slowdown) VALUES (%s, %s, %s, %s, %s::integer[], %s, %s::double precision[], %s) "
        "ON CONFLICT (job_id) DO NOTHING",
        (
            job_id, _dt(now), decision.model_version, decision.host, list(decision.gpus),
            list(features.names), rows.tolist(), decision.expected_slowdown,
        ),
    )  # fmt: skip


class PlacementStore:
    """Reads the fleet's labelled placements for retraining."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def outcomes(self, limit: int = 20_000) -> list[PlacementOutcome]:
        """The newest ``limit`` finished or failed jobs that have placement rows."""
        q = (
            "SELECT j.id, j.state, j.reason, j.started_at, j.ended_at, j.expected_s, p.gpus, p.feature_names, "
            "p.features, p.expected_slowdown FROM job_placements p JOIN jobs j ON j.id = p.job_id "
            "WHERE j.state IN ('finished', 'failed') ORDER BY j.ended_at DESC LIMIT %s"
        )
        async with self._pool.connection() as conn:
            cur = await conn.execute(q, (limit,))
            out = []
            for (
                jid,
                st,
                reason,
                started,
                ended,
                expected_s,
                gpus,
                names,
                feats,
                exp_slow,
            ) in await cur.fetchall():
                out.append(PlacementOutcome(
                    job_id=jid, state=st, reason=reason, gpus=tuple(gpus), names=tuple(names),
                    features=np.array(feats, dtype=np.float64).reshape(len(gpus), len(names)),
                    started_ts=started.timestamp() if started is not None else None,
                    ended_ts=ended.timestamp() if ended is not None else None,
                    expected_s=float(expected_s), expected_slowdown=exp_slow,
                ))  # fmt: skip
            return out

    async def count_ended_since(self, since_ts: float) -> int:
        """Jobs with placement rows that finished or failed after ``since_ts``."""
        q = (
            "SELECT count(*) FROM jobs j JOIN job_placements p ON p.job_id = j.id "
            "WHERE j.state IN ('finished', 'failed') AND j.ended_at > %s"
        )
        async with self._pool.connection() as conn:
            cur = await conn.execute(q, (_dt(since_ts),))
            row = await cur.fetchone()
            return int(row[0]) if row else 0
