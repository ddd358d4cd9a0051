"""The agent's failure paths, without a network: fakes stand in for the NATS client and the GPUs.

Each test pins a bug found in review: a sender that died on one unexpected
client error, a stream rejection retried as a full window forever, a shutdown
that sent its last messages twice, a reconnect task nobody cancelled, ...
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from aether_protocol import GpuSample, JobSpec, decode_reply, decode_telemetry
from aether_protocol.connection import NatsSettings
from headless_agent import agent as agent_mod
from headless_agent.agent import Agent, AgentConfig
from headless_agent.backend import BackendError
from headless_agent.commands import CommandHandler
from headless_agent.jobs import JobPolicy, ProcessJobRunner, check_job, job_environment
from headless_agent.nvml import NvmlBackend
from headless_agent.outbox import Outbox, Outgoing, PublishFailed
from headless_agent.simulate import SimulatedBackend
from tests.unit.fake_pynvml import FakeGpu, FakeNvml


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


class FakeJs:
    def __init__(self, answer: Callable[[], Awaitable[str]]) -> None:
        self.answer = answer

    async def find_stream_name_by_subject(self, subject: str) -> str:
        return await self.answer()


async def no_stream() -> str:
    raise NotFoundError()


class FakeNc:
    """Just enough of nats.aio.client.Client for the agent."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []
        self.is_connected = True
        self.is_closed = False
        self.find: Callable[[], Awaitable[str]] = no_stream
        self.publish_error: Callable[[bytes], Exception | None] = lambda payload: None

    def jetstream(self) -> FakeJs:
        return FakeJs(self.find)

    async def subscribe(self, subject: str, cb: Any = None) -> None:
        self.subscribed.append(subject)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        await asyncio.sleep(0)  # a real client yields here: lets a concurrent drain interleave
        exc = self.publish_error(payload)
        if exc is not None:
            raise exc
        self.published.append((subject, payload))

    async def drain(self) -> None:
        self.is_closed, self.is_connected = True, False

    async def close(self) -> None:
        self.is_closed, self.is_connected = True, False


def make_agent(backend: Any = None, interval: float = 0.01) -> Agent:
    cfg = AgentConfig(host="h1", nats=NatsSettings(), interval_s=interval)
    return Agent(cfg, backend if backend is not None else SimulatedBackend(1, seed=1, background_load=False))


def connected(agent: Agent, nc: FakeNc) -> None:
    agent.nc = nc  # type: ignore[assignment]
    agent._connected.set()


# ------------------------------------------------------------------ send loop and outbox

async def test_sender_survives_a_client_error_it_does_not_expect() -> None:
    # One message over the server's max payload used to raise MaxPayloadError out of the send loop,
    # ending publishing for the rest of the agent's life while ticks went on filling the buffer.
    agent, nc = make_agent(), FakeNc()
    nc.publish_error = lambda p: nats.errors.MaxPayloadError() if p == b"huge" else None
    connected(agent, nc)
    sender = asyncio.ensure_future(agent._send_loop())
    try:
        agent.outbox.put(Outgoing("aether.telemetry.h1", b"huge", "m0"))
        agent.outbox.put(Outgoing("aether.telemetry.h1", b"after", "m1"))
        assert await until(lambda: (("aether.telemetry.h1", b"after") in nc.published))
        agent.outbox.put(Outgoing("aether.telemetry.h1", b"later", "m2"))
        assert await until(lambda: (("aether.telemetry.h1", b"later") in nc.published))
        assert not sender.done()
        assert len(agent.outbox) == 0
    finally:
        sender.cancel()


async def test_a_rejecting_stream_is_probed_one_message_at_a_time_and_order_holds() -> None:
    box = Outbox()
    for i in range(10):
        box.put(Outgoing("s", str(i).encode(), f"m{i}"))
    attempts: list[bytes] = []
    sent: list[bytes] = []
    full = {"on": True}

    async def publish(item: Outgoing) -> None:
        attempts.append(item.payload)
        if full["on"]:
            raise PublishFailed("stream refused the message: maximum bytes exceeded")
        sent.append(item.payload)

    assert await box.drain(publish) is False
    assert box.failures == 1 and "maximum bytes" in (box.last_error or "")
    attempts.clear()
    for _ in range(3):
        assert await box.drain(publish) is False
    assert attempts == [b"0"] * 3  # one probe per attempt, not a window of ten
    assert box.backoff_s() > 0.5 and box.backoff_s() <= 10.0
    full["on"] = False
    assert await box.drain(publish) is True
    assert sent == [str(i).encode() for i in range(10)] and box.failures == 0 and len(box) == 0


