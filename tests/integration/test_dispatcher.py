"""The dispatcher against a real PostgreSQL and a real nats-server (agents are tiny NATS responders)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from psycopg_pool import AsyncConnectionPool

from aether_desktop.services.bus import Bus
from aether_desktop.services.dispatch_placement import reserve
from aether_desktop.services.dispatcher import Dispatcher, JobActionError
from aether_desktop.services.jobs import JobRecord, JobRepository
from aether_desktop.services.jobtypes import Decision, GpuCandidate, JobRequest, ScoredCandidate
from aether_protocol import CancelJobCmd, Command, Event, JobLogCmd, RunJobCmd, decode_command, reply
from aether_protocol import subjects as subj
from aether_protocol.connection import NatsSettings

pytestmark = pytest.mark.integration

T0 = 1_764_000_000.0


def gpu(host: str, index: int, mem_used: float = 0.0) -> GpuCandidate:
    return GpuCandidate(host, index, "H100", "ok", 40.0, mem_used, 81559.0, 0.0, 80.0, 700.0)


class FakePlacer:
    """First fit on the least-loaded GPUs of one host; enough to drive the dispatcher."""

    def __init__(self) -> None:
        self.seen: list[list[GpuCandidate]] = []
        self.answer: Decision | None = None  # a fixed answer overrides first fit

    def place(self, job: JobRequest, candidates: Sequence[GpuCandidate], now: float) -> Decision:
        self.seen.append(list(candidates))
        if self.answer is not None:
            return self.answer
        if job.num_gpus > 8:
            return Decision("reject", f"needs {job.num_gpus} GPUs; the largest host has 8")
        for host in sorted({c.host for c in candidates}):
            free = sorted(
                (c for c in candidates if c.host == host and c.running_jobs == 0), key=lambda c: c.index
            )
            if len(free) >= job.num_gpus:
                gpus = tuple(c.index for c in free[: job.num_gpus])
                scored = (ScoredCandidate(host, gpus, 0.95, 1.1, 0.9, "free"),)
                return Decision("place", f"{host} has {len(free)} free GPUs", host=host, gpus=gpus,
                                p_success=0.95, expected_slowdown=1.1, candidates=scored)  # fmt: skip
        return Decision("wait", "no host has enough free GPUs")


class Agent:
    """A stand-in agent: a real NATS subscription on aether.cmd.<host> that answers every request."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.commands: list[Command] = []
        self.answer: Callable[[Command], tuple[bool, str | None, dict[str, object] | None]] = lambda c: (
            True, None, None,
        )  # fmt: skip
        self.nc: Client | None = None

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url)
        await self.nc.subscribe(subj.command("aether", self.host), cb=self._on_msg)
        await self.nc.flush()

    async def _on_msg(self, msg: Msg) -> None:
        cmd = decode_command(msg.data)
        self.commands.append(cmd)
        ok, error, data = self.answer(cmd)
        await msg.respond(reply(cmd.id, ok, error, data))

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@pytest.fixture
async def repo(pg_dsn: str) -> AsyncIterator[JobRepository]:
    async with AsyncConnectionPool(pg_dsn, min_size=1, max_size=6, open=False) as pool:
        r = JobRepository(pool)
        await r.ensure_schema()
        yield r


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = Bus(NatsSettings(servers=(nats_url,)))
    await b.start(wait=10)
    assert await b.wait_connected(10)
    yield b
    await b.stop()


@pytest.fixture
async def agent(nats_url: str) -> AsyncIterator[Agent]:
    a = Agent("node-1")
    await a.start(nats_url)
    yield a
    await a.stop()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make(repo: JobRepository, dsn: str, bus: Bus, cands: list[GpuCandidate], **kw: Any) -> Dispatcher:
    kw.setdefault("placer", FakePlacer())
    kw.setdefault("clock", Clock())
    return Dispatcher(repo, dsn, kw.pop("placer"), bus, lambda: cands, request_timeout_s=2.0, **kw)


