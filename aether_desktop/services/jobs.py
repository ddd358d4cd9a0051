"""Jobs in PostgreSQL: submission, the state machine, the decision record, the store hook.

Every change to a job is one row in ``job_events`` (an agent event keeps its protocol
id; the station's own events get fresh ids) applied to the ``jobs`` row in the same
transaction, under a row lock. That makes application idempotent (a second copy of
an event finds its id taken and changes nothing) and order-proof: a state only moves
forward (pending < dispatched < running < terminal) and a terminal state is never
left, so ``job_finished`` arriving before ``job_started`` still ends ``finished``
(the pure rules are in services/job_rules.py).

An agent's ``agent_started`` ends the jobs its earlier run left dispatched or running
on that host (``lost``): the agent's service unit kills a job with its agent, and a
new agent knows nothing of it. Only jobs dispatched (or started) before the restart
are affected, so a replayed or late ``agent_started`` never ends a newer job.

Each applied change also sends ``NOTIFY aether_jobs`` (delivered at commit, so never
for a rolled-back change); :class:`JobWatcher` (services/job_watcher.py, re-exported
here) listens for it so every station, not just the dispatching one, sees changes
without polling.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from aether_desktop.services.job_placements import PlacementRows, record_placement
from aether_desktop.services.job_rules import (
    Change,
    change_from_event,
    decision_record,
    next_state,
    restart_change,
)
from aether_desktop.services.job_watcher import NOTIFY_CHANNEL
from aether_desktop.services.job_watcher import JobWatcher as JobWatcher  # re-exported: its old home
from aether_desktop.services.jobspec import new_job_id
from aether_desktop.services.jobtypes import TERMINAL_STATES, Decision, JobRequest, JobState
from aether_protocol import Event

log = logging.getLogger(__name__)

_MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MIGRATION = _MIGRATIONS_DIR / "020_jobs.sql"
# The jobs tables, in order: 021 adds the placement feature rows used for retraining.
MIGRATIONS = (MIGRATION, _MIGRATIONS_DIR / "021_job_placements.sql")


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one job row (times are epoch seconds, like the protocol's ``ts``)."""

    request: JobRequest
    state: JobState
    reason: str | None = None
    dispatched_ts: float | None = None
    started_ts: float | None = None
    ended_ts: float | None = None
    not_before_ts: float | None = None
    cancel_requested_ts: float | None = None
    host: str | None = None
    gpus: tuple[int, ...] = ()
    exit_code: int | None = None
    decision: dict[str, Any] | None = None
    resubmit_of: str | None = None
    submitted_by: str | None = None

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def submitted_ts(self) -> float:
        return self.request.submitted_ts

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def duration_s(self, now: float) -> float | None:
        """Run time so far (running) or in total (ended); None if it never started."""
        if self.started_ts is None:
            return None
        end = self.ended_ts if self.ended_ts is not None else (None if self.terminal else now)
        return None if end is None else max(0.0, end - self.started_ts)


def _dt(ts: float | None) -> datetime | None:
    # Events' ts is within what datetime holds: the protocol bounds it when decoding.
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def _station_id() -> str:
    return "st-" + uuid.uuid4().hex


_COLUMNS = (
    "id, argv, num_gpus, req_host, req_gpus, mem_mib, kind, expected_s, priority, deadline_at, env, cwd, "
    "resubmit_of, submitted_by, state, reason, submitted_at, dispatched_at, started_at, ended_at, "
    "not_before, cancel_requested_at, host, gpus, exit_code, decision"
)


