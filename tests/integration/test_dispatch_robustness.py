"""The dispatcher where placement meets a real fleet: sleeping GPUs, running jobs, long queues,
lost replies, pins and offline hosts. Real PostgreSQL and nats-server; agents are NATS stand-ins."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from nats.aio.msg import Msg

from aether_desktop.services.bus import Bus
from aether_desktop.services.fleet import FleetState
from aether_desktop.services.jobs import JobRepository
from aether_desktop.services.jobtypes import GpuCandidate
from aether_desktop.services.scheduler import Scheduler
from aether_desktop.services.scheduler_model import SchedulerModel, generate_training_data, train
from aether_desktop.wiring import fleet_candidates
from aether_protocol import (
    PROTOCOL_VERSION,
    CancelJobCmd,
    Event,
    GpuSample,
    RunJobCmd,
    Telemetry,
    WakeCmd,
    decode_command,
)
from tests.integration import test_dispatcher
from tests.integration.test_dispatcher import T0, Agent, Clock, FakePlacer, gpu, make, req, state

pytestmark = pytest.mark.integration

# The dispatcher tests' fixtures: a job store, the station's bus, an agent for node-1.
repo, bus, agent = test_dispatcher.repo, test_dispatcher.bus, test_dispatcher.agent


@pytest.fixture(scope="module")
def model() -> Iterator[SchedulerModel]:
    yield train(generate_training_data(n_jobs=400, seed=0, fleets=1), rounds=10)


def asleep(c: GpuCandidate) -> GpuCandidate:
    return replace(c, state="sleeping", temp_c=30.0, power_w=20.0)


class SilentAgent(Agent):
    """Takes every command but never answers the ops in ``silent`` (a lost or late reply)."""

    def __init__(self, host: str, silent: tuple[type, ...]) -> None:
        super().__init__(host)
        self.silent = silent

    async def _on_msg(self, msg: Msg) -> None:
        cmd = decode_command(msg.data)
        if isinstance(cmd, self.silent):
            self.commands.append(cmd)
            return
        await super()._on_msg(msg)


async def _events(repo: JobRepository, *events: Event) -> None:
    async with repo._pool.connection() as conn, conn.transaction():
        await repo.apply_events(conn, events)


def _started(job_id: str, ts: float, host: str = "node-1", gpus: tuple[int, ...] = (0,)) -> Event:
    return Event(v=PROTOCOL_VERSION, host=host, ts=ts, id=f"s-{job_id}", kind="job_started", job_id=job_id,
                 gpus=list(gpus))  # fmt: skip


# --------------------------------------------------------------------------- sleeping GPUs


async def test_sleeping_gpus_are_woken_before_run_job(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    d = make(repo, pg_dsn, bus, [asleep(gpu("node-1", 0)), gpu("node-1", 1, mem_used=1.0)])
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    assert [type(c) for c in agent.commands] == [WakeCmd, RunJobCmd]
    wake, run = agent.commands
    assert isinstance(wake, WakeCmd) and wake.gpus == [0]
    assert isinstance(run, RunJobCmd) and run.job.gpus == [0]
    rec = await state(repo, "j1")
    assert rec.state == "dispatched" and rec.gpus == (0,)
    await d.stop()


async def test_a_failed_wake_leaves_the_job_waiting(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    agent.answer = lambda c: (
        (False, "GPU 0: NVML error", None) if isinstance(c, WakeCmd) else (True, None, None)
    )
    clock = Clock()
    d = make(repo, pg_dsn, bus, [asleep(gpu("node-1", 0))], clock=clock)
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    rec = await state(repo, "j1")
    assert rec.state == "pending" and rec.not_before_ts == T0 + 30
    assert rec.reason == "could not wake node-1 GPU 0 for it: GPU 0: NVML error; trying again in 30 s"
    assert [type(c) for c in agent.commands] == [WakeCmd]  # no run_job to a GPU still asleep
    await d.tick()
    assert len(agent.commands) == 1  # not before the retry time
    agent.answer = lambda c: (True, None, None)
    clock.now = T0 + 31
    await d.tick()
    assert [type(c) for c in agent.commands] == [WakeCmd, WakeCmd, RunJobCmd]
    assert (await state(repo, "j1")).state == "dispatched"
    await d.stop()


async def test_a_wake_with_no_reply_leaves_the_job_waiting(repo: JobRepository, pg_dsn: str, bus: Bus,
                                                           nats_url: str) -> None:  # fmt: skip
    quiet = SilentAgent("node-1", (WakeCmd,))
    await quiet.start(nats_url)
    d = make(repo, pg_dsn, bus, [asleep(gpu("node-1", 0))], wake_timeout_s=0.2)
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    rec = await state(repo, "j1")
    assert rec.state == "pending" and rec.reason is not None
    assert rec.reason.startswith("could not wake node-1 GPU 0 for it: host node-1 is offline (no reply")
    assert [type(c) for c in quiet.commands] == [WakeCmd]
    await d.stop()
    await quiet.stop()


# --------------------------------------------------------------------------- running jobs hold their GPUs


async def test_a_running_jobs_gpu_is_not_given_to_another_job(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    # Telemetry does not list the job's process (CUDA not initialised yet, or not reported).
    clock = Clock()
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)], clock=clock)
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()
    await _events(repo, _started("j1", T0 + 1))
    assert (await state(repo, "j1")).state == "running"
    await repo.submit(req("j2", submitted_ts=T0 + 2))
    clock.now = T0 + 3
    await d.tick()
    j2 = await state(repo, "j2")
    assert (j2.state, j2.reason) == ("pending", "no host has enough free GPUs")
    assert [c.job.id for c in agent.commands if isinstance(c, RunJobCmd)] == ["j1"]
    await d.stop()


# --------------------------------------------------------------------------- the whole queue


async def test_every_pending_job_is_decided_not_only_the_queue_head(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent
) -> None:
    placer = FakePlacer()
    d = make(repo, pg_dsn, bus, [gpu("node-1", i) for i in range(4)], placer=placer, batch=5)
    for i in range(12):  # more 8-GPU jobs than a page, ahead of the small one by priority
        await repo.submit(req(f"big{i:02d}", num_gpus=8, priority=1, submitted_ts=T0 + i))
    await repo.submit(req("small", submitted_ts=T0 + 100))
    assert await d.try_acquire()
    await d.tick()
    assert len(placer.seen) == 13  # each decided once, in priority-then-age order
    small = await state(repo, "small")
    assert small.state == "dispatched" and small.host == "node-1"
    for i in range(12):
        big = await state(repo, f"big{i:02d}")
        assert (big.state, big.reason) == ("pending", "no host has enough free GPUs")
    await d.stop()


# --------------------------------------------------------------------------- a lost reply


async def test_no_reply_to_run_job_keeps_the_job_dispatched_until_it_starts(
    repo: JobRepository, pg_dsn: str, bus: Bus, nats_url: str
) -> None:
    quiet = SilentAgent("node-1", (RunJobCmd,))
    await quiet.start(nats_url)
    d = make(repo, pg_dsn, bus, [gpu("node-1", 0)])
    await repo.submit(req("j1"))
    assert await d.try_acquire()
    await d.tick()  # the reply never comes (make() waits 2 s for it)
    rec = await state(repo, "j1")
    assert (rec.state, rec.reason) == ("dispatched", "no reply from node-1; waiting for the job to start")
    # The agent did start it: its job_started counts, and the job can be cancelled.
    await _events(repo, _started("j1", T0 + 5))
    rec = await state(repo, "j1")
    assert (rec.state, rec.reason) == ("running", "node-1 has 1 free GPUs")
    assert await d.cancel("j1") == "cancel sent to node-1 for j1"
    assert isinstance(quiet.commands[-1], CancelJobCmd)
    await d.stop()
    await quiet.stop()


# --------------------------------------------------------------------------- pins and offline hosts


async def test_a_pin_to_a_gpu_an_online_host_lacks_is_rejected(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent, model: SchedulerModel
) -> None:
    cands = [gpu("node-1", i) for i in range(8)] + [
        replace(gpu("node-2", i), state="offline") for i in range(2)
    ]
    d = make(repo, pg_dsn, bus, cands, placer=Scheduler(model))
    await repo.submit(req("pin", num_gpus=2, host="node-1", gpus=(0, 9)))
    await repo.submit(req("pin-off", num_gpus=1, host="node-2", gpus=(5,), submitted_ts=T0 + 1))
    await repo.submit(req("pin-unknown", num_gpus=1, host="node-7", gpus=(0,), submitted_ts=T0 + 2))
    assert await d.try_acquire()
    await d.tick()
    pin = await state(repo, "pin")
    assert (pin.state, pin.reason) == ("rejected", "rejected: node-1 has no GPU 9 (it has 8)")
    off = await state(repo, "pin-off")  # its GPU list may be stale: it may come back with GPU 5
    assert (off.state, off.reason) == (
        "pending",
        "pinned host node-2 is offline; waiting for it to come back",
    )
    assert (await state(repo, "pin-unknown")).state == "pending"
    assert agent.commands == []
    await d.stop()


async def test_a_job_only_an_offline_host_can_take_waits(
    repo: JobRepository, pg_dsn: str, bus: Bus, agent: Agent, model: SchedulerModel
) -> None:
    cands = [gpu("node-small", i) for i in range(4)]
    cands += [replace(gpu("node-big", i), state="offline") for i in range(8)]
    d = make(repo, pg_dsn, bus, cands, placer=Scheduler(model))
    await repo.submit(req("j8", num_gpus=8))
    await repo.submit(req("j9", num_gpus=9, submitted_ts=T0 + 1))
    assert await d.try_acquire()
    await d.tick()
    j8 = await state(repo, "j8")
    assert j8.state == "pending"
    assert j8.reason == "only node-big could take this job and it is offline; waiting for it to come back"
    assert (await state(repo, "j9")).state == "rejected"  # no host, online or not, has 9
    assert agent.commands == []
    await d.stop()


def test_the_fleet_candidates_include_offline_hosts() -> None:
    fleet = FleetState()
    now = time.time()

    def sample(i: int) -> GpuSample:
        return GpuSample(index=i, uuid=f"GPU-{i}", name="H100", state="ok", temp_c=40.0, mem_used_mib=0,
                         mem_total_mib=81559, power_limit_w=700.0)  # fmt: skip

    for host, seen in (("node-up", now), ("node-down", now - 3600)):
        fleet.ingest(Telemetry(v=1, host=host, boot="b", seq=0, ts=seen, state="active", interval_s=1.0,
                               gpus=[sample(0), sample(1)]), seen)  # fmt: skip
    got = {(c.host, c.index): c.state for c in fleet_candidates(fleet)()}
    assert got == {("node-up", 0): "ok", ("node-up", 1): "ok", ("node-down", 0): "offline",
                   ("node-down", 1): "offline"}  # fmt: skip