def req(job_id: str, **kw: Any) -> JobRequest:
    base: dict[str, Any] = {
        "id": job_id,
        "argv": ("python", "train.py;", "rm", "-rf", "/"),
        "submitted_ts": T0,
    }
    return JobRequest(**(base | kw))


async def until(cond: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Poll a condition; generous timeouts keep these tests independent of machine speed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def state(repo: JobRepository, job_id: str) -> JobRecord:
    rec = await repo.get(job_id)
    assert rec is not None
    return rec


async def test_dispatch_to_a_live_agent(repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent) -> None:
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0), gpu("node-1", 1)])
    await repo.submit(req("j1", env={"EPOCHS": "3"}, mem_mib=8000.0))
    assert await d.try_acquire()
    await d.tick()
    rec = await state(repo, "j1")
    assert rec.state == "dispatched" and rec.host == "node-1" and rec.gpus == (0,)
    assert rec.decision is not None and rec.decision["reason"] == "node-1 has 2 free GPUs"
    assert rec.decision["candidates"][0]["score"] == 0.9
    [cmd] = agent.commands
    assert isinstance(cmd, RunJobCmd)
    # The shell metacharacters travel as plain argv items; the agent runs no shell.
    assert cmd.job.argv == ["python", "train.py;", "rm", "-rf", "/"]
    assert (cmd.job.id, cmd.job.gpus, cmd.job.env, cmd.job.mem_mib) == ("j1", [0], {"EPOCHS": "3"}, 8000.0)
    async with repo._pool.connection() as conn, conn.transaction():
        await repo.apply_events(conn, [Event(v=1, host="node-1", ts=T0 + 1, id="e1", kind="job_started",
                                             job_id="j1", gpus=[0])])  # fmt: skip
    assert (await state(repo, "j1")).state == "running"
    await d.stop()


async def test_dispatch_to_a_dead_host_is_lost_with_the_reason(
    repo: JobRepository, pg_dsn: str, bus: Bus
) -> None:
    d = make(repo, pg_dsn, bus, [gpu("node-gone", 0)])
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    rec = await state(repo, "j1")
    assert rec.state == "lost" and rec.host == "node-gone"
    assert rec.reason is not None and "no responders" in rec.reason and "node-gone" in rec.reason
    assert rec.ended_ts is not None
    await d.stop()


async def test_agent_refusal_rejects_with_its_reason(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    agent.answer = lambda c: (False, "argv[0] 'python' is not in the agent's allowed commands", None)
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)])
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    rec = await state(repo, "j1")
    assert rec.state == "rejected"
    assert rec.reason == "agent node-1 refused: argv[0] 'python' is not in the agent's allowed commands"
    await d.stop()


async def test_wait_defer_and_reject_decisions(repo: JobRepository, pg_dsn: str, bus: Bus) -> None:
    placer = FakePlacer()
    clock = Clock()
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)], placer=placer, clock=clock)
    await repo.submit(req("big", num_gpus=9))
    await repo.submit(req("two", num_gpus=2))
    assert await d.try_acquire()
    await d.tick()
    assert (await state(repo, "big")).state == "rejected"
    two = await state(repo, "two")
    assert (two.state, two.reason) == ("pending", "no host has enough free GPUs")

    placer.answer = Decision("defer", "greener grid in an hour", not_before_ts=T0 + 3600)
    await d.tick()
    two = await state(repo, "two")
    assert (two.state, two.reason, two.not_before_ts) == ("pending", "greener grid in an hour", T0 + 3600)
    placer.seen.clear()
    await d.tick()
    assert placer.seen == []  # deferred: not offered to the scheduler before not_before
    await d.stop()