def _record(row: Sequence[Any]) -> JobRecord:
    (jid, argv, num_gpus, req_host, req_gpus, mem_mib, kind, expected_s, priority, deadline_at, env, cwd,
     resubmit_of, submitted_by, state, reason, submitted_at, dispatched_at, started_at, ended_at,
     not_before, cancel_requested_at, host, gpus, exit_code, decision) = row  # fmt: skip
    request = JobRequest(
        id=jid, argv=tuple(argv), num_gpus=num_gpus, host=req_host,
        gpus=tuple(req_gpus) if req_gpus is not None else None, mem_mib=mem_mib, kind=kind,
        expected_s=expected_s, priority=priority, deadline_ts=_ts(deadline_at), env=dict(env or {}),
        cwd=cwd, submitted_ts=submitted_at.timestamp(),
    )  # fmt: skip
    return JobRecord(
        request=request, state=state, reason=reason, dispatched_ts=_ts(dispatched_at),
        started_ts=_ts(started_at), ended_ts=_ts(ended_at), not_before_ts=_ts(not_before),
        cancel_requested_ts=_ts(cancel_requested_at), host=host, gpus=tuple(gpus or ()),
        exit_code=exit_code, decision=decision, resubmit_of=resubmit_of, submitted_by=submitted_by,
    )  # fmt: skip


# --------------------------------------------------------------------------- repository


