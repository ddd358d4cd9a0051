"""A job is its whole process group: its GPUs are free only once no process of it is left."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from aether_protocol import JobSpec
from headless_agent.backend import JobOutcome
from headless_agent.jobs import JobPolicy, ProcessJobRunner, _group_alive

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc")

# A launcher (like torchrun or a shell wrapper) that starts a worker and waits; the worker writes its
# pid once it is ready. IGNORE_TERM: the worker ignores SIGTERM (say, while it writes a checkpoint).
LAUNCHER = r'''
import subprocess, sys, time
worker = """
import os, signal, sys, time
if sys.argv[2] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".part", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".part", sys.argv[1])
time.sleep(120)
"""
subprocess.Popen([sys.executable, "-c", worker, sys.argv[1], sys.argv[2]])
time.sleep(float(sys.argv[3]))
'''


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def start_launcher(runner: ProcessJobRunner, tmp_path: Path, job_id: str, *, ignore_term: bool,
                         launcher_s: float = 120.0) -> int:
    pid_file = tmp_path / f"{job_id}.pid"
    await runner.start(JobSpec(id=job_id, gpus=[0], argv=[
        sys.executable, "-c", LAUNCHER, str(pid_file), "1" if ignore_term else "0", str(launcher_s)]))
    for _ in range(200):
        if pid_file.exists():
            return int(pid_file.read_text())
        await asyncio.sleep(0.05)
    raise AssertionError("the worker did not start")


async def outcome(runner: ProcessJobRunner, timeout: float = 20.0) -> tuple[JobOutcome, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = runner.poll()
        if done:
            return done[0], time.monotonic()
        await asyncio.sleep(0.02)
    raise AssertionError("no outcome")


def kill_if_alive(pid: int) -> None:
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


async def test_cancel_kills_a_worker_that_ignores_sigterm_after_its_launcher_exits(tmp_path: Path) -> None:
    """The reviewer's reproduction: the launcher exits on SIGTERM, the worker keeps the GPU."""
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path, cancel_grace_s=1.0)
    runner = ProcessJobRunner(policy, 1)
    worker = await start_launcher(runner, tmp_path, "j-stubborn", ignore_term=True)
    try:
        t0 = time.monotonic()
        assert await runner.cancel("j-stubborn")
        await asyncio.sleep(0.3)
        # The launcher is gone, the worker is not: the GPU is still taken.
        assert alive(worker) and runner.busy_gpus() == {0}
        done, at = await outcome(runner)
        assert done.kind == "job_cancelled" and done.gpus == (0,)
        assert not alive(worker), "the GPU was reported free while the worker still ran"
        assert at - t0 >= policy.cancel_grace_s and runner.busy_gpus() == set()
    finally:
        kill_if_alive(worker)


async def test_a_launcher_that_exits_leaves_no_worker_behind(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path, cancel_grace_s=5.0)
    runner = ProcessJobRunner(policy, 1)
    worker = await start_launcher(runner, tmp_path, "j-orphan", ignore_term=False, launcher_s=0.5)
    try:
        done, _ = await outcome(runner)
        # Its own exit code is the job's; the leftover worker ended with it (SIGTERM was enough).
        assert done.kind == "job_finished" and done.exit_code == 0
        assert not alive(worker)
    finally:
        kill_if_alive(worker)


async def test_stop_all_kills_stubborn_workers_before_returning(tmp_path: Path) -> None:
    policy = JobPolicy(allow_jobs=True, allowed_commands=(sys.executable,), log_dir=tmp_path, cancel_grace_s=0.5)
    runner = ProcessJobRunner(policy, 1)
    worker = await start_launcher(runner, tmp_path, "j-stop", ignore_term=True)
    try:
        await runner.stop_all()
        assert not alive(worker) and not runner.running
        assert [o.kind for o in runner.poll()] == ["job_cancelled"]
    finally:
        kill_if_alive(worker)


def test_a_group_of_zombies_counts_as_gone(tmp_path: Path) -> None:
    proc_root = tmp_path / "proc"
    (proc_root / "4242").mkdir(parents=True)
    # pid (comm with ") spaces") state ppid pgrp ...: a zombie left in our own group.
    pgid = os.getpgrp()
    (proc_root / "4242" / "stat").write_text(f"4242 (a) b) Z 1 {pgid} {pgid} 0 -1\n")
    assert not _group_alive(pgid, proc_root)
    (proc_root / "4242" / "stat").write_text(f"4242 (a) b) S 1 {pgid} {pgid} 0 -1\n")
    assert _group_alive(pgid, proc_root)
    assert not _group_alive(2**22 + 7, proc_root)  # no such group at all