async def test_jobs_placed_in_one_tick_do_not_share_a_gpu(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0), gpu("node-1", 1)])
    for i in range(3):
        await repo.submit(req(f"j{i}", submitted_ts=T0 + i, mem_mib=1000.0))
    assert await d.try_acquire()
    await d.tick()
    recs = [await state(repo, f"j{i}") for i in range(3)]
    assert [(r.state, r.gpus) for r in recs] == [("dispatched", (0,)), ("dispatched", (1,)), ("pending", ())]
    # On the next pass the still-unstarted dispatches are counted against their GPUs too.
    await d.tick()
    assert (await state(repo, "j2")).state == "pending"
    await d.stop()


def test_reserve_counts_placed_jobs() -> None:
    out = reserve([gpu("a", 0), gpu("a", 1, mem_used=10.0)], [("a", (1,), 500.0), ("b", (1,), 9.0)])
    assert [(c.running_jobs, c.mem_used_mib) for c in out] == [(0, 0.0), (1, 510.0)]


async def test_pinned_job_goes_only_to_its_gpus(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    placer = FakePlacer()
    cands = [gpu("node-0", 0), gpu("node-1", 0), gpu("node-1", 1), gpu("node-1", 2)]
    d = make(repo, pg_dsn, bus, cands, placer=placer)
    await repo.submit(req("pin", num_gpus=2, host="node-1", gpus=(1, 2)))
    await repo.submit(req("away", submitted_ts=T0 + 1, num_gpus=1, host="node-7", gpus=(0,)))
    assert await d.try_acquire()
    await d.tick()
    assert [(c.host, c.index) for c in placer.seen[0]] == [("node-1", 1), ("node-1", 2)]
    assert (await state(repo, "pin")).gpus == (1, 2)
    away = await state(repo, "away")
    assert away.state == "pending" and away.reason is not None and "node-7:0" in away.reason
    await d.stop()


async def test_dispatched_job_without_start_becomes_lost(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    clock = Clock()
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)], clock=clock, start_timeout_s=60.0)
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    assert (await state(repo, "j1")).state == "dispatched"
    clock.now = T0 + 59
    await d.tick()
    assert (await state(repo, "j1")).state == "dispatched"
    clock.now = T0 + 61
    await d.tick()
    rec = await state(repo, "j1")
    assert rec.state == "lost" and rec.reason == "no job_started from node-1 within 60 s of dispatch"
    await d.stop()


async def test_cancel_sends_cancel_job(repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent) -> None:
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)], operator="ana")
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    assert await d.cancel("j1") == "cancel sent to node-1 for j1"
    assert isinstance(agent.commands[-1], CancelJobCmd) and agent.commands[-1].job_id == "j1"
    assert (await state(repo, "j1")).cancel_requested_ts is not None

    # A pending job is cancelled in the database; nothing goes to an agent.
    await repo.submit(req("j2", num_gpus=3))
    n = len(agent.commands)
    assert await d.cancel("j2") == "j2 cancelled"
    assert len(agent.commands) == n and (await state(repo, "j2")).state == "cancelled"
    with pytest.raises(JobActionError, match="already ended"):
        await d.cancel("j2")
    with pytest.raises(JobActionError, match="no job"):
        await d.cancel("nope")

    agent.answer = lambda c: (False, "no such job", None)
    with pytest.raises(JobActionError, match="refused to cancel j1: no such job"):
        await d.cancel("j1")
    await d.stop()


async def test_job_log_tail(repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent) -> None:
    agent.answer = lambda c: (True, None, {"log": f"epoch 3/3 done ({c.job_id})"}) if isinstance(
        c, JobLogCmd) else (True, None, None)  # fmt: skip
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)])
    await repo.submit(req("j1"))
    with pytest.raises(JobActionError, match="not been placed"):
        await d.job_log("j1")
    assert await d.try_acquire()
    await d.tick()
    assert await d.job_log("j1") == "epoch 3/3 done (j1)"
    await agent.stop()
    with pytest.raises(JobActionError, match="offline"):
        await d.job_log("j1")
    await d.stop()