class JobRepository:
    """All job SQL. Hand it the station's pool; :meth:`apply_events` is the store hook."""

    def __init__(self, pool: AsyncConnectionPool, *, clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self._clock = clock

    async def ensure_schema(self) -> None:
        """Apply the jobs migrations (idempotent) where the station's migration runner has not."""
        async with self._pool.connection() as conn:
            for path in MIGRATIONS:
                await conn.execute(path.read_text())  # trusted files from the package

    # ----------------------------------------------------------------- queries

    async def _select(self, tail: str, params: Sequence[Any] | dict[str, Any]) -> list[JobRecord]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM jobs {tail}", params)
            return [_record(r) for r in await cur.fetchall()]

    async def get(self, job_id: str) -> JobRecord | None:
        found = await self._select("WHERE id = %s", (job_id,))
        return found[0] if found else None

    async def list_jobs(self, *, states: Iterable[str] | None = None, limit: int = 500) -> list[JobRecord]:
        """Newest first; ``states`` narrows to those states."""
        where = "WHERE state = ANY(%(states)s)" if states is not None else ""
        tail = f"{where} ORDER BY submitted_at DESC, id LIMIT %(limit)s"
        return await self._select(tail, {"states": list(states or ()), "limit": limit})

    async def pending(self, now: float, limit: int = 100, *, after: str | None = None) -> list[JobRecord]:
        """The dispatch queue: pending, not deferred past ``now``, by priority then age.

        ``after`` (the last job id of the previous page) pages through the whole queue.
        The page starts after that job's place in the order, not at an offset, so jobs
        that left the queue meanwhile (dispatched, cancelled) make no other job skipped.
        """
        page = ""
        if after is not None:
            # priority and submitted_at never change, so the key is the job's own row.
            page = "AND (-priority, submitted_at, id) > (SELECT -priority, submitted_at, id FROM jobs WHERE id = %s) "
        tail = (
            "WHERE state = 'pending' AND cancel_requested_at IS NULL AND (not_before IS NULL OR not_before <= %s) "
            f"{page}ORDER BY priority DESC, submitted_at, id LIMIT %s"
        )
        params = (_dt(now), after, limit) if after is not None else (_dt(now), limit)
        return await self._select(tail, params)

    async def in_flight(self) -> list[JobRecord]:
        """Every dispatched or running job: their GPUs are taken, whatever telemetry shows yet."""
        return await self._select("WHERE state IN ('dispatched', 'running') ORDER BY dispatched_at, id", ())

    async def overdue_dispatched(self, before: float) -> list[JobRecord]:
        """Dispatched before ``before`` and still not reported started."""
        return await self._select("WHERE state = 'dispatched' AND dispatched_at < %s ORDER BY dispatched_at",
                                  (_dt(before),))  # fmt: skip

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events, oldest first (for the details pane and for tests)."""
        q = (
            "SELECT event_id, kind, source, ts, host, from_state, to_state, detail, data "
            "FROM job_events WHERE job_id = %s ORDER BY ts, recorded_at"
        )
        async with self._pool.connection() as conn:
            cur = await conn.execute(q, (job_id,))
            names = ("event_id", "kind", "source", "ts", "host", "from_state", "to_state", "detail", "data")
            return [dict(zip(names, r, strict=True)) | {"ts": r[3].timestamp()} for r in await cur.fetchall()]

    # ----------------------------------------------------------------- submission

    async def submit(
        self, req: JobRequest, *, submitted_by: str | None = None, resubmit_of: str | None = None
    ) -> JobRecord:
        """Store a new pending job; the dispatcher picks it up. Returns the stored record."""
        if not req.id:
            req = replace(req, id=new_job_id())
        if not req.submitted_ts:
            req = replace(req, submitted_ts=self._clock())
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO jobs (id, argv, num_gpus, req_host, req_gpus, mem_mib, kind, expected_s, priority, "
                "deadline_at, env, cwd, resubmit_of, submitted_by, state, submitted_at) VALUES "
                "(%s, %s, %s, %s, %s::integer[], %s, %s, %s, %s, %s, %s, %s, %s, %s, 'pending', %s)",
                (
                    req.id, list(req.argv), req.num_gpus, req.host,
                    list(req.gpus) if req.gpus is not None else None,
                    req.mem_mib, req.kind, req.expected_s, req.priority, _dt(req.deadline_ts),
                    Jsonb(req.env), req.cwd, resubmit_of, submitted_by, _dt(req.submitted_ts),
                ),
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO job_events (event_id, job_id, kind, source, ts, to_state, detail) "
                "VALUES (%s, %s, 'submitted', 'station', %s, 'pending', %s)",
                (_station_id(), req.id, _dt(req.submitted_ts), submitted_by),
            )
            await conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, req.id))
        return JobRecord(request=req, state="pending", resubmit_of=resubmit_of, submitted_by=submitted_by)

    async def resubmit(self, job_id: str, *, submitted_by: str | None = None) -> JobRecord:
        """A new pending job (new id) with the same request; raises KeyError if unknown."""
        old = await self.get(job_id)
        if old is None:
            raise KeyError(job_id)
        now = self._clock()
        req = replace(old.request, id=new_job_id(), submitted_ts=now)
        if req.deadline_ts is not None and req.deadline_ts < now + req.expected_s:
            # The same rule as a new submission's: a deadline that is past, or too near
            # for the expected run, could never be met. Like the form's "edit a copy",
            # the copy goes without it rather than be deferred against an impossible goal.
            log.info("resubmit of %s: its deadline can no longer be met; the copy has none", job_id)
            req = replace(req, deadline_ts=None)
        return await self.submit(req, submitted_by=submitted_by, resubmit_of=job_id)

    # ----------------------------------------------------------------- station changes

    async def record_decision(self, job_id: str, decision: Decision, now: float) -> bool:
        """A wait/defer decision: the job stays pending with the reason (and not_before) updated.

        Only a changed reason or not_before is recorded, so a job that waits for an hour
        does not write an event every dispatch tick.
        """
        ch = Change(
            _station_id(), job_id, "decision", "station", now, only_from=frozenset({"pending"}),
            reason=decision.reason, decision=decision_record(decision, now),
            not_before_ts=decision.not_before_ts if decision.action == "defer" else None,
        )  # fmt: skip
        return await self.apply_station(ch) is not None

    async def mark_dispatched(
        self, job_id: str, decision: Decision, now: float, *, features: PlacementRows | None = None
    ) -> bool:
        """pending -> dispatched on the decision's host/GPUs; False if the job left pending meanwhile.

        ``features`` (one scheduler feature row per chosen GPU) are stored with the
        dispatch, in its transaction, so every placed job can later become training data.
        """
        ch = Change(
            _station_id(), job_id, "dispatched", "station", now, to_state="dispatched",
            only_from=frozenset({"pending"}), host=decision.host, gpus=decision.gpus,
            reason=decision.reason, decision=decision_record(decision, now),
        )  # fmt: skip
        async with self._pool.connection() as conn, conn.transaction():
            done = await self._apply(conn, ch) == "dispatched"
            if done and features is not None:
                await record_placement(conn, job_id, decision, features, now)
        return done

    async def mark_rejected(
        self, job_id: str, reason: str, now: float, *, decision: Decision | None = None,
        only_from: Iterable[str] = ("pending", "dispatched"),
    ) -> bool:  # fmt: skip
        ch = Change(
            _station_id(), job_id, "rejected", "station", now, to_state="rejected",
            only_from=frozenset(only_from), reason=reason,
            decision=decision_record(decision, now) if decision is not None else None,
        )  # fmt: skip
        return await self.apply_station(ch) == "rejected"

    async def mark_lost(
        self, job_id: str, reason: str, now: float, *, only_from: Iterable[str] = ("dispatched",)
    ) -> bool:
        """dispatched -> lost by default: a job the agent already reported running is left
        alone, unless the caller knows its host is gone (``only_from`` with "running")."""
        ch = Change(
            _station_id(), job_id, "lost", "station", now, to_state="lost",
            only_from=frozenset(only_from), reason=reason,
        )  # fmt: skip
        return await self.apply_station(ch) == "lost"

    async def note(self, job_id: str, reason: str, now: float, *, only_from: Iterable[str]) -> bool:
        """Update the reason shown for a job without changing its state (e.g. a run_job
        with no reply: the job stays dispatched until it starts or its start times out)."""
        ch = Change(
            _station_id(), job_id, "note", "station", now, only_from=frozenset(only_from), reason=reason
        )
        return await self.apply_station(ch) is not None

    async def cancel(self, job_id: str, now: float, *, by: str | None = None) -> JobRecord | None:
        """Cancel: a pending job ends here; a dispatched/running one is flagged (the caller
        then sends ``cancel_job``). Returns the job afterwards, None if unknown."""
        reason = f"cancelled by {by}" if by else "cancelled by the operator"
        done = Change(
            _station_id(), job_id, "cancelled", "station", now, to_state="cancelled",
            only_from=frozenset({"pending"}), reason=reason,
        )  # fmt: skip
        if await self.apply_station(done) != "cancelled":
            flag = Change(
                _station_id(), job_id, "cancel_requested", "station", now,
                only_from=frozenset({"dispatched", "running"}), cancel_requested=True, reason=None,
            )  # fmt: skip
            await self.apply_station(flag)
        return await self.get(job_id)

    async def apply_station(self, ch: Change) -> str | None:
        """Apply one station change in its own transaction; see :meth:`_apply`."""
        async with self._pool.connection() as conn, conn.transaction():
            return await self._apply(conn, ch)

    # ----------------------------------------------------------------- the store hook

    async def apply_events(self, conn: AsyncConnection[Any], events: Sequence[Event]) -> None:
        """Store hook: apply agent job events inside the store's transaction (exactly once).

        A savepoint per event keeps one bad event (a data error) from failing the whole
        batch: the store would otherwise retry, and fail, forever and stop storing events.
        Events apply in time order, so an ``agent_started`` sees the jobs as they stood then.
        """
        for ev in sorted(events, key=lambda e: e.ts):
            if ev.kind != "agent_started" and change_from_event(ev) is None:
                continue
            try:
                async with conn.transaction():
                    for ch in await self._event_changes(conn, ev):
                        await self._apply(conn, ch)
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                log.error("job event %s for %s not applied: %s", ev.id, ev.job_id or ev.host, exc)

    async def _event_changes(self, conn: AsyncConnection[Any], ev: Event) -> list[Change]:
        if ev.kind != "agent_started":
            ch = change_from_event(ev)
            return [ch] if ch is not None else []
        # The jobs the agent's earlier run had: dispatched or started before this start.
        # started_at comes from the same agent's clock as ev.ts; dispatched_at (a job not
        # yet reported started) from the station's.
        cur = await conn.execute(
            "SELECT id, state FROM jobs WHERE host = %s AND state IN ('dispatched', 'running') "
            "AND COALESCE(started_at, dispatched_at) < %s ORDER BY id FOR UPDATE",
            (ev.host, _dt(ev.ts)),
        )
        return [restart_change(ev, job_id, state) for job_id, state in await cur.fetchall()]

    async def _apply(self, conn: AsyncConnection[Any], ch: Change) -> str | None:
        """Apply ``ch`` under the job's row lock. Returns the job's state after it, or None
        if nothing was recorded (unknown job, event already applied, or nothing to do)."""
        cur = await conn.execute(
            "SELECT state, host, reason, not_before FROM jobs WHERE id = %s FOR UPDATE", (ch.job_id,)
        )
        row = await cur.fetchone()
        if row is None:
            log.info("%s event %s for unknown job %s ignored", ch.source, ch.kind, ch.job_id)
            return None
        current, job_host, cur_reason, cur_not_before = row
        # Job ids are random, so a report from another host is not about this job.
        foreign = ch.source == "agent" and job_host is not None and ch.host not in (None, job_host)
        if foreign:
            log.warning(
                "event %s: job %s runs on %s, not %s; ignored", ch.event_id, ch.job_id, job_host, ch.host
            )
        new = None if foreign or ch.to_state is None else next_state(current, ch.to_state, ch.only_from)
        sets: dict[str, Any] = {}
        if new is not None:
            sets["state"] = new
            if ch.reason is not None:
                sets["reason"] = ch.reason
            if ch.decision is not None:
                sets["decision"] = Jsonb(ch.decision)
            if new == "dispatched":
                sets.update(dispatched_at=_dt(ch.ts), host=ch.host, gpus=list(ch.gpus or ()), not_before=None)
            if new == "running" and ch.reason is None:
                # Once it runs, the reason is the placement's again (not a note made while
                # it was dispatched, such as a run_job that got no reply).
                sets["reason"] = sql.SQL("COALESCE(decision->>'reason', reason)")
            if new in TERMINAL_STATES:
                sets["ended_at"] = _dt(ch.ts)
                if ch.exit_code is not None:
                    sets["exit_code"] = ch.exit_code
        elif ch.to_state is None and not foreign and (ch.only_from is None or current in ch.only_from):
            if ch.cancel_requested:
                sets["cancel_requested_at"] = _dt(ch.ts)
            if ch.kind == "decision" and (ch.reason != cur_reason or _dt(ch.not_before_ts) != cur_not_before):
                sets.update(reason=ch.reason, not_before=_dt(ch.not_before_ts))
                if ch.decision is not None:
                    sets["decision"] = Jsonb(ch.decision)
            if ch.kind == "note" and ch.reason != cur_reason:
                sets["reason"] = ch.reason
        if ch.kind == "job_started" and not foreign:
            # Even when the state does not move (job_finished came first), when it started is a fact.
            sets["started_at"] = sql.SQL("COALESCE(started_at, {})").format(sql.Literal(_dt(ch.ts)))
            sets["host"] = sql.SQL("COALESCE(host, {})").format(sql.Literal(ch.host))
            if ch.gpus is not None:
                sets["gpus"] = sql.SQL("COALESCE(gpus, {}::integer[])").format(sql.Literal(list(ch.gpus)))
        if ch.source == "station" and not sets:
            return None  # a station change with no effect (e.g. an unchanged wait reason) is not news
        ins = await conn.execute(
            "INSERT INTO job_events (event_id, job_id, kind, source, ts, host, from_state, to_state, detail, data) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING RETURNING 1",
            (
                ch.event_id, ch.job_id, ch.kind, ch.source, _dt(ch.ts), ch.host, current, new,
                ch.reason, Jsonb(ch.decision) if ch.decision is not None else None,
            ),
        )  # fmt: skip
        if await ins.fetchone() is None:
            return None  # this event was applied before: change nothing
        if sets:
            sets["updated_at"] = sql.SQL("now()")
            assignments = sql.SQL(", ").join(
                sql.SQL("{} = {}").format(
                    sql.Identifier(k), v if isinstance(v, sql.Composable) else sql.Placeholder(k)
                )
                for k, v in sets.items()
            )
            params = {k: v for k, v in sets.items() if not isinstance(v, sql.Composable)}
            q = sql.SQL("UPDATE jobs SET {} WHERE id = {}").format(assignments, sql.Literal(ch.job_id))
            await conn.execute(q, params)
        await conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, ch.job_id))
        return new or current
