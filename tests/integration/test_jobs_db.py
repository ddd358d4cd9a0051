"""Jobs in a real PostgreSQL: state machine, idempotent event application, decision record, CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from psycopg_pool import AsyncConnectionPool

from aether_desktop.cli import submit
from aether_desktop.services.job_placements import PlacementRows, PlacementStore, fleet_examples
from aether_desktop.services.jobs import JobRecord, JobRepository, JobWatcher
from aether_desktop.services.jobtypes import Decision, JobRequest, ScoredCandidate
from aether_protocol import PROTOCOL_VERSION, Event

pytestmark = pytest.mark.integration

T0 = 1_764_000_000.0


@pytest.fixture
async def repo(pg_dsn: str) -> AsyncIterator[JobRepository]:
    async with AsyncConnectionPool(pg_dsn, min_size=1, max_size=4, open=False) as pool:
        r = JobRepository(pool, clock=lambda: T0)
        await r.ensure_schema()
        yield r


def _req(job_id: str, **kw: Any) -> JobRequest:
    base: dict[str, Any] = {
        "id": job_id,
        "argv": ("python", "train.py"),
        "mem_mib": 8192.0,
        "submitted_ts": T0,
    }
    return JobRequest(**(base | kw))


def _event(kind: str, job_id: str, ev_id: str, ts: float, host: str = "node-1", **kw: Any) -> Event:
    return Event(v=PROTOCOL_VERSION, host=host, ts=ts, id=ev_id, kind=kind, job_id=job_id, **kw)  # type: ignore[arg-type]


async def _apply(repo: JobRepository, *events: Event) -> None:
    """Apply events the way the store does: inside one transaction of its own."""
    async with repo._pool.connection() as conn, conn.transaction():
        await repo.apply_events(conn, events)


def _place(host: str = "node-1", gpus: tuple[int, ...] = (0,)) -> Decision:
    cands = (
        ScoredCandidate(host, gpus, p_success=0.97, expected_slowdown=1.05, score=0.9, note="cool, free"),
        ScoredCandidate("node-2", (3,), p_success=0.6, expected_slowdown=1.4, score=0.3, note="hot"),
    )
    return Decision(
        "place", "best predicted outcome", host=host, gpus=gpus, p_success=0.97,
        expected_slowdown=1.05, candidates=cands, model_version="m3",
    )  # fmt: skip


async def _dispatched(repo: JobRepository, job_id: str) -> JobRecord:
    await repo.submit(_req(job_id))
    assert await repo.mark_dispatched(job_id, _place(), T0 + 1)
    rec = await repo.get(job_id)
    assert rec is not None
    return rec


async def test_submit_roundtrips_the_request(repo: JobRepository) -> None:
    req = _req(
        "j1", num_gpus=2, host="node-3", gpus=(0, 1), kind="inference", expected_s=5400.0, priority=7,
        deadline_ts=T0 + 9000, env={"EPOCHS": "3"}, cwd="/data",
    )  # fmt: skip
    await repo.submit(req, submitted_by="ana@ws")
    rec = await repo.get("j1")
    assert rec is not None
    assert rec.request == req
    assert rec.state == "pending" and rec.submitted_by == "ana@ws"
    assert [e["kind"] for e in await repo.history("j1")] == ["submitted"]


async def test_full_lifecycle_with_timestamps(repo: JobRepository) -> None:
    rec = await _dispatched(repo, "j1")
    assert rec.state == "dispatched" and rec.host == "node-1" and rec.gpus == (0,)
    assert rec.dispatched_ts == T0 + 1
    await _apply(repo, _event("job_started", "j1", "e1", T0 + 2, gpus=[0]))
    await _apply(repo, _event("job_finished", "j1", "e2", T0 + 12, gpus=[0], exit_code=0))
    done = await repo.get("j1")
    assert done is not None
    assert (done.state, done.started_ts, done.ended_ts, done.exit_code) == ("finished", T0 + 2, T0 + 12, 0)
    assert done.duration_s(T0 + 100) == 10.0
    states = [(e["kind"], e["from_state"], e["to_state"]) for e in await repo.history("j1")]
    assert states == [
        ("submitted", None, "pending"),
        ("dispatched", "pending", "dispatched"),
        ("job_started", "dispatched", "running"),
        ("job_finished", "running", "finished"),
    ]


async def test_same_event_twice_changes_nothing(repo: JobRepository) -> None:
    await _dispatched(repo, "j1")
    started = _event("job_started", "j1", "e1", T0 + 2)
    failed = _event("job_failed", "j1", "e2", T0 + 5, exit_code=137, detail="CUDA out of memory")
    await _apply(repo, started, failed)
    first = await repo.get("j1")
    history = await repo.history("j1")
    await _apply(repo, started, failed)  # a JetStream redelivery of the same batch
    await _apply(repo, failed)
    assert await repo.get("j1") == first
    assert await repo.history("j1") == history
    assert first is not None and first.state == "failed" and first.reason == "CUDA out of memory"
    assert first.exit_code == 137


async def test_finished_before_started_still_ends_finished(repo: JobRepository) -> None:
    await _dispatched(repo, "j1")
    await _apply(repo, _event("job_finished", "j1", "e2", T0 + 12, exit_code=0))
    await _apply(repo, _event("job_started", "j1", "e1", T0 + 2))
    rec = await repo.get("j1")
    assert rec is not None
    assert rec.state == "finished"
    assert (rec.started_ts, rec.ended_ts) == (T0 + 2, T0 + 12)  # the late start still fills its time


async def test_terminal_state_is_never_left(repo: JobRepository) -> None:
    await _dispatched(repo, "j1")
    assert await repo.mark_lost("j1", "no job_started from node-1 within 60s", T0 + 70)
    await _apply(
        repo,
        _event("job_started", "j1", "e1", T0 + 80),
        _event("job_finished", "j1", "e2", T0 + 90, exit_code=0),
    )
    assert not await repo.mark_rejected("j1", "too late", T0 + 95)
    rec = await repo.get("j1")
    assert rec is not None
    assert rec.state == "lost" and rec.reason == "no job_started from node-1 within 60s"
    assert rec.ended_ts == T0 + 70


async def test_events_from_another_host_or_for_unknown_jobs_are_ignored(repo: JobRepository) -> None:
    await _dispatched(repo, "j1")
    await _apply(repo, _event("job_finished", "j1", "e1", T0 + 5, host="node-9", exit_code=0))
    await _apply(repo, _event("job_finished", "nope", "e2", T0 + 5, exit_code=0))
    await _apply(repo, Event(v=1, host="node-1", ts=T0, id="e3", kind="xid", xid=79))
    rec = await repo.get("j1")
    assert rec is not None and rec.state == "dispatched"
    assert await repo.get("nope") is None


async def test_decision_record_and_wait_defer(repo: JobRepository) -> None:
    await repo.submit(_req("j1"))
    wait = Decision("wait", "no GPU has 8 GiB free", candidates=_place().candidates)
    assert await repo.record_decision("j1", wait, T0 + 1)
    assert not await repo.record_decision("j1", wait, T0 + 3)  # same reason: no new event
    rec = await repo.get("j1")
    assert rec is not None and rec.state == "pending" and rec.reason == "no GPU has 8 GiB free"
    defer = Decision("defer", "greener grid at 14:00", not_before_ts=T0 + 3600)
    assert await repo.record_decision("j1", defer, T0 + 5)
    assert [j.id for j in await repo.pending(T0 + 10)] == []  # deferred
    assert [j.id for j in await repo.pending(T0 + 3600)] == ["j1"]

    assert await repo.mark_dispatched("j1", _place(), T0 + 3600)
    rec = await repo.get("j1")
    assert rec is not None and rec.decision is not None
    d = rec.decision
    assert d["action"] == "place" and d["reason"] == "best predicted outcome" and d["model_version"] == "m3"
    assert [(c["host"], c["gpus"], c["score"]) for c in d["candidates"]] == [
        ("node-1", [0], 0.9),
        ("node-2", [3], 0.3),
    ]
    assert d["candidates"][0]["note"] == "cool, free" and d["candidates_total"] == 2
    assert rec.not_before_ts is None


async def test_reject_and_conditional_transitions(repo: JobRepository) -> None:
    await repo.submit(_req("j1"))
    assert await repo.mark_rejected("j1", "needs 9 GPUs; the largest host has 8", T0 + 1)
    assert not await repo.mark_dispatched("j1", _place(), T0 + 2)
    rec = await repo.get("j1")
    assert (
        rec is not None and rec.state == "rejected" and rec.reason == "needs 9 GPUs; the largest host has 8"
    )
    # A job the agent already reported running is not "lost" because a reply went missing.
    await _dispatched(repo, "j2")
    await _apply(repo, _event("job_started", "j2", "e1", T0 + 2))
    assert not await repo.mark_lost("j2", "timeout", T0 + 3)


async def test_queue_order_and_queries(repo: JobRepository) -> None:
    await repo.submit(_req("old-low", submitted_ts=T0))
    await repo.submit(_req("new-high", submitted_ts=T0 + 5, priority=5))
    await repo.submit(_req("new-low", submitted_ts=T0 + 9))
    assert [j.id for j in await repo.pending(T0 + 10)] == ["new-high", "old-low", "new-low"]
    assert [j.id for j in await repo.list_jobs()] == ["new-low", "new-high", "old-low"]
    assert await repo.mark_dispatched("old-low", _place(), T0 + 10)
    assert [j.id for j in await repo.overdue_dispatched(T0 + 11)] == ["old-low"]
    assert [j.id for j in await repo.overdue_dispatched(T0 + 10)] == []
    assert [j.id for j in await repo.list_jobs(states=["dispatched"])] == ["old-low"]


async def test_cancel_pending_and_running(repo: JobRepository) -> None:
    await repo.submit(_req("j1"))
    rec = await repo.cancel("j1", T0 + 1, by="ana")
    assert rec is not None and rec.state == "cancelled" and rec.reason == "cancelled by ana"
    await _dispatched(repo, "j2")
    rec = await repo.cancel("j2", T0 + 2)
    assert rec is not None and rec.state == "dispatched" and rec.cancel_requested_ts == T0 + 2
    await _apply(repo, _event("job_cancelled", "j2", "e1", T0 + 3, detail="terminated by request"))
    rec = await repo.get("j2")
    assert rec is not None and rec.state == "cancelled" and rec.ended_ts == T0 + 3
    assert await repo.cancel("missing", T0) is None


async def test_resubmit_copies_the_request_with_a_new_id(repo: JobRepository) -> None:
    await repo.submit(_req("j1", env={"A": "1"}, priority=3))
    await repo.mark_rejected("j1", "no", T0 + 1)
    new = await repo.resubmit("j1")
    assert new.id != "j1" and new.state == "pending" and new.resubmit_of == "j1"
    stored = await repo.get(new.id)
    assert stored is not None
    assert stored.request.argv == ("python", "train.py") and stored.request.env == {"A": "1"}
    assert stored.request.priority == 3
    with pytest.raises(KeyError):
        await repo.resubmit("missing")


async def test_watcher_sees_changes_from_another_connection(repo: JobRepository, pg_dsn: str) -> None:
    seen: asyncio.Queue[frozenset[str]] = asyncio.Queue()
    watcher = JobWatcher(pg_dsn, seen.put_nowait)
    watcher.start()
    try:
        assert await asyncio.wait_for(seen.get(), 10) == frozenset()  # connected: reload all
        await repo.submit(_req("j1"))
        assert await asyncio.wait_for(seen.get(), 10) == frozenset({"j1"})
    finally:
        await watcher.stop()


# --------------------------------------------------------------------------- aether submit


def test_cli_submit_writes_a_pending_job(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = submit.main(
        ["--db", pg_dsn, "--gpus", "2", "--mem", "8G", "--kind", "inference", "--expected", "1h",
         "--priority", "4", "--env", "EPOCHS=3", "--cwd", "/data", "--", "python", "train.py", "--epochs", "3"]
    )  # fmt: skip
    out = capsys.readouterr().out.strip()
    assert rc == 0 and out.startswith("job-")

    async def check() -> JobRecord | None:
        async with AsyncConnectionPool(pg_dsn, min_size=1, max_size=1) as pool:
            return await JobRepository(pool).get(out)

    rec = asyncio.run(check())
    assert rec is not None and rec.state == "pending"
    r = rec.request
    assert r.argv == ("python", "train.py", "--epochs", "3") and r.num_gpus == 2 and r.mem_mib == 8192
    assert (r.kind, r.expected_s, r.priority, r.env, r.cwd) == (
        "inference",
        3600,
        4,
        {"EPOCHS": "3"},
        "/data",
    )


def test_cli_submit_rejects_invalid_input(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = submit.main(["--db", pg_dsn, "--mem", "lots", "--expected", "soon", "--", "python", "x.py"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--mem" in err and "--expected" in err
    assert submit.main(["--db", pg_dsn, "--gpus", "1"]) == 2  # no command
    assert "command" in capsys.readouterr().err


async def test_store_hook_applies_job_events_once(pg_dsn: str) -> None:
    """The real path: events written by the Store run the hook inside its transaction."""
    from aether_desktop.services.store import Store

    store = Store(pg_dsn)
    await store.open()
    try:
        repo = JobRepository(store.pool)
        store.add_event_hook(repo.apply_events)
        await repo.submit(_req("j1"))
        assert await repo.mark_dispatched("j1", _place(), T0 + 1)
        batch = [
            _event("job_started", "j1", "e1", T0 + 2),
            _event("job_finished", "j1", "e2", T0 + 9, exit_code=0),
        ]
        await store.write_batch([], batch)
        await store.write_batch([], batch)  # redelivered by JetStream
        rec = await repo.get("j1")
        assert rec is not None and (rec.state, rec.started_ts, rec.ended_ts) == ("finished", T0 + 2, T0 + 9)
        assert [e["kind"] for e in await repo.history("j1")] == ["submitted", "dispatched", "job_started",
                                                                "job_finished"]  # fmt: skip
    finally:
        await store.close()


async def test_cli_wait_follows_the_job_to_its_end(
    repo: JobRepository, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--db", pg_dsn, "--wait", "--poll", "0.05", "--", "python", "train.py"]
    cli = asyncio.ensure_future(asyncio.to_thread(submit.main, args))
    pending: list[JobRecord] = []
    while not pending:  # the CLI has stored its job
        assert not cli.done(), cli.result()
        pending = await repo.pending(T0 + 10**9)
        await asyncio.sleep(0.02)
    job_id = pending[0].id
    assert await repo.mark_dispatched(job_id, _place(), T0 + 1)
    await _apply(repo, _event("job_started", job_id, "e1", T0 + 2))
    await _apply(repo, _event("job_failed", job_id, "e2", T0 + 3, exit_code=3, detail="exit code 3"))
    assert await asyncio.wait_for(cli, 30) == 1  # ended, but not finished
    out = capsys.readouterr().out.splitlines()
    assert out[0] == job_id
    assert out[-1].endswith(f"{job_id} failed on node-1:0 (exit 3): exit code 3")


# --------------------------------------------------------------------------- placements (retraining data)


def _rows(n_gpus: int, first: float = 1.0) -> PlacementRows:
    names = ("temp_c", "gpu_model")
    # NaN is what an unknown GPU model becomes; the array column must keep it.
    return PlacementRows(names, [[first + i, float("nan")] for i in range(n_gpus)])


async def test_placement_rows_are_stored_with_the_dispatch_and_read_back_with_the_outcome(
    repo: JobRepository,
) -> None:
    store = PlacementStore(repo._pool)
    await repo.submit(_req("ok", expected_s=100.0))
    await repo.submit(_req("oom"))
    await repo.submit(_req("plain"))  # dispatched without rows (e.g. a fake placer): no placement row
    assert await repo.mark_dispatched("ok", _place(), T0 + 1, features=_rows(1, 40.0))
    assert await repo.mark_dispatched("oom", _place(gpus=(1, 2)), T0 + 1, features=_rows(2))
    assert await repo.mark_dispatched("plain", _place(), T0 + 1)
    # A second dispatch of the same job is refused, and so is a second placement row.
    assert not await repo.mark_dispatched("ok", _place(), T0 + 2, features=_rows(1, 99.0))
    assert await store.outcomes() == [] and await store.count_ended_since(T0) == 0

    await _apply(
        repo,
        _event("job_started", "ok", "e1", T0 + 10),
        _event("job_finished", "ok", "e2", T0 + 130, exit_code=0),
        _event("job_started", "oom", "e3", T0 + 10),
        _event("job_failed", "oom", "e4", T0 + 20, exit_code=1, detail="CUDA out of memory on GPU 2"),
        _event("job_finished", "plain", "e5", T0 + 20, exit_code=0),
    )
    got = {o.job_id: o for o in await store.outcomes()}
    assert set(got) == {"ok", "oom"}
    ok, oom = got["ok"], got["oom"]
    assert (ok.state, ok.gpus, ok.expected_s, ok.names) == ("finished", (0,), 100.0, ("temp_c", "gpu_model"))
    assert ok.features[0, 0] == 40.0 and np.isnan(ok.features[0, 1])
    assert (ok.started_ts, ok.ended_ts, ok.expected_slowdown) == (T0 + 10, T0 + 130, 1.05)
    assert (
        oom.state == "failed" and oom.reason == "CUDA out of memory on GPU 2" and oom.features.shape == (2, 2)
    )
    assert await store.count_ended_since(T0) == 2 and await store.count_ended_since(T0 + 20) == 1
    ex = fleet_examples(list(got.values()), ("temp_c", "gpu_model"))
    assert sorted(ex.success.tolist()) == [0.0, 1.0] and ex.slowdown.max() == pytest.approx(1.2)


async def test_mark_lost_from_running_only_when_asked(repo: JobRepository) -> None:
    await _dispatched(repo, "j1")
    await _apply(repo, _event("job_started", "j1", "e1", T0 + 2))
    assert not await repo.mark_lost("j1", "start timeout", T0 + 3)  # running: the default leaves it alone
    assert await repo.mark_lost(
        "j1", "host node-1 stopped reporting", T0 + 4, only_from=("dispatched", "running")
    )
    rec = await repo.get("j1")
    assert rec is not None and (rec.state, rec.reason, rec.ended_ts) == (
        "lost",
        "host node-1 stopped reporting",
        T0 + 4,
    )
    # The host comes back and reports the job finished: lost stays lost.
    await _apply(repo, _event("job_finished", "j1", "e2", T0 + 5, exit_code=0))
    assert (await repo.get("j1")).state == "lost"  # type: ignore[union-attr]


def _agent_started(ev_id: str, ts: float, host: str = "node-1") -> Event:
    return Event(
        v=PROTOCOL_VERSION, host=host, ts=ts, id=ev_id, kind="agent_started", detail="2 GPU(s), boot b2"
    )


async def test_an_agent_restart_loses_the_jobs_its_earlier_run_had(repo: JobRepository) -> None:
    await _dispatched(repo, "old-run")  # dispatched at T0 + 1
    await _dispatched(repo, "old-sent")
    await _dispatched(repo, "done")
    await repo.submit(_req("elsewhere"))
    assert await repo.mark_dispatched("elsewhere", _place("node-2"), T0 + 1)
    await _apply(
        repo, _event("job_started", "old-run", "s1", T0 + 2), _event("job_started", "done", "s2", T0 + 2)
    )
    await repo.submit(_req("new"))
    assert await repo.mark_dispatched("new", _place(), T0 + 30)  # after the restart below
    # One batch, out of order: the old run's last report, the restart, the new run's first job.
    await _apply(
        repo,
        _event("job_started", "new", "s3", T0 + 31),
        _agent_started("boot-2", T0 + 20),
        _event("job_finished", "done", "f2", T0 + 10, exit_code=0),
    )
    got = {j: await repo.get(j) for j in ("old-run", "old-sent", "done", "elsewhere", "new")}
    assert {j: r.state for j, r in got.items() if r is not None} == {
        "old-run": "lost", "old-sent": "lost", "done": "finished", "elsewhere": "dispatched", "new": "running",
    }  # fmt: skip
    old = got["old-run"]
    assert old is not None and old.ended_ts == T0 + 20
    assert old.reason == "the agent on node-1 restarted while the job was running; the job ended with it"
    assert [e["kind"] for e in await repo.history("old-sent")][-1] == "agent_restarted"
    # A late copy of an earlier start (JetStream redelivery, a station catching up) ends nothing newer.
    await _apply(repo, _agent_started("boot-1", T0 + 5))
    await _apply(repo, _agent_started("boot-2", T0 + 20))
    rec = await repo.get("new")
    assert rec is not None and rec.state == "running"


async def test_a_note_changes_the_reason_until_the_job_runs(repo: JobRepository) -> None:
    await _dispatched(repo, "j1")
    why = "no reply from node-1; waiting for the job to start"
    assert await repo.note("j1", why, T0 + 2, only_from=("dispatched",))
    assert not await repo.note("j1", why, T0 + 3, only_from=("dispatched",))  # unchanged: not news
    assert not await repo.note("j1", "other", T0 + 3, only_from=("pending",))
    rec = await repo.get("j1")
    assert rec is not None and (rec.state, rec.reason) == ("dispatched", why)
    await _apply(repo, _event("job_started", "j1", "e1", T0 + 4))
    rec = await repo.get("j1")
    assert rec is not None and (rec.state, rec.reason) == ("running", "best predicted outcome")


async def test_resubmit_drops_a_deadline_that_can_no_longer_be_met(repo: JobRepository) -> None:
    await repo.submit(_req("past", deadline_ts=T0 - 60))
    await repo.submit(_req("near", deadline_ts=T0 + 60, expected_s=600.0))
    await repo.submit(_req("later", deadline_ts=T0 + 7200, expected_s=600.0))
    got = {}
    for job_id in ("past", "near", "later"):
        new = await repo.resubmit(job_id)
        stored = await repo.get(new.id)
        assert stored is not None
        got[job_id] = stored.request.deadline_ts
    assert got == {"past": None, "near": None, "later": T0 + 7200}