async def _advisory_holders(repo: JobRepository) -> list[int]:
    async with repo._pool.connection() as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return [r[0] for r in await cur.fetchall()]


async def test_only_one_dispatcher_and_takeover_when_its_connection_dies(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    roles: list[tuple[str, bool]] = []
    a = make(repo, pg_dsn, bus, [gpu("node-1", 0)], on_role=lambda v: roles.append(("a", v)))
    b = make(repo, pg_dsn, bus, [gpu("node-1", 0)], on_role=lambda v: roles.append(("b", v)))
    assert await a.try_acquire()
    assert not await b.try_acquire()
    await repo.submit(req("j1"))
    await b.tick()  # a standby station never dispatches
    assert (await state(repo, "j1")).state == "pending"

    # The holder's session dies (crash, network): PostgreSQL frees the lock with it.
    [pid] = await _advisory_holders(repo)
    async with repo._pool.connection() as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await until(b.try_acquire)
    assert not await a.try_acquire() and not a.active
    await b.tick()
    assert (await state(repo, "j1")).state == "dispatched"
    assert roles == [("a", True), ("b", True), ("a", False)]
    await a.stop()
    await b.stop()


async def test_running_dispatchers_hand_over_on_stop(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    a = make(repo, pg_dsn, bus, [gpu("node-1", 0)], interval_s=0.1)
    a.start()

    async def a_active() -> bool:
        return a.active

    await until(a_active)
    b = make(repo, pg_dsn, bus, [gpu("node-1", 0)], interval_s=0.1)
    b.start()
    await repo.submit(req("j1"))
    a.wake()

    async def j1_dispatched() -> bool:
        return (await state(repo, "j1")).state == "dispatched"

    await until(j1_dispatched)
    assert a.active and not b.active
    await a.stop()

    async def b_active() -> bool:
        return b.active

    await until(b_active)
    await b.stop()
    assert await _advisory_holders(repo) == []


async def test_the_real_scheduler_places_through_the_dispatcher(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    from aether_desktop.services.scheduler import Scheduler
    from aether_desktop.services.scheduler_model import generate_training_data, train

    model = train(generate_training_data(n_jobs=400, seed=0, fleets=1), rounds=10)
    d = make(repo, pg_dsn, bus, [gpu("node-1", i) for i in range(4)], placer=Scheduler(model))
    await repo.submit(req("fits", num_gpus=2, mem_mib=8000.0))
    await repo.submit(req("never", num_gpus=9, submitted_ts=T0 + 1))
    assert await d.try_acquire()
    await d.tick()
    fits, never = await state(repo, "fits"), await state(repo, "never")
    assert fits.state == "dispatched" and fits.host == "node-1" and len(fits.gpus) == 2
    assert fits.decision is not None and fits.decision["candidates_total"] >= 1
    assert fits.decision["model_version"] == model.version
    assert never.state == "rejected" and never.reason is not None and "9 GPUs" in never.reason
    assert isinstance(agent.commands[0], RunJobCmd)
    await d.stop()


async def test_no_placement_while_not_ready(repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent) -> None:
    ready = False
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)], ready=lambda: ready)
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()  # e.g. this station lost NATS: placing now would only mark jobs lost
    assert (await state(repo, "j1")).state == "pending" and agent.commands == []
    ready = True
    await d.tick()
    assert (await state(repo, "j1")).state == "dispatched"
    await d.stop()


# --------------------------------------------------------------------------- dead hosts


async def _start(repo: JobRepository, job_id: str, host: str, ts: float) -> None:
    async with repo._pool.connection() as conn, conn.transaction():
        await repo.apply_events(conn, [Event(v=1, host=host, ts=ts, id=f"start-{job_id}", kind="job_started",
                                             job_id=job_id, gpus=[0])])  # fmt: skip


