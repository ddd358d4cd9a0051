"""Agent pieces without a network: job policy, outbox, command handler on a simulated backend."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import pytest

from aether_protocol import JobSpec, decode_reply, encode
from aether_protocol.connection import NatsSettings, connect_kwargs, split_servers
from headless_agent.backend import BackendError
from headless_agent.commands import CommandHandler
from headless_agent.jobs import JobPolicy, ProcessJobRunner, check_job, job_environment
from headless_agent.outbox import NotCaptured, Outbox, Outgoing, PublishFailed
from headless_agent.simulate import SimulatedBackend


def job(argv: list[str], gpus: list[int] | None = None, **kw: object) -> JobSpec:
    return JobSpec(id=str(kw.pop("id", "job-1")), argv=argv, gpus=gpus or [0], **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ job policy

def test_jobs_refused_unless_allowed() -> None:
    with pytest.raises(BackendError, match="--allow-jobs"):
        check_job(job(["python"]), JobPolicy(allow_jobs=False, allowed_commands=("python",)), 1)


def test_empty_allowlist_refuses_everything() -> None:
    with pytest.raises(BackendError, match="allowlist is empty"):
        check_job(job(["python"]), JobPolicy(allow_jobs=True), 1)


def test_allowlist_matches_name_or_exact_path_only() -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=("python", "/opt/bin/train"))
    check_job(job(["python", "x.py"]), policy, 1)
    check_job(job(["/opt/bin/train"]), policy, 1)
    with pytest.raises(BackendError, match="not in the agent's allowed commands"):
        check_job(job(["rm", "-rf", "/"]), policy, 1)
    with pytest.raises(BackendError, match="is a path"):
        check_job(job(["/tmp/evil/python"]), policy, 1)


def test_job_checks_gpus_env_and_cwd() -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=("python",))
    with pytest.raises(BackendError, match="no GPU with index 3"):
        check_job(job(["python"], [3]), policy, 2)
    with pytest.raises(BackendError, match="may not set CUDA_VISIBLE_DEVICES"):
        check_job(job(["python"], env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}), policy, 1)
    with pytest.raises(BackendError, match="invalid environment variable"):
        check_job(job(["python"], env={"A=B": "x"}), policy, 1)
    with pytest.raises(BackendError, match="does not exist"):
        check_job(job(["python"], cwd="/nonexistent/dir"), policy, 1)
    env = job_environment(job(["python"], [0, 2], env={"EPOCHS": "3"}), base={"HOME": "/root"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2" and env["EPOCHS"] == "3" and env["AETHER_JOB_ID"] == "job-1"


async def test_process_runner_runs_argv_without_a_shell(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path)
    runner = ProcessJobRunner(policy, gpu_count=2)
    script = "import os, sys; print(sys.argv[1:]); print('CVD=' + os.environ['CUDA_VISIBLE_DEVICES'])"
    marker = tmp_path / "pwned"
    await runner.start(job([sys.executable, "-c", script, f"; touch {marker}", "$(id)"], [1], id="j-shell"))
    for _ in range(200):
        done = runner.poll()
        if done:
            break
        await asyncio.sleep(0.05)
    assert done and done[0].kind == "job_finished" and done[0].exit_code == 0
    out = runner.log_tail("j-shell")
    assert f"'; touch {marker}'" in out and "'$(id)'" in out and "CVD=1" in out
    assert not marker.exists()


async def test_a_chatty_jobs_log_is_rotated_and_its_tail_still_readable(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path,
                       max_log_bytes=50_000)
    runner = ProcessJobRunner(policy, gpu_count=1)
    # 400 KB in 40 steps, then a last line and a pause so the runner rotates while it runs.
    script = ("import sys, time\n"
              "for i in range(40):\n"
              "    sys.stdout.write(f'{i:05d}' + 'x' * 9994 + '\\n'); sys.stdout.flush(); time.sleep(0.01)\n"
              "print('the end', flush=True); time.sleep(0.3)")
    await runner.start(job([sys.executable, "-c", script], [0], id="j-chatty"))
    done: list = []
    for _ in range(400):
        done += runner.poll()
        if done:
            break
        await asyncio.sleep(0.01)
    assert done and done[0].exit_code == 0
    log_path = tmp_path / "j-chatty.log"
    assert log_path.stat().st_size <= 50_000 + 2 * 10_000  # bounded: limit + what came between polls
    assert (tmp_path / "j-chatty.log.1").stat().st_size <= 50_000
    tail = runner.log_tail("j-chatty", 30_000)
    assert tail.rstrip().endswith("the end") and len(tail) == 30_000


async def test_process_runner_cancel_terminates(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path, cancel_grace_s=2)
    runner = ProcessJobRunner(policy, gpu_count=1)
    await runner.start(job([sys.executable, "-c", "import time; time.sleep(60)"], id="j-long"))
    assert runner.busy_gpus() == {0}
    assert await runner.cancel("j-long")
    for _ in range(200):
        done = runner.poll()
        if done:
            break
        await asyncio.sleep(0.05)
    assert done[0].kind == "job_cancelled"
    assert not await runner.cancel("j-long")


async def test_process_runner_reports_failure_and_bad_command(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable, "no-such-binary-xyz"), log_dir=tmp_path)
    runner = ProcessJobRunner(policy, gpu_count=1)
    with pytest.raises(BackendError, match="could not start"):
        await runner.start(job(["no-such-binary-xyz"], id="j-missing"))
    await runner.start(job([sys.executable, "-c", "raise SystemExit(3)"], id="j-fail"))
    for _ in range(200):
        done = runner.poll()
        if done:
            break
        await asyncio.sleep(0.05)
    assert done[0].kind == "job_failed" and done[0].exit_code == 3
    with pytest.raises(BackendError, match="invalid job id"):
        runner.log_tail("../../etc/passwd")


# ------------------------------------------------------------------ outbox

async def test_outbox_keeps_order_until_acked_and_is_bounded() -> None:
    box = Outbox(max_messages=5, max_events=2)
    for i in range(7):
        box.put(Outgoing("s", str(i).encode(), f"m{i}"))
    assert len(box) == 5 and box.dropped == 2
    sent: list[bytes] = []
    fail = {"on": True}

    async def publish(item: Outgoing) -> None:
        if fail["on"]:
            raise PublishFailed("down")
        sent.append(item.payload)

    assert await box.drain(publish) is False
    assert len(box) == 5 and sent == []
    fail["on"] = False
    box.put(Outgoing("e", b"ev", "e1", is_event=True))
    assert await box.drain(publish, window=2) is True
    assert sent == [b"ev", b"2", b"3", b"4", b"5", b"6"]
    assert len(box) == 0


async def test_outbox_not_captured_counts_as_delivered() -> None:
    box = Outbox()
    box.put(Outgoing("s", b"x", "m"))

    async def publish(item: Outgoing) -> None:
        raise NotCaptured()

    assert await box.drain(publish) and len(box) == 0


# ------------------------------------------------------------------ commands on a simulated host

def make_handler() -> tuple[CommandHandler, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    backend = SimulatedBackend(2, seed=1, background_load=False)
    backend.read(1000.0)
    handler = CommandHandler(backend, None, JobPolicy(allow_jobs=True, allowed_commands=("python",)),
                             lambda kind, **f: events.append((kind, f)), lambda: {"host": "h"}, lambda: 1000.0)
    return handler, events


async def ask(handler: CommandHandler, cmd: dict | bytes) -> tuple[bool, str | None, object]:
    raw = cmd if isinstance(cmd, bytes) else json.dumps(cmd).encode()
    rep = decode_reply(await handler.handle(raw))
    return rep.ok, rep.error, rep.data


async def test_commands_answer_every_request_with_its_id() -> None:
    h, events = make_handler()
    assert (await ask(h, {"v": 1, "id": "c1", "op": "ping"}))[0]
    ok, err, _ = await ask(h, {"v": 1, "id": "c2", "op": "reboot"})
    assert not ok and "unknown op 'reboot'" in (err or "")
    rep = decode_reply(await h.handle(b'{"v":1,"id":"c3","op":"sleep","gpus":"all"}'))
    assert rep.id == "c3" and not rep.ok and "malformed" in (rep.error or "")
    rep = decode_reply(await h.handle(b"\x00garbage"))
    assert not rep.ok and rep.id == ""
    assert h.rejects.total == 3


async def test_sleep_wake_power_limit_and_events() -> None:
    h, events = make_handler()
    assert (await ask(h, {"v": 1, "id": "c1", "op": "sleep", "gpus": [1]}))[0]
    assert events[-1] == ("sleep", {"gpus": [1]})
    assert h.backend.read(1001.0)[1].state == "sleeping"
    assert (await ask(h, {"v": 1, "id": "c2", "op": "wake", "gpus": None}))[0]
    assert events[-1] == ("wake", {"gpus": [0, 1]})
    ok, err, _ = await ask(h, {"v": 1, "id": "c3", "op": "sleep", "gpus": [7]})
    assert not ok and "no GPU with index 7" in (err or "")
    ok, err, _ = await ask(h, {"v": 1, "id": "c4", "op": "set_power_limit", "gpus": [0], "watts": 5})
    assert not ok and err
    assert (await ask(h, {"v": 1, "id": "c5", "op": "set_power_limit", "gpus": [0], "watts": 300}))[0]


async def test_ping_answers_while_a_sleep_hangs_and_control_commands_keep_their_order() -> None:
    h, events = make_handler()
    release = threading.Event()
    calls: list[str] = []
    sleep, wake = h.backend.sleep, h.backend.wake

    def hung_sleep(gpus: list[int] | None) -> None:  # NVML stuck on a sick GPU
        calls.append("sleep")
        release.wait(10)
        sleep(gpus)

    def quick_wake(gpus: list[int] | None) -> None:
        calls.append("wake")
        wake(gpus)

    h.backend.sleep, h.backend.wake = hung_sleep, quick_wake  # type: ignore[method-assign]
    sleeping = asyncio.ensure_future(ask(h, {"v": 1, "id": "s", "op": "sleep", "gpus": [1]}))
    waking = asyncio.ensure_future(ask(h, {"v": 1, "id": "w", "op": "wake", "gpus": [1]}))
    await asyncio.sleep(0.05)
    ok, _, data = await asyncio.wait_for(ask(h, {"v": 1, "id": "p", "op": "ping"}), 2)
    assert ok and data == {"host": "h"} and not sleeping.done() and not waking.done()
    assert calls == ["sleep"]  # the wake waits for the sleep sent before it
    release.set()
    assert (await sleeping)[0] and (await waking)[0]
    assert calls == ["sleep", "wake"] and [k for k, _ in events[-2:]] == ["sleep", "wake"]
    assert h.backend.read(1001.0)[1].state == "ok"


async def test_simulated_job_lifecycle_and_refusals() -> None:
    h, events = make_handler()
    run = {"v": 1, "id": "c1", "op": "run_job",
           "job": {"id": "job-1", "argv": ["python", "train.py"], "gpus": [0], "mem_mib": 1000, "expected_s": 5}}
    assert (await ask(h, run))[0]
    assert events[-1][0] == "job_started"
    ok, err, _ = await ask(h, {"v": 1, "id": "c2", "op": "sleep", "gpus": [0]})
    assert not ok and "running a job" in (err or "")
    bad = json.loads(json.dumps(run))
    bad["job"]["argv"] = ["rm", "-rf", "/"]
    bad["job"]["id"] = "job-2"
    ok, err, _ = await ask(h, bad)
    assert not ok and "not in the agent's allowed commands" in (err or "")
    assert events[-1][0] == "job_rejected"
    ok, _, data = await ask(h, {"v": 1, "id": "c3", "op": "job_log", "job_id": "job-1"})
    assert ok and "simulated" in str(data)
    assert (await ask(h, {"v": 1, "id": "c4", "op": "cancel_job", "job_id": "job-1"}))[0]
    h.poll_jobs()
    assert events[-1][0] == "job_cancelled"
    ok, err, _ = await ask(h, {"v": 1, "id": "c5", "op": "cancel_job", "job_id": "job-1"})
    assert not ok and "not running" in (err or "")


async def test_fault_injection_command() -> None:
    h, _ = make_handler()
    assert (await ask(h, {"v": 1, "id": "c1", "op": "inject_fault", "spec": "gpu_lost:gpu=1"}))[0]
    ok, err, _ = await ask(h, {"v": 1, "id": "c2", "op": "inject_fault", "spec": "meteor:gpu=1"})
    assert not ok and err


def test_connection_options() -> None:
    assert split_servers(["a:4222,nats://b:4222", " tls://c:4443 "]) == (
        "nats://a:4222", "nats://b:4222", "tls://c:4443")
    kw = connect_kwargs(NatsSettings(servers=("nats://x:1",), user="u", password="p"))
    assert kw["max_reconnect_attempts"] == -1 and kw["user"] == "u" and kw["ping_interval"] <= 10
    assert NatsSettings(servers=("nats://u:secret@h:1",)).describe() == "nats://h:1"
    assert encode  # imported for completeness of the public surface


def test_failure_detail_recognises_out_of_memory() -> None:
    from headless_agent.jobs import failure_detail

    assert failure_detail(1, "...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB") == (
        "CUDA out of memory (exit code 1)")
    assert failure_detail(-9, "") == "killed by signal 9"
    assert failure_detail(3, "ValueError") == "exit code 3"
