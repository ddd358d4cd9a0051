"""Real nats-server, real agent processes: telemetry, commands, buffering across a NATS restart, jobs."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import nats
import pytest

from aether_desktop.services.bus import Bus, build_command
from aether_protocol import Event, Telemetry, decode_telemetry
from aether_protocol.connection import NatsSettings
from tests.integration.agent_proc import start_agent, stop_agent

pytestmark = pytest.mark.integration


async def wait_for(pred, timeout: float = 30.0, step: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return bool(pred())


async def test_agent_publishes_and_answers_commands(nats_url: str, tmp_path: Path) -> None:
    got: list[Telemetry] = []
    events: list[Event] = []
    bus = Bus(NatsSettings(servers=(nats_url,)), on_telemetry=lambda m, t: got.append(m), on_event=events.append)
    await bus.start(wait=10)
    agent = start_agent(nats_url, "it-host-1", "--simulate", "4", "--seed", "3", "--interval", "0.2",
                        log=tmp_path / "agent.log")
    try:
        assert await wait_for(lambda: len(got) >= 3), (tmp_path / "agent.log").read_text()
        first = got[0]
        assert first.host == "it-host-1" and len(first.gpus) == 4
        seqs = [m.seq for m in got if m.boot == first.boot]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert await wait_for(lambda: any(e.kind == "agent_started" for e in events))

        ok, text = await bus.send("it-host-1", "ping")
        assert ok, text
        ok, text = await bus.send("it-host-1", "sleep", [2])
        assert ok, text
        assert await wait_for(lambda: got[-1].gpus[2].state == "sleeping")
        assert any(e.kind == "sleep" and e.gpus == [2] for e in events) or await wait_for(
            lambda: any(e.kind == "sleep" for e in events))
        ok, text = await bus.send("it-host-1", "wake", None)
        assert ok, text
        ok, text = await bus.send("it-host-1", "set_power_limit", [0], watts=100000)
        assert not ok and "refused" in text
        # A request that is not valid JSON still gets an answer (with an empty id).
        assert bus.nc is not None
        resp = await bus.nc.request("aether.cmd.it-host-1", b"{oops", timeout=5)
        assert b'"ok":false' in resp.data
        # Unknown hosts are reported offline, quickly, without blocking.
        ok, text = await bus.send("no-such-host", "ping")
        assert not ok and "offline" in text and "no responders" in text
    finally:
        assert stop_agent(agent) == 0
        await wait_for(lambda: any(e.kind == "agent_stopping" for e in events), timeout=10)
        await bus.stop()
    assert any(e.kind == "agent_stopping" for e in events)


async def test_malformed_messages_are_counted_and_dropped(nats_url: str) -> None:
    got: list[Telemetry] = []
    bus = Bus(NatsSettings(servers=(nats_url,)), on_telemetry=lambda m, t: got.append(m))
    await bus.start(wait=10)
    nc = await nats.connect(nats_url)
    good = b'{"v":1,"host":"h1","boot":"b","seq":0,"ts":1.0,"state":"active","gpus":[]}'
    for bad in (b"{", b'{"v":2,"host":"h1","boot":"b","seq":0,"ts":1.0,"state":"active","gpus":[]}',
                good.replace(b"1.0", b"1e999"), b"[" * 5000):
        await nc.publish("aether.telemetry.h1", bad)
    await nc.publish("aether.telemetry.other", good)  # host in body != subject
    await nc.publish("aether.telemetry.h1", good)
    await nc.flush()
    assert await wait_for(lambda: len(got) == 1 and bus.telemetry_rejects.total == 5)
    await nc.close()
    await bus.stop()


async def test_nats_restart_loses_nothing_from_the_agent_buffer(nats_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="AETHER_TELEMETRY", subjects=["aether.telemetry.*"], duplicate_window=120)
    await nc.close()
    agent = start_agent(nats_server.url, "it-buf", "--simulate", "2", "--interval", "0.2",
                        log=tmp_path / "agent.log")

    async def stream_seqs() -> dict[str, list[tuple[int, float]]]:
        c = await nats.connect(nats_server.url)
        js = c.jetstream()
        sub = await js.pull_subscribe("aether.telemetry.*", durable=None, stream="AETHER_TELEMETRY")
        out: dict[str, list[tuple[int, float]]] = {}
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1)
            except nats.errors.TimeoutError:
                break
            for m in msgs:
                t = decode_telemetry(m.data)
                out.setdefault(t.boot, []).append((t.seq, t.ts))
                await m.ack()
        await c.close()
        return out

    try:
        await asyncio.sleep(2.0)
        nats_server.stop()
        outage_start = time.time()
        await asyncio.sleep(3.0)
        outage_end = time.time()
        nats_server.start()
        await asyncio.sleep(4.0)
    finally:
        assert stop_agent(agent) == 0
    seqs = await stream_seqs()
    assert len(seqs) == 1, seqs.keys()
    (pairs,) = seqs.values()
    numbers = sorted(s for s, _ in pairs)
    assert numbers == list(range(numbers[-1] + 1)), "gap or duplicate in the stored sequence"
    during = [ts for _, ts in pairs if outage_start + 0.5 < ts < outage_end - 0.5]
    assert len(during) >= 5, "samples taken during the outage must arrive with their original timestamps"


async def test_agent_started_before_nats_catches_up(nats_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nats_server.stop()
    agent = start_agent(nats_server.url, "it-late", "--simulate", "1", "--interval", "0.2",
                        log=tmp_path / "agent.log")
    try:
        await asyncio.sleep(2.0)
        nats_server.start()
        nc = await nats.connect(nats_server.url)
        got: list[Telemetry] = []

        async def cb(msg) -> None:  # type: ignore[no-untyped-def]
            got.append(decode_telemetry(msg.data))

        await nc.subscribe("aether.telemetry.it-late", cb=cb)
        assert await wait_for(lambda: any(m.seq == 0 for m in got) and len(got) >= 8)
        await nc.close()
    finally:
        stop_agent(agent)


async def test_real_command_runs_on_an_agent_with_allow_jobs(nats_url: str, tmp_path: Path) -> None:
    events: list[Event] = []
    bus = Bus(NatsSettings(servers=(nats_url,)), on_event=events.append)
    await bus.start(wait=10)
    agent = start_agent(nats_url, "it-jobs", "--simulate", "2", "--jobs-mode", "process", "--allow-jobs",
                        "--allow-cmd", sys.executable, "--job-log-dir", str(tmp_path / "jobs"),
                        log=tmp_path / "agent.log")
    try:
        assert await wait_for(lambda: any(e.kind == "agent_started" for e in events))
        from aether_protocol import PROTOCOL_VERSION, JobSpec, RunJobCmd

        script = "import os, sys; print('args', sys.argv[1:]); print('gpus', os.environ['CUDA_VISIBLE_DEVICES'])"
        cmd = RunJobCmd(v=PROTOCOL_VERSION, id="c-run", job=JobSpec(
            id="job-real", argv=[sys.executable, "-c", script, "; rm -rf /"], gpus=[1]))
        rep = await bus.request("it-jobs", cmd)
        assert rep.ok, rep.error
        assert await wait_for(lambda: any(e.kind == "job_finished" and e.job_id == "job-real" for e in events))
        fin = next(e for e in events if e.kind == "job_finished")
        assert fin.exit_code == 0 and fin.gpus == [1]
        rep = await bus.request("it-jobs", build_command("job_log", "c-log", job_id="job-real"))
        assert rep.ok and rep.data is not None
        assert "'; rm -rf /'" in str(rep.data["log"]) and "gpus 1" in str(rep.data["log"])
        bad = RunJobCmd(v=PROTOCOL_VERSION, id="c-bad", job=JobSpec(id="job-bad", argv=["rm", "-rf", "/"], gpus=[0]))
        rep = await bus.request("it-jobs", bad)
        assert not rep.ok and "not in the agent's allowed commands" in (rep.error or "")
        long = RunJobCmd(v=PROTOCOL_VERSION, id="c-long", job=JobSpec(
            id="job-long", argv=[sys.executable, "-c", "import time; time.sleep(120)"], gpus=[0]))
        assert (await bus.request("it-jobs", long)).ok
        rep = await bus.request("it-jobs", build_command("cancel_job", "c-cancel", job_id="job-long"))
        assert rep.ok
        assert await wait_for(lambda: any(e.kind == "job_cancelled" and e.job_id == "job-long" for e in events))
    finally:
        stop_agent(agent)
        await bus.stop()


async def test_sigterm_while_nats_is_down_exits_promptly(nats_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.servers import free_port

    # Never reached NATS: the first connect is still retrying when the stop comes.
    lonely = start_agent(f"nats://127.0.0.1:{free_port()}", "it-lonely", "--simulate", "1", "--interval", "0.2",
                         log=tmp_path / "lonely.log")
    # Connected, then NATS went away: the client is reconnecting, messages are buffered.
    agent = start_agent(nats_server.url, "it-down", "--simulate", "1", "--interval", "0.2",
                        log=tmp_path / "agent.log")
    nc = await nats.connect(nats_server.url)
    got: list[bytes] = []

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await nc.subscribe("aether.telemetry.it-down", cb=cb)
    try:
        assert await wait_for(lambda: len(got) >= 2), (tmp_path / "agent.log").read_text()
        await nc.close()
        nats_server.stop()
        await asyncio.sleep(1.5)
        for proc, log in ((agent, "agent.log"), (lonely, "lonely.log")):
            t0 = time.monotonic()
            assert stop_agent(proc, timeout=10) == 0, (tmp_path / log).read_text()
            assert time.monotonic() - t0 < 5, (tmp_path / log).read_text()
    finally:
        for proc in (agent, lonely):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_sighup_stops_the_agent_like_sigterm(nats_url: str, tmp_path: Path) -> None:
    import signal

    events: list[Event] = []
    bus = Bus(NatsSettings(servers=(nats_url,)), on_event=events.append)
    await bus.start(wait=10)
    agent = start_agent(nats_url, "it-hup", "--simulate", "1", "--interval", "0.2", log=tmp_path / "agent.log")
    try:
        assert await wait_for(lambda: any(e.kind == "agent_started" for e in events))
        agent.send_signal(signal.SIGHUP)  # the ssh session that started it went away
        assert agent.wait(15) == 0, (tmp_path / "agent.log").read_text()
        # Drained like a SIGTERM: the stop is announced, not cut off.
        assert await wait_for(lambda: any(e.kind == "agent_stopping" for e in events), timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        await bus.stop()
