"""Jobs through the whole station: real nats-server, real PostgreSQL, a real simulated agent process.

The job's events travel agent -> NATS -> JetStream -> the station's store -> the jobs
table, exactly as in production; liveness comes from the station's own fleet view.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aether_desktop.config import StationConfig
from aether_desktop.services.jobs import JobRecord
from aether_desktop.services.jobtypes import JobRequest
from aether_desktop.services.placement_retrain import RetrainPolicy
from aether_desktop.services.scheduler_model import ModelStore, generate_training_data, train
from aether_desktop.station import Station
from aether_desktop.wiring import JobsRuntime, wire_services
from tests.integration.agent_proc import start_agent, stop_agent
from tests.integration.test_station import Sink

pytestmark = pytest.mark.integration


async def until(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout:.0f} s")


def job(job_id: str, expected_s: float) -> JobRequest:
    return JobRequest(id=job_id, argv=("python", "train.py"), mem_mib=4096.0, expected_s=expected_s,
                      submitted_ts=time.time())  # fmt: skip


async def test_a_job_runs_finishes_trains_the_model_and_a_dead_host_loses_its_job(
    nats_url: str, pg_dsn: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    # A small ready-made model: the first start would otherwise train the full one (seconds).
    ModelStore(data / "models").save(train(generate_training_data(n_jobs=400, seed=0, fleets=1), rounds=10))
    station = Station(StationConfig(nats_servers=(nats_url,), db_dsn=pg_dsn, data_dir=data), Sink())
    jobs: JobsRuntime = wire_services(station)["jobs"]
    jobs.host_grace_s = 3.0
    models: list[dict[str, Any]] = []
    jobs.model_listeners.append(models.append)
    await station.start()
    agent = start_agent(nats_url, "sim-01", "--simulate", "2", "--interval", "0.5", "--allow-jobs",
                        "--allow-cmd", "python", "--job-log-dir", str(tmp_path / "jobs"),
                        log=tmp_path / "agent.log")  # fmt: skip
    try:
        await until(
            lambda: jobs.retrainer is not None and station.fleet.n_slots == 2
            and station.fleet.host_online("sim-01", time.time()),
            what="station and agent up",
        )
        jobs.retrainer.policy = RetrainPolicy(sim_jobs=400)
        assert [m["version"] for m in models] == [1]

        # The idle host is put to sleep: the job still runs, the dispatcher wakes a GPU for it.
        assert station.bus is not None
        ok, text = await station.bus.send("sim-01", "sleep")
        assert ok, text
        await until(lambda: {r.state for r in station.fleet.rows(time.time())} == {"sleeping"},
                    what="both GPUs sleeping")  # fmt: skip
        await jobs.submit(job("j-ok", 2.0))

        async def ended(job_id: str) -> JobRecord | None:
            rec = await jobs.repo.get(job_id)
            return rec if rec is not None and rec.terminal else None

        rec = await until(lambda: ended("j-ok"), what="j-ok ends")
        assert rec.state == "finished" and rec.host == "sim-01" and rec.exit_code == 0
        assert (
            rec.started_ts is not None and rec.ended_ts is not None and rec.ended_ts - rec.started_ts >= 1.5
        )
        assert rec.decision is not None and rec.decision["reason"].startswith("placed on sim-01")

        # The operator's button: the finished job is training data for version 2, used at once.
        summary = await jobs.retrain_model()
        assert summary.startswith("Placement model v2") and "1 from 1 fleet jobs" in summary
        assert jobs.scheduler.model.version == "v2" and [m["version"] for m in models] == [1, 2]

        await jobs.submit(job("j-long", 600.0))
        rec = await until(lambda: _running(jobs, "j-long"), what="j-long runs")
        assert rec.decision["model_version"] == "v2"
        agent.kill()  # the host dies with its job
        agent.wait(10)
        rec = await until(lambda: ended("j-long"), timeout=30, what="j-long lost")
        assert rec.state == "lost" and rec.reason is not None and "sim-01 stopped reporting" in rec.reason
    finally:
        stop_agent(agent)
        await station.stop()


async def _running(jobs: JobsRuntime, job_id: str) -> JobRecord | None:
    rec = await jobs.repo.get(job_id)
    return rec if rec is not None and rec.state == "running" else None