def test_jetstream_ack_errors_are_recognised_in_any_field_order() -> None:
    from headless_agent.agent import _ack_error

    assert _ack_error(b'{"stream":"T","seq":3}') is None
    assert _ack_error(b'{"stream":"T","seq":3,"duplicate": true}') is None
    err = b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},"stream":"T","seq":0}'
    assert "maximum messages exceeded" in (_ack_error(err) or "")
    later = b'{"stream":"T","seq":0,"error":{"code":503,"err_code":10047,"description":"maximum bytes exceeded"}}'
    assert "maximum bytes exceeded" in (_ack_error(later) or "")
    assert _ack_error(b"not json") is not None


async def test_stored_subjects_stay_acked_when_jetstream_does_not_answer() -> None:
    # Right after a NATS restart JetStream may time out while it loads its streams; taking that as
    # "no stream" switched the agent to un-acked publishing and the replayed backlog could vanish.
    agent, nc = make_agent(), FakeNc()
    connected(agent, nc)

    async def found() -> str:
        return "AETHER_TELEMETRY"

    nc.find = found
    await agent._refresh_stored()
    assert agent._stored["aether.telemetry.h1"] is True

    async def timeout() -> str:
        raise nats.errors.TimeoutError()

    nc.find = timeout
    await agent._on_reconnected()  # forces a fresh check
    await agent._refresh_stored()
    assert agent._stored["aether.telemetry.h1"] is True
    nc.find = no_stream
    await agent._on_reconnected()
    await agent._refresh_stored()
    assert agent._stored["aether.telemetry.h1"] is False  # a real "no stream" still counts


# ------------------------------------------------------------------ lifecycle

async def run_briefly(agent: Agent, monkeypatch: pytest.MonkeyPatch, connects: list[Any],
                      until_pred: Callable[[], bool]) -> None:
    """Run the whole agent with ``nats.connect`` answered from ``connects`` (an nc or an Event to hang on)."""

    async def fake_connect(**kw: Any) -> Any:
        item = connects.pop(0)
        if isinstance(item, asyncio.Event):
            await item.wait()
        return item

    monkeypatch.setattr(agent_mod.nats, "connect", fake_connect)
    task = asyncio.ensure_future(agent.run())
    assert await until(until_pred)
    agent.stop()
    await asyncio.wait_for(task, 10)


async def test_shutdown_sends_each_buffered_message_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The send loop and the shutdown used to drain the outbox at the same time: the last messages
    # (agent_stopping among them) went out twice.
    agent, nc = make_agent(), FakeNc()
    await run_briefly(agent, monkeypatch, [nc], lambda: len(nc.published) >= 5)
    ids = [json.loads(p).get("id") or json.loads(p)["seq"] for _, p in nc.published]
    assert len(ids) == len(set(ids)), "a message was sent twice"
    assert json.loads(nc.published[-1][1])["kind"] == "agent_stopping"
    assert nc.is_closed


async def test_reconnect_from_scratch_resubscribes_and_is_cancelled_at_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    agent, first, second, hang = make_agent(), FakeNc(), FakeNc(), asyncio.Event()
    connects: list[Any] = [first, second, hang]

    async def fake_connect(**kw: Any) -> Any:
        item = connects.pop(0)
        if isinstance(item, asyncio.Event):
            await item.wait()  # NATS does not come back
        return item

    monkeypatch.setattr(agent_mod.nats, "connect", fake_connect)
    task = asyncio.ensure_future(agent.run())
    assert await until(lambda: agent.nc is first and first.subscribed == ["aether.cmd.h1"])
    # A closed connection: the agent starts over and listens for commands on the new one.
    await agent._on_closed()
    assert await until(lambda: agent.nc is second and second.subscribed == ["aether.cmd.h1"])
    # Closed again, and the next connect hangs: a stop must still end that reconnect attempt.
    await agent._on_closed()
    assert await until(lambda: not connects)
    agent.stop()
    await asyncio.wait_for(task, 10)
    pending = [t for t in asyncio.all_tasks() if "_connect_forever" in repr(t.get_coro()) and not t.done()]
    assert not pending, "a reconnect task outlived the agent"


class PollFails(SimulatedBackend):
    def poll_jobs(self, now: float) -> list[Any]:
        raise RuntimeError("bug in poll")


async def test_tick_loop_survives_a_failing_job_poll() -> None:
    agent = make_agent(PollFails(1, seed=1, background_load=False))
    task = asyncio.ensure_future(agent._tick_loop())
    assert await until(lambda: agent.seq >= 3 or task.done())
    agent.stop()
    await asyncio.wait_for(task, 5)  # raises if the loop died


class NoGpus(SimulatedBackend):
    def __init__(self) -> None:
        super().__init__(0)


