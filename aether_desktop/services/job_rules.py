"""The jobs state machine as pure rules: which change an event asks for and whether it applies.

A state only moves forward (pending < dispatched < running < terminal) and a terminal
state is never left. :class:`~aether_desktop.services.jobs.JobRepository` applies the
:class:`Change` objects these build to the ``jobs`` rows; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aether_desktop.services.jobtypes import TERMINAL_STATES, Decision, JobState
from aether_protocol import Event

# Candidates beyond this many are summarised by a count: a placement over 1,000 GPUs
# must not write a megabyte of scores into every job row.
MAX_RECORDED_CANDIDATES = 50

_RANK = {"pending": 0, "dispatched": 1, "running": 2, **{s: 3 for s in TERMINAL_STATES}}
_AGENT_KINDS: dict[str, JobState] = {
    "job_started": "running",
    "job_finished": "finished",
    "job_failed": "failed",
    "job_cancelled": "cancelled",
    "job_rejected": "rejected",
}


@dataclass(frozen=True)
class Change:
    """One event for one job, from an agent or from the station."""

    event_id: str
    job_id: str
    kind: str
    source: Literal["agent", "station"]
    ts: float
    to_state: JobState | None = None  # None: annotate only (a wait/defer decision, a cancel request)
    only_from: frozenset[str] | None = None  # apply only while the job is in one of these states
    host: str | None = None
    gpus: tuple[int, ...] | None = None
    exit_code: int | None = None
    reason: str | None = None
    decision: dict[str, Any] | None = None
    not_before_ts: float | None = None
    cancel_requested: bool = False


def next_state(current: str, target: str, only_from: frozenset[str] | None = None) -> str | None:
    """The state after applying ``target`` to ``current``, or None if it must not change."""
    if current in TERMINAL_STATES:
        return None
    if only_from is not None and current not in only_from:
        return None
    if _RANK[target] <= _RANK[current]:
        return None
    return target


def change_from_event(ev: Event) -> Change | None:
    """The job change an agent event asks for; None for events that are not about a job."""
    target = _AGENT_KINDS.get(ev.kind)
    if target is None or not ev.job_id:
        return None
    reason = ev.detail
    if target == "failed" and not reason:
        reason = f"exit code {ev.exit_code}" if ev.exit_code is not None else "failed"
    return Change(
        event_id=ev.id,
        job_id=ev.job_id,
        kind=ev.kind,
        source="agent",
        ts=ev.ts,
        to_state=target,
        host=ev.host,
        gpus=tuple(ev.gpus) if ev.gpus is not None else None,
        exit_code=ev.exit_code,
        reason=reason if target != "running" else None,
    )


def restart_change(ev: Event, job_id: str, state: str) -> Change:
    """The change an ``agent_started`` makes to one job its host had dispatched or running."""
    return Change(
        event_id=f"{ev.id}:{job_id}", job_id=job_id, kind="agent_restarted", source="agent", ts=ev.ts,
        to_state="lost", only_from=frozenset({"dispatched", "running"}), host=ev.host,
        reason=f"the agent on {ev.host} restarted while the job was {state}; the job ended with it",
    )  # fmt: skip


def decision_record(decision: Decision, now: float) -> dict[str, Any]:
    """The scheduler's decision as JSON: what it chose, why, and the candidates it scored."""
    ranked = sorted(decision.candidates, key=lambda c: c.score, reverse=True)
    return {
        "action": decision.action,
        "reason": decision.reason,
        "host": decision.host,
        "gpus": list(decision.gpus),
        "p_success": decision.p_success,
        "expected_slowdown": decision.expected_slowdown,
        "not_before_ts": decision.not_before_ts,
        "model_version": decision.model_version,
        "decided_ts": now,
        "candidates_total": len(ranked),
        "candidates": [
            {
                "host": c.host,
                "gpus": list(c.gpus),
                "p_success": c.p_success,
                "expected_slowdown": c.expected_slowdown,
                "score": c.score,
                "note": c.note,
            }
            for c in ranked[:MAX_RECORDED_CANDIDATES]
        ],
    }
