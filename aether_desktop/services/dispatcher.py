"""The dispatcher: takes pending jobs, asks the scheduler where to run them, sends ``run_job``.

Every pending job is looked at on every pass (in pages, by priority then age), and
the GPUs of every dispatched or running job count as taken. A placement on sleeping
GPUs first sends the agent ``wake`` for them; the job is marked dispatched only once
they are awake, so a wake that fails leaves it waiting, never half-placed.

Exactly one station dispatches at a time. Each station's Dispatcher keeps a dedicated
autocommit connection and tries ``pg_try_advisory_lock`` on it every interval; the
one that gets it dispatches, the others stand by. The lock is a session lock, so it
goes away with its connection: a station that quits, crashes or loses the database
releases it and another station's next try takes over. Every job change is also a
conditional update (``only_from``), so even a brief overlap cannot dispatch a job twice.

Every station can cancel jobs and read their logs (:meth:`Dispatcher.cancel`,
:meth:`Dispatcher.job_log`); only the lock holder places them, and only the lock
holder marks jobs ``lost`` when their host stops reporting (``host_online``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import psycopg

from aether_desktop.services.bus import HostOffline
from aether_desktop.services.dispatch_commands import command_id, lock_key, not_delivered, run_job_command
from aether_desktop.services.dispatch_placement import (
    check_decision,
    pin_wait,
    pinned_candidates,
    reserve,
    sleeping_gpus,
)
from aether_desktop.services.job_placements import PlacementRows
from aether_desktop.services.jobs import JobRecord, JobRepository
from aether_desktop.services.jobtypes import Decision, GpuCandidate, JobRequest
from aether_protocol import (
    PROTOCOL_VERSION,
    CancelJobCmd,
    Command,
    JobLogCmd,
    Reply,
    WakeCmd,
)

log = logging.getLogger(__name__)


class Placer(Protocol):
    """The scheduler (services/scheduler.py ``Scheduler``), or a fake in tests."""

    def place(self, job: JobRequest, candidates: Sequence[GpuCandidate], now: float) -> Decision: ...


class CommandSender(Protocol):
    """The station's command client (services/bus.py ``Bus``): raises HostOffline for no
    responders, a timeout or no NATS connection."""

    async def request(self, host: str, cmd: Command, timeout: float = 5.0) -> Reply: ...


FeatureRecorder = Callable[[JobRequest, Sequence[GpuCandidate], str, Sequence[int]], PlacementRows]


class JobActionError(Exception):
    """A cancel or log request that could not be done; the message is for the operator."""


# --------------------------------------------------------------------------- dispatcher


class Dispatcher:
    def __init__(
        self,
        repo: JobRepository,
        dsn: str,
        placer: Placer,
        sender: CommandSender,
        candidates: Callable[[], Sequence[GpuCandidate]],
        *,
        prefix: str = "aether",
        interval_s: float = 2.0,
        start_timeout_s: float = 120.0,
        request_timeout_s: float = 5.0,
        wake_timeout_s: float = 30.0,
        wake_retry_s: float = 30.0,
        batch: int = 50,
        operator: str | None = None,
        clock: Callable[[], float] = time.time,
        on_role: Callable[[bool], None] | None = None,
        ready: Callable[[], bool] = lambda: True,
        host_online: Callable[[str], bool] | None = None,
        host_grace_s: float = 30.0,
        placement_features: FeatureRecorder | None = None,
    ) -> None:
        """``candidates()`` returns the fleet's GPUs as they are now (called once per tick).

        ``start_timeout_s``: a dispatched job with no ``job_started`` event by then is
        lost. It must cover the agent's start-up and the event's trip through JetStream
        into the database, hence generous. ``on_role(active)`` is told when this station
        starts or stops dispatching. ``ready()`` false (e.g. the station itself is not
        connected to NATS) pauses placement: every run_job would fail and mark its job lost.

        ``host_online(host)`` false for longer than ``host_grace_s`` marks that host's
        dispatched and running jobs lost. The grace counts from the later of the job's
        dispatch and the moment this station started dispatching while connected: a
        station that just started (or took over) has heard from no host yet.
        ``placement_features(job, candidates, host, gpus)`` gives the feature rows stored
        with each placement, the training data for retraining the placement model.

        ``wake_timeout_s``: how long a ``wake`` for a placement's sleeping GPUs may take;
        a job whose GPUs could not be woken waits ``wake_retry_s`` before it is tried
        again (elsewhere, if better GPUs have come free). ``batch`` is the page size in
        which the pending queue is read; every page is decided on every pass.
        """
        self._repo = repo
        self._dsn = dsn
        self._placer = placer
        self._sender = sender
        self._candidates = candidates
        self._key = lock_key(prefix)
        self._interval_s = interval_s
        self._start_timeout_s = start_timeout_s
        self._request_timeout_s = request_timeout_s
        self._wake_timeout_s = wake_timeout_s
        self._wake_retry_s = wake_retry_s
        self._batch = batch
        self._operator = operator
        self._clock = clock
        self._on_role = on_role
        self._ready = ready
        self._host_online = host_online
        self._host_grace_s = host_grace_s
        self._features = placement_features
        self._watch_since: float | None = None  # since when this station dispatches while connected
        self._offline_since: dict[str, float] = {}  # host -> first tick it was seen offline
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None
        self._active = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool:
        """True while this station holds the dispatcher lock."""
        return self._active

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dispatcher")
            self._task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        """Stop dispatching and release the lock (another station takes over)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancellation we asked for
                await self._task
            self._task = None
        for t in list(self._sends):
            t.cancel()
        await self._drop_lock()

    def wake(self) -> None:
        """Dispatch now instead of at the next interval (e.g. after a submit)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                if await self.try_acquire():
                    await self.tick()
            except (psycopg.OperationalError, TimeoutError) as exc:
                # The database is away; the lock connection is checked again next round.
                log.warning("dispatcher: database unavailable (%s)", exc)
            except psycopg.Error as exc:
                # E.g. the schema is not migrated yet: report it, keep the loop alive.
                log.error("dispatcher: database error: %s", exc)
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
            # lands as the wait completes (a submit's wake during stop()), and stop() then hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()

    # ----------------------------------------------------------------- the lock

    async def try_acquire(self) -> bool:
        """Hold (or try to take) the dispatcher lock; True while this station dispatches."""
        try:
            if self._lock_conn is None or self._lock_conn.closed:
                self._lock_conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=10,
                    keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                )  # fmt: skip
                # Server-side keepalives: if this station's host vanishes, PostgreSQL notices
                # the dead socket and frees the lock for another station within ~25 s.
                with contextlib.suppress(psycopg.Error):
                    await self._lock_conn.execute(
                        "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
                    )
            conn = self._lock_conn
            if self._active:
                # Still ours? A hung connection must not leave two dispatchers, hence the timeout.
                async with asyncio.timeout(5.0):
                    await conn.execute("SELECT 1")
                return True
            async with asyncio.timeout(5.0):
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))
            row = await cur.fetchone()
            got = bool(row and row[0])
        except (psycopg.OperationalError, TimeoutError) as exc:
            if self._active:
                log.warning("dispatcher: lost the lock connection (%s); standing by", exc)
            await self._drop_lock()
            return False
        if got:
            log.info("dispatcher: this station now dispatches jobs")
            self._set_active(True)
        return got

    async def _drop_lock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # closing a dead connection may fail; it is gone anyway
                await conn.close()
        self._set_active(False)

    def _set_active(self, active: bool) -> None:
        if active != self._active:
            self._active = active
            self._watch_since = None
            if self._on_role is not None:
                self._on_role(active)

    # ----------------------------------------------------------------- one pass

    async def tick(self) -> None:
        """One dispatch pass (only while holding the lock): expire silent dispatches, then
        place pending jobs by priority and age. ``run_job`` requests go out concurrently."""
        if not self._active or not self._ready():
            # Not hearing telemetry: host liveness must be re-learnt before anyone is declared dead.
            self._watch_since = None
            self._offline_since.clear()
            return
        now = self._clock()
        if self._watch_since is None:
            self._watch_since = now
        for job in await self._repo.overdue_dispatched(now - self._start_timeout_s):
            await self._repo.mark_lost(
                job.id,
                f"no job_started from {job.host} within {self._start_timeout_s:.0f} s of dispatch",
                now,
            )
        inflight = await self._repo.in_flight()
        await self._expire_dead_hosts(now, inflight)
        page = await self._repo.pending(now, self._batch)
        if not page:
            return
        # A job just marked lost above keeps its GPUs until the next pass: harmless.
        cands = reserve(list(self._candidates()), ((j.host, j.gpus, j.request.mem_mib) for j in inflight))
        sends: list[asyncio.Task[None]] = []
        while page and self._active:
            for job in page:
                if not self._active:
                    break
                cands = await self._handle(job, cands, now, sends)
            # Every pending job, not only the first page: a queue head that cannot be
            # placed (e.g. many 8-GPU jobs) must not hide a small job that fits.
            more = len(page) == self._batch
            page = await self._repo.pending(now, self._batch, after=page[-1].id) if more else []
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)

    async def _handle(
        self, job: JobRecord, cands: list[GpuCandidate], now: float, sends: list[asyncio.Task[None]]
    ) -> list[GpuCandidate]:
        """Decide one pending job and act on it; returns the candidates with its GPUs taken."""
        d, seen = self._decide(job.request, cands, now)
        if d.action == "place":
            feats = self._placement_rows(job.request, seen, d)
            asleep = sleeping_gpus(seen, d)
            if asleep:
                # Waking takes a while: done in the send task, which then dispatches.
                sends.append(self._spawn(self._wake_and_run(job.request, d, asleep, feats)))
            elif await self._repo.mark_dispatched(job.id, d, now, features=feats):
                sends.append(self._spawn(self._send_run(job.request, d)))
            else:
                return cands
            return reserve(cands, [(d.host, d.gpus, job.request.mem_mib)])
        if d.action == "reject":
            await self._repo.mark_rejected(job.id, d.reason, now, decision=d, only_from=("pending",))
        else:
            await self._repo.record_decision(job.id, d, now)
        return cands

    async def _expire_dead_hosts(self, now: float, active: Sequence[JobRecord]) -> None:
        """Mark jobs lost whose host has been offline for longer than the grace period."""
        if self._host_online is None or self._watch_since is None:
            return
        online = {h: self._host_online(h) for h in {j.host for j in active if j.host is not None}}
        for host in list(self._offline_since):
            if online.get(host, True):
                del self._offline_since[host]  # back, or no jobs there any more
        for job in active:
            if job.host is None or online[job.host]:
                continue
            since = self._offline_since.setdefault(job.host, now)
            start = max(since, self._watch_since, job.dispatched_ts or 0.0)
            if now - start > self._host_grace_s:
                await self._repo.mark_lost(
                    job.id,
                    f"host {job.host} stopped reporting: no telemetry for over {self._host_grace_s:.0f} s "
                    f"while the job was {job.state}",
                    now,
                    only_from=("dispatched", "running"),
                )

    def _decide(
        self, job: JobRequest, cands: Sequence[GpuCandidate], now: float
    ) -> tuple[Decision, list[GpuCandidate]]:
        """The placer's checked decision and the candidates it was shown."""
        usable = pinned_candidates(job, cands)
        waiting = pin_wait(job, cands)
        if waiting is not None:
            return waiting, usable
        if job.host is not None and len(usable) < max(job.num_gpus, len(job.gpus or ())):
            # Some pinned GPU is missing on an online host: the placer rejects the job,
            # and sees the host's real GPU list to say so.
            usable = [c for c in cands if c.host == job.host]
        try:
            d = self._placer.place(job, usable, now)
        except Exception as exc:
            # The placer is a model; a bug in it must leave the job waiting with the
            # error shown, not stop dispatching for every job.
            log.exception("scheduler failed on job %s", job.id)
            return Decision("wait", f"scheduler error: {type(exc).__name__}: {exc}"), usable
        return check_decision(job, d), usable

    def _placement_rows(
        self, job: JobRequest, seen: Sequence[GpuCandidate], d: Decision
    ) -> PlacementRows | None:
        """The chosen GPUs' feature rows, computed from what the placer saw on that host."""
        if self._features is None or d.host is None:
            return None
        # A row's features depend only on its own host's GPUs (the host mean temperature),
        # so the host's candidates alone give the same rows at a fraction of the cost.
        on_host = [c for c in seen if c.host == d.host]
        try:
            rows = self._features(job, on_host, d.host, d.gpus)
        except Exception:
            # Training data are a by-product: a bug here must not stop the job being placed.
            log.exception("placement features for job %s not recorded", job.id)
            return None
        return rows if len(rows.rows) == len(d.gpus) else None

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return task

    async def _wake_and_run(
        self, job: JobRequest, d: Decision, asleep: list[int], feats: PlacementRows | None
    ) -> None:
        """Wake the placement's sleeping GPUs, then dispatch; if they stay asleep the job waits."""
        assert d.host is not None
        gpu_words = f"GPU{'s' if len(asleep) > 1 else ''} {','.join(map(str, asleep))}"
        cmd = WakeCmd(v=PROTOCOL_VERSION, id=command_id(), gpus=asleep)
        try:
            reply = await self._sender.request(d.host, cmd, timeout=self._wake_timeout_s)
            error = None if reply.ok else (reply.error or "no reason given")
        except HostOffline as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("wake for %s on %s failed", job.id, d.host)
            error = f"{type(exc).__name__}: {exc}"
        now = self._clock()
        if error is not None:
            why = (f"could not wake {d.host} {gpu_words} for it: {error}; "
                   f"trying again in {self._wake_retry_s:.0f} s")  # fmt: skip
            await self._repo.record_decision(
                job.id, Decision("defer", why, not_before_ts=now + self._wake_retry_s), now
            )
            return
        if await self._repo.mark_dispatched(job.id, d, now, features=feats):
            await self._send_run(job, d)

    async def _send_run(self, job: JobRequest, d: Decision) -> None:
        assert d.host is not None
        cmd = run_job_command(job, d.gpus, command_id())
        try:
            reply = await self._sender.request(d.host, cmd, timeout=self._request_timeout_s)
        except HostOffline as exc:
            if not_delivered(exc):
                await self._repo.mark_lost(job.id, f"run_job not delivered: {exc}", self._clock())
                return
            # The agent may well have started it: the job_started event (or the start
            # timeout) settles it. Marking it lost now would ignore a job that runs.
            how = "" if exc.reason.startswith("no reply") else f" ({exc.reason})"
            await self._repo.note(
                job.id, f"no reply from {d.host}{how}; waiting for the job to start", self._clock(),
                only_from=("dispatched",),
            )  # fmt: skip
            return
        except Exception as exc:
            # Whatever broke, the agent did not confirm: say so now rather than leave the
            # job "dispatched" until the start timeout.
            log.exception("run_job for %s to %s failed", job.id, d.host)
            await self._repo.mark_lost(job.id, f"run_job to {d.host} failed: {exc}", self._clock())
            return
        if not reply.ok:
            await self._repo.mark_rejected(
                job.id, f"agent {d.host} refused: {reply.error or 'no reason given'}", self._clock(),
                only_from=("dispatched",),
            )  # fmt: skip
            return
        # A cancel that came in while run_job was on its way found nothing to cancel on
        # the agent yet; deliver it now that the job exists there.
        rec = await self._repo.get(job.id)
        if rec is not None and rec.cancel_requested_ts is not None and not rec.terminal:
            with contextlib.suppress(JobActionError):
                await self._send_cancel(rec)

    # ----------------------------------------------------------------- operator actions

    async def cancel(self, job_id: str) -> str:
        """Cancel a job; returns what happened in words, raises JobActionError if it could not."""
        before = await self._repo.get(job_id)
        if before is None:
            raise JobActionError(f"there is no job {job_id}")
        if before.terminal:
            raise JobActionError(f"{job_id} already ended ({before.state})")
        rec = await self._repo.cancel(job_id, self._clock(), by=self._operator)
        if rec is None:
            raise JobActionError(f"there is no job {job_id}")
        if rec.state == "cancelled":
            return f"{job_id} cancelled"
        if rec.terminal:
            raise JobActionError(f"{job_id} already ended ({rec.state})")
        return await self._send_cancel(rec)

    async def _send_cancel(self, rec: JobRecord) -> str:
        assert rec.host is not None
        reply = await self._request(
            rec.host, CancelJobCmd(v=PROTOCOL_VERSION, id=command_id(), job_id=rec.id)
        )
        if not reply.ok:
            raise JobActionError(f"agent {rec.host} refused to cancel {rec.id}: {reply.error}")
        return f"cancel sent to {rec.host} for {rec.id}"

    async def job_log(self, job_id: str, max_bytes: int = 65536) -> str:
        """The tail of the job's output, from the agent that runs (or ran) it."""
        rec = await self._repo.get(job_id)
        if rec is None:
            raise JobActionError(f"there is no job {job_id}")
        if rec.host is None:
            raise JobActionError(f"{job_id} has not been placed on a host yet")
        cmd = JobLogCmd(v=PROTOCOL_VERSION, id=command_id(), job_id=job_id, max_bytes=max_bytes)
        reply = await self._request(rec.host, cmd)
        if not reply.ok:
            raise JobActionError(f"agent {rec.host} does not share the log of {job_id}: {reply.error}")
        text = (reply.data or {}).get("log")
        return text if isinstance(text, str) else ""

    async def _request(self, host: str, cmd: Command) -> Reply:
        try:
            return await self._sender.request(host, cmd, timeout=self._request_timeout_s)
        except HostOffline as exc:
            raise JobActionError(str(exc)) from None


def _log_crash(task: asyncio.Task[None]) -> None:
    # The loop only ends by stop(); anything else is a bug that must not pass silently.
    if not task.cancelled() and task.exception() is not None:
        log.error("dispatcher stopped by an error; jobs are no longer placed", exc_info=task.exception())