async def test_a_host_without_gpus_still_sends_its_heartbeat() -> None:
    agent = make_agent(NoGpus())
    task = asyncio.ensure_future(agent._tick_loop())
    assert await until(lambda: agent.seq >= 2)
    agent.stop()
    await task
    msgs = [decode_telemetry(o.payload) for o in agent.outbox._telemetry]
    assert msgs and msgs[0].gpus == []


class ReadFails(SimulatedBackend):
    def read(self, now: float) -> list[GpuSample]:
        raise RuntimeError("driver bug")


async def test_read_failures_are_logged_once_not_every_tick(caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(ReadFails(1))
    calls = {"n": 0}
    orig = agent.backend.read

    def counting(now: float) -> list[GpuSample]:
        calls["n"] += 1
        return orig(now)

    agent.backend.read = counting  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="aether.agent"):
        task = asyncio.ensure_future(agent._tick_loop())
        assert await until(lambda: calls["n"] >= 5)
        agent.stop()
        await task
    assert sum("reading the GPUs failed" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------ commands

class Broken(SimulatedBackend):
    def set_power_limit(self, gpus: Any, watts: float) -> None:
        raise KeyError("unexpected")


def handler_for(backend: Any, runner: ProcessJobRunner | None = None,
                events: list[tuple[str, dict[str, Any]]] | None = None) -> CommandHandler:
    sink = events if events is not None else []
    return CommandHandler(backend, runner, JobPolicy(allow_jobs=True, allowed_commands=("python",)),
                          lambda kind, **f: sink.append((kind, f)), lambda: {}, lambda: 1000.0)


async def test_an_unexpected_backend_error_still_gets_an_answer() -> None:
    h = handler_for(Broken(2, seed=1))
    rep = decode_reply(await h.handle(b'{"v":1,"id":"c9","op":"set_power_limit","gpus":[0],"watts":300}'))
    assert rep.id == "c9" and not rep.ok and "KeyError" in (rep.error or "")


async def test_partial_sleep_reports_the_gpus_that_did_sleep(tmp_path: Path) -> None:
    fake = FakeNvml([FakeGpu(uuid=f"GPU-{i}") for i in range(3)])
    backend = NvmlBackend(fake, read_timeout_s=0.2, control_timeout_s=2.0, proc_root=tmp_path)
    try:
        fake.gpus[1].faults["nvmlDeviceSetPowerManagementLimit"] = 4  # NVML_ERROR_NO_PERMISSION
        events: list[tuple[str, dict[str, Any]]] = []
        h = handler_for(backend, events=events)
        rep = decode_reply(await h.handle(b'{"v":1,"id":"c1","op":"sleep","gpus":[0,1,2]}'))
        assert not rep.ok and "root" in (rep.error or "")
        assert [s.state for s in backend.read(0.0)] == ["sleeping", "ok", "sleeping"]
        assert [(k, f["gpus"]) for k, f in events] == [("sleep", [0, 2])]
    finally:
        fake.release.set()
        backend.close()


async def test_sleep_every_gpu_skips_a_lost_one(tmp_path: Path) -> None:
    fake = FakeNvml([FakeGpu(uuid=f"GPU-{i}") for i in range(3)])
    backend = NvmlBackend(fake, read_timeout_s=0.2, control_timeout_s=2.0, fail_threshold=1, proc_root=tmp_path)
    try:
        fake.gpus[2].lost = True
        backend.read(0.0)
        backend.sleep(None)  # "every GPU" means every GPU that answers, as on a simulated host
        assert [s.state for s in backend.read(0.0)] == ["sleeping", "sleeping", "lost"]
        with pytest.raises(BackendError, match="GPU 2 is lost"):
            backend.sleep([2])
    finally:
        fake.release.set()
        backend.close()


async def test_job_log_reply_fits_the_message_limit_for_binary_output(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=("python",), log_dir=tmp_path)
    (tmp_path / "j1.log").write_bytes(b"start\n" + b"\x00\x01" * 200_000 + b"\nthe end\n")
    h = handler_for(SimulatedBackend(1), ProcessJobRunner(policy, 1))
    raw = await h.handle(b'{"v":1,"id":"c1","op":"job_log","job_id":"j1","max_bytes":262144}')
    assert len(raw) <= h.max_reply_bytes
    rep = decode_reply(raw)
    assert rep.ok and rep.data is not None and str(rep.data["log"]).endswith("the end\n")


# ------------------------------------------------------------------ jobs

def job(**kw: Any) -> JobSpec:
    return JobSpec(id=str(kw.pop("id", "j1")), argv=kw.pop("argv", [sys.executable, "-c", "pass"]), gpus=[0], **kw)


def policy(tmp_path: Path) -> JobPolicy:
    return JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path / "jobs")


async def test_unwritable_log_dir_is_a_clear_refusal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    p = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path / "file" / "jobs")
    with pytest.raises(BackendError, match="cannot write the job log"):
        await ProcessJobRunner(p, 1).start(job())