async def test_jobs_on_a_host_that_stops_reporting_become_lost(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    clock = Clock()
    online = {"node-1": True}
    cands = [gpu("node-1", 0), gpu("node-1", 1)]
    d = make(repo, pg_dsn, bus, cands, clock=clock, host_online=online.__getitem__, host_grace_s=30.0)
    standby = make(repo, pg_dsn, bus, cands, clock=clock, host_online=online.__getitem__, host_grace_s=30.0)
    await repo.submit(req("j-run"))
    await repo.submit(req("j-sent", submitted_ts=T0 + 1))
    assert await d.try_acquire() and not await standby.try_acquire()
    await d.tick()
    await _start(repo, "j-run", "node-1", T0 + 1)
    assert [(await state(repo, j)).state for j in ("j-run", "j-sent")] == ["running", "dispatched"]

    online["node-1"] = False  # the host dies: no more telemetry
    for t in (10, 25, 40):  # first seen offline at +10; +40 is exactly the grace, not over it
        clock.now = T0 + t
        await d.tick()
    assert [(await state(repo, j)).state for j in ("j-run", "j-sent")] == ["running", "dispatched"]
    clock.now = T0 + 41
    await standby.tick()  # only the dispatching station declares jobs lost
    assert (await state(repo, "j-run")).state == "running"
    await d.tick()
    for job_id, was in (("j-run", "running"), ("j-sent", "dispatched")):
        rec = await state(repo, job_id)
        assert rec.state == "lost" and rec.ended_ts == T0 + 41
        assert (
            rec.reason == f"host node-1 stopped reporting: no telemetry for over 30 s while the job was {was}"
        )
    await d.stop()
    await standby.stop()


async def test_a_host_back_within_the_grace_keeps_its_jobs(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    clock = Clock()
    online = {"node-1": True}
    d = make(
        repo, pg_dsn, bus, [gpu("node-1", 0)], clock=clock, host_online=online.__getitem__, host_grace_s=30.0
    )
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    await _start(repo, "j1", "node-1", T0 + 1)
    online["node-1"] = False
    clock.now = T0 + 10
    await d.tick()
    online["node-1"] = True  # a network blip
    clock.now = T0 + 20
    await d.tick()
    online["node-1"] = False  # offline again: the grace starts over
    for t in (50, 79):
        clock.now = T0 + t
        await d.tick()
    assert (await state(repo, "j1")).state == "running"
    clock.now = T0 + 81
    await d.tick()
    assert (await state(repo, "j1")).state == "lost"
    await d.stop()


async def test_no_job_is_lost_before_the_station_has_heard_from_its_hosts(
    repo: JobRepository, pg_dsn: str, bus: Bus
) -> None:
    # Jobs left running by an earlier session; this station has just started and its
    # fleet view is still empty, so every host looks offline for a moment.
    for job_id, host in (("j-a", "node-a"), ("j-b", "node-b")):
        await repo.submit(req(job_id))
        assert await repo.mark_dispatched(job_id, Decision("place", "earlier", host=host, gpus=(0,)), T0)
        await _start(repo, job_id, host, T0 + 1)
    clock = Clock()
    clock.now = T0 + 3600
    heard: set[str] = set()
    ready = False
    d = make(repo, pg_dsn, bus, [], clock=clock, host_online=heard.__contains__, host_grace_s=30.0,
             ready=lambda: ready)  # fmt: skip
    assert await d.try_acquire()
    clock.now = T0 + 3700
    await d.tick()  # not connected yet: the clock has not started
    ready = True
    await d.tick()  # connected at +3700: the grace counts from here, not from the jobs' dispatch
    clock.now = T0 + 3710
    heard.add("node-a")  # node-a's first telemetry arrives
    await d.tick()
    clock.now = T0 + 3730
    await d.tick()
    assert [(await state(repo, j)).state for j in ("j-a", "j-b")] == ["running", "running"]
    clock.now = T0 + 3731
    await d.tick()  # node-b has been silent for the whole grace since the station connected
    assert [(await state(repo, j)).state for j in ("j-a", "j-b")] == ["running", "lost"]
    await d.stop()


# --------------------------------------------------------------------------- placement model retraining


async def test_placements_become_training_data_and_the_live_scheduler_switches_model(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent, tmp_path: Path
) -> None:
    from aether_desktop.services.job_placements import PlacementStore
    from aether_desktop.services.placement_retrain import PlacementRetrainer, RetrainPolicy, placement_rows
    from aether_desktop.services.scheduler import Scheduler
    from aether_desktop.services.scheduler_model import (
        FEATURE_NAMES,
        ModelStore,
        generate_training_data,
        train,
    )

    models = ModelStore(tmp_path)
    model = models.save(train(generate_training_data(n_jobs=400, seed=0, fleets=1), rounds=10))
    scheduler = Scheduler(model)
    clock = Clock()
    d = make(repo, pg_dsn, bus, [gpu("node-1", i) for i in range(4)], placer=scheduler, clock=clock,
             placement_features=placement_rows)  # fmt: skip
    for i in range(4):
        await repo.submit(req(f"j{i}", submitted_ts=T0 + i, mem_mib=4000.0, expected_s=100.0))
    assert await d.try_acquire()
    await d.tick()
    events = []
    for i in range(4):
        rec = await state(repo, f"j{i}")
        assert (
            rec.state == "dispatched" and rec.decision is not None and rec.decision["model_version"] == "v1"
        )
        g = rec.gpus[0]
        events.append(
            Event(v=1, host="node-1", ts=T0 + 5, id=f"s{i}", kind="job_started", job_id=f"j{i}", gpus=[g])
        )
        end = (Event(v=1, host="node-1", ts=T0 + 125, id=f"f{i}", kind="job_finished", job_id=f"j{i}", exit_code=0)
               if i else Event(v=1, host="node-1", ts=T0 + 50, id=f"f{i}", kind="job_failed", job_id=f"j{i}",
                               exit_code=1, detail=f"CUDA out of memory: tried to allocate 9 MiB on GPU {g}"))  # fmt: skip
        events.append(end)
    async with repo._pool.connection() as conn, conn.transaction():
        await repo.apply_events(conn, events)

    store = PlacementStore(repo._pool)
    outcomes = await store.outcomes()
    assert len(outcomes) == 4 and all(o.names == FEATURE_NAMES for o in outcomes)
    assert await store.count_ended_since(T0) == 4

    def switch(m: object) -> None:
        scheduler.model = m  # type: ignore[assignment]

    r = PlacementRetrainer(store, models, model, on_model=switch, policy=RetrainPolicy(sim_jobs=400))
    new = await r.retrain()
    assert new.version == "v2" and new.meta["fleet_rows"] == 4 and new.meta["fleet_jobs"] == 4
    assert scheduler.model is new and models.versions() == [1, 2]
    # The next placement comes from the new version, with no restart.
    await repo.submit(req("after", submitted_ts=T0 + 200, mem_mib=4000.0))
    clock.now = T0 + 200
    await d.tick()
    after = await state(repo, "after")
    assert after.decision is not None and after.decision["model_version"] == "v2"
    await d.stop()


async def test_stop_right_after_a_wake_does_not_hang(repo: JobRepository, pg_dsn: str, bus: Bus) -> None:
    # A submit's wake() and stop() in the same loop turn: on Python 3.11 wait_for swallowed the cancel.
    d = make(repo, pg_dsn, bus, [], interval_s=30.0)
    d.start()

    async def active() -> bool:
        return d.active

    await until(active)
    await asyncio.sleep(0.2)  # into the idle wait
    d.wake()
    t0 = asyncio.get_running_loop().time()
    async with asyncio.timeout(10):
        await d.stop()
    assert asyncio.get_running_loop().time() - t0 < 5 and not d.active