async def test_nul_bytes_and_relative_cwd_are_refused(tmp_path: Path) -> None:
    runner = ProcessJobRunner(policy(tmp_path), 1)
    with pytest.raises(BackendError, match="NUL"):
        await runner.start(job(env={"A": "x\0y"}))
    with pytest.raises(BackendError, match="absolute"):
        check_job(job(cwd="."), policy(tmp_path), 1)


async def test_planted_log_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "j1.log").symlink_to(victim)
    with pytest.raises(BackendError, match="cannot write the job log"):
        await ProcessJobRunner(policy(tmp_path), 1).start(job(argv=[sys.executable, "-c", "print('x')"]))
    assert victim.read_text() == "precious\n"


def test_jobs_do_not_inherit_the_agents_nats_secrets() -> None:
    env = job_environment(job(), base={"HOME": "/root", "AETHER_NATS_PASSWORD": "s3cret", "AETHER_NATS": "x"})
    assert "AETHER_NATS_PASSWORD" not in env and "AETHER_NATS" not in env and env["HOME"] == "/root"


class FakeMsg:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = json.dumps(data).encode()
        self.reply = "_INBOX.x"
        self.answers: list[Any] = []

    async def respond(self, payload: bytes) -> None:
        self.answers.append(decode_reply(payload))


def agent_with_a_hanging_sleep() -> tuple[Agent, threading.Event]:
    """An agent whose NVML sleep call hangs (a sick GPU) until the event is set."""
    backend = SimulatedBackend(2, seed=1, background_load=False)
    backend.read(1000.0)
    release = threading.Event()
    backend.sleep = lambda gpus: release.wait(10)  # type: ignore[method-assign]
    return make_agent(backend), release


async def test_commands_are_answered_concurrently_and_a_flood_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "MAX_COMMANDS_IN_FLIGHT", 2)
    agent, release = agent_with_a_hanging_sleep()
    sleep = FakeMsg({"v": 1, "id": "s", "op": "sleep", "gpus": [0]})
    ping = FakeMsg({"v": 1, "id": "p", "op": "ping"})
    extra = FakeMsg({"v": 1, "id": "x", "op": "wake", "gpus": [0]})
    # The subscription callback returns at once; nats-py would otherwise hold the next message.
    await asyncio.wait_for(agent._on_command(sleep), 1)  # type: ignore[arg-type]
    await asyncio.wait_for(agent._on_command(ping), 1)  # type: ignore[arg-type]
    assert await until(lambda: bool(ping.answers))
    assert ping.answers[0].ok and ping.answers[0].data["host"] == "h1" and not sleep.answers
    # Two in flight would be the limit: with the sleep and one more held, the next is refused.
    held = FakeMsg({"v": 1, "id": "w", "op": "wake", "gpus": [1]})
    await agent._on_command(held)  # type: ignore[arg-type]
    await agent._on_command(extra)  # type: ignore[arg-type]
    assert extra.answers and not extra.answers[0].ok and "busy" in (extra.answers[0].error or "")
    # Queries are never refused: they wait on nothing.
    ping2 = FakeMsg({"v": 1, "id": "p2", "op": "ping"})
    await agent._on_command(ping2)  # type: ignore[arg-type]
    assert await until(lambda: bool(ping2.answers)) and ping2.answers[0].ok
    release.set()
    assert await until(lambda: bool(sleep.answers) and bool(held.answers))
    assert sleep.answers[0].ok and held.answers[0].ok


async def test_a_stopping_agent_refuses_control_commands_also_queued_ones() -> None:
    agent, release = agent_with_a_hanging_sleep()
    sleep = FakeMsg({"v": 1, "id": "s", "op": "sleep", "gpus": [0]})
    queued = FakeMsg({"v": 1, "id": "w", "op": "wake", "gpus": [1]})
    await agent._on_command(sleep)  # type: ignore[arg-type]
    await agent._on_command(queued)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    agent.commands.stopping = True  # what _shutdown does first
    late = FakeMsg({"v": 1, "id": "j", "op": "wake", "gpus": [0]})
    await agent._on_command(late)  # type: ignore[arg-type]
    ping = FakeMsg({"v": 1, "id": "p", "op": "ping"})
    await agent._on_command(ping)  # type: ignore[arg-type]
    assert await until(lambda: bool(late.answers) and bool(ping.answers))
    assert not late.answers[0].ok and "stopping" in (late.answers[0].error or "") and ping.answers[0].ok
    release.set()
    assert await until(lambda: bool(sleep.answers) and bool(queued.answers))
    assert sleep.answers[0].ok  # it was already running
    assert not queued.answers[0].ok and "stopping" in (queued.answers[0].error or "")
