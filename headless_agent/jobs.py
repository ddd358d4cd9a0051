"""Running real jobs on a GPU host: allowlisted argv, no shell, one log file per job.

A job runs only if the agent was started with ``--allow-jobs`` and its
``argv[0]`` is in the allowlist (an empty allowlist refuses everything). The
argv is executed directly (``subprocess`` without a shell), so ``; rm -rf /``
is just an argument. ``CUDA_VISIBLE_DEVICES`` is set to the job's GPUs; which
variables a job may set is decided in ``job_env``.

A job is its process group (it starts a session of its own): cancelling it
signals the whole group, and its GPUs count as free only once no process of the
group is left, also when the first process exits and leaves workers behind.
Because a job has its own session, it outlives an agent that crashes or is
SIGKILLed (a parent-death signal cannot be set safely from a threaded parent);
under the shipped systemd unit the service's control-group kill ends it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aether_protocol import JobSpec
from headless_agent.backend import BackendError, JobOutcome
from headless_agent.job_env import env_refusal, job_environment

__all__ = ["JobPolicy", "ProcessJobRunner", "check_job", "failure_detail", "job_environment"]

log = logging.getLogger("aether.agent.jobs")

_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class JobPolicy:
    allow_jobs: bool = False
    allowed_commands: tuple[str, ...] = ()
    # Loader/interpreter hooks jobs may set after all (--allow-env); other variables follow
    # job_env's default rules, the agent's own are always refused.
    allowed_env: tuple[str, ...] = ()
    log_dir: Path = Path("/tmp/aether-jobs")
    cancel_grace_s: float = 10.0
    # A running job's log beyond this is rotated: its last LOG_KEEP_BYTES go to
    # "<id>.log.1" and the log starts over (0: no limit). A chatty job cannot fill the disk.
    max_log_bytes: int = 64 * 1024 * 1024


LOG_KEEP_BYTES = 1024 * 1024
# After SIGKILL, how long a job's process group may take to disappear before its GPUs are reported
# free anyway (a process stuck in the driver, or zombies nobody reaps in a container without init).
GROUP_GONE_S = 5.0
_GROUP_POLL_S = 0.1


def check_job(job: JobSpec, policy: JobPolicy, gpu_count: int) -> None:
    """Raise BackendError with the reason a job must be refused (pure; unit-tested)."""
    if not policy.allow_jobs:
        raise BackendError("this agent does not run jobs (start it with --allow-jobs)")
    if not _JOB_ID.match(job.id):
        raise BackendError(f"invalid job id {job.id!r}")
    texts = [*job.argv, *(job.env or {}).keys(), *(job.env or {}).values(), job.cwd or ""]
    if any("\0" in t for t in texts):
        raise BackendError("argv, env and cwd may not contain NUL characters")
    cmd = job.argv[0]
    allowed = policy.allowed_commands
    if not allowed:
        raise BackendError("the agent's allowlist is empty (--allow-cmd): no command may run")
    if cmd not in allowed and os.path.basename(cmd) not in allowed:
        raise BackendError(f"argv[0] {cmd!r} is not in the agent's allowed commands")
    if os.path.basename(cmd) in allowed and cmd not in allowed and os.sep in cmd:
        # "/tmp/evil/python" must not pass because "python" is allowed.
        raise BackendError(f"argv[0] {cmd!r} is a path; only allowed command names or exact paths run")
    if not job.gpus:
        raise BackendError("a job needs at least one GPU")
    bad = [g for g in job.gpus if g >= gpu_count]
    if bad:
        raise BackendError(f"no GPU with index {bad[0]} on this host (it has {gpu_count})")
    for name in (job.env or {}):
        refusal = env_refusal(name, policy.allowed_env)
        if refusal is not None:
            raise BackendError(refusal)
    if job.cwd is not None:
        if not os.path.isabs(job.cwd):
            # Relative to wherever the agent was started (often / under systemd): never what was meant.
            raise BackendError(f"working directory {job.cwd!r} must be an absolute path")
        if not Path(job.cwd).is_dir():
            raise BackendError(f"working directory {job.cwd!r} does not exist on this host")
        if not os.access(job.cwd, os.X_OK):
            raise BackendError(f"working directory {job.cwd!r} is not accessible to the agent's user")


# What frameworks print when a GPU runs out of memory (PyTorch, TensorFlow, JAX/XLA, plain CUDA).
_OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "RESOURCE_EXHAUSTED", "CUDA_ERROR_OUT_OF_MEMORY",
                "cudaErrorMemoryAllocation")


def failure_detail(exit_code: int | None, log_tail: str) -> str:
    """Why a job failed, in words the scheduler learns from (pure; reads the end of the job's log)."""
    if any(m in log_tail for m in _OOM_MARKERS):
        return f"CUDA out of memory (exit code {exit_code})"
    if exit_code is not None and exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


@dataclass
class _Running:
    job: JobSpec
    proc: asyncio.subprocess.Process
    log_path: Path
    started: float
    cancelled: bool = False
    waiter: asyncio.Task[None] | None = field(default=None, repr=False)
    # Set when the group got SIGTERM: sends SIGKILL to the group after the grace period.
    killer: asyncio.Task[None] | None = field(default=None, repr=False)
    killed_at: float | None = None  # monotonic time of the SIGKILL
    ended: bool = False  # no process of the group is left (or we gave up waiting)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the first process leads the job's group


class ProcessJobRunner:
    """Starts allowlisted jobs as child processes and reports how they end."""

    def __init__(self, policy: JobPolicy, gpu_count: int) -> None:
        self.policy = policy
        self.gpu_count = gpu_count
        self._running: dict[str, _Running] = {}
        self._done: list[JobOutcome] = []

    @property
    def running(self) -> dict[str, _Running]:
        return self._running

    def busy_gpus(self) -> set[int]:
        return {g for r in self._running.values() for g in r.job.gpus}

    async def start(self, job: JobSpec) -> None:
        check_job(job, self.policy, self.gpu_count)
        if job.id in self._running:
            raise BackendError(f"job {job.id} is already running")
        log_path = self.policy.log_dir / f"{job.id}.log"
        fd = self._open_log(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *job.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=asyncio.subprocess.STDOUT,
                env=job_environment(job),
                cwd=job.cwd,
                start_new_session=True,  # so cancel can signal the whole process group
            )
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BackendError(f"could not start {job.argv[0]!r}: {reason}") from exc
        finally:
            os.close(fd)  # the child has its own copy
        run = _Running(job=job, proc=proc, log_path=log_path, started=time.time())
        run.waiter = asyncio.ensure_future(self._wait(run))
        self._running[job.id] = run
        log.info("job %s started: pid %d, gpus %s, log %s", job.id, proc.pid, list(job.gpus), log_path)

    def _open_log(self, path: Path) -> int:
        """The job's log, for appending; a refusal (permissions, full disk) is the job's refusal."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: in a shared folder such as /tmp a planted symlink must not redirect the output.
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            raise BackendError(f"cannot write the job log {str(path)!r}: {exc.strerror or exc}") from exc

    async def _wait(self, run: _Running) -> None:
        code = await run.proc.wait()
        # In a thread: with processes left, telling zombies apart reads /proc, which takes a while on a busy host.
        if await asyncio.to_thread(_group_alive, run.pgid):
            if run.killer is None:
                # A launcher that exited (or crashed) and left workers behind: they still hold the
                # job's GPUs. They are the job's, and end with it.
                log.warning("job %s: its first process exited (code %s) but processes of its group remain; "
                            "ending them", run.job.id, code)
                self._terminate(run)
            await self._until_group_gone(run)
        run.ended = True
        if run.killer is not None:
            run.killer.cancel()
        self._running.pop(run.job.id, None)
        if run.cancelled:
            kind, detail = "job_cancelled", "cancelled by the operator"
        elif code == 0:
            kind, detail = "job_finished", None
        else:
            kind, detail = "job_failed", failure_detail(code, self._tail_bytes(run.log_path))
        self._done.append(JobOutcome(run.job.id, tuple(run.job.gpus), kind, code, detail))

    @staticmethod
    def _tail_bytes(path: Path, n: int = 65536) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - n))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def poll(self) -> list[JobOutcome]:
        """Jobs that ended since the last call; also keeps running jobs' logs under the size limit."""
        if self.policy.max_log_bytes > 0:
            for run in self._running.values():
                self._rotate_log(run.log_path, self.policy.max_log_bytes)
        done, self._done = self._done, []
        return done

    @staticmethod
    def _rotate_log(path: Path, limit: int) -> None:
        """Copy-truncate: the job writes with O_APPEND, so after truncating to 0
        its next write lands at the new start; what it writes between the copy
        and the truncate (milliseconds) is lost. One descriptor, opened without
        following links (like the job's own), so a link planted in a shared log
        folder cannot point the truncate at another file."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not rotate job log %s: %s", path, exc)
            return
        try:
            size = os.fstat(fd).st_size
            if size <= limit:
                return
            keep = min(LOG_KEEP_BYTES, limit)
            tail = os.pread(fd, keep, size - keep)
            tmp = path.with_name(path.name + ".1.part")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
            try:
                os.write(out, tail)
            finally:
                os.close(out)
            os.replace(tmp, path.with_name(path.name + ".1"))
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.warning("could not rotate job log %s: %s", path, exc)
        finally:
            os.close(fd)

    async def cancel(self, job_id: str) -> bool:
        run = self._running.get(job_id)
        if run is None:
            return False
        run.cancelled = True
        self._terminate(run)
        return True

    def _terminate(self, run: _Running) -> None:
        """SIGTERM the job's whole process group now, SIGKILL it after the grace period."""
        if run.killer is not None:
            return
        self._signal(run, signal.SIGTERM)
        run.killer = asyncio.ensure_future(self._kill_later(run))

    async def _kill_later(self, run: _Running) -> None:
        await asyncio.sleep(self.policy.cancel_grace_s)
        if run.ended:
            return
        # Whether or not the first process is still there: a launcher that exits on SIGTERM
        # may leave a worker that ignores it, and that worker still holds the GPU.
        log.warning("job %s: processes still running %.0f s after SIGTERM: killing its process group",
                    run.job.id, self.policy.cancel_grace_s)
        run.killed_at = time.monotonic()
        self._signal(run, signal.SIGKILL)

    async def _until_group_gone(self, run: _Running) -> None:
        """Wait until no process of the job's group is left (the SIGKILL comes from _kill_later)."""
        while await asyncio.to_thread(_group_alive, run.pgid):
            if run.killed_at is not None and time.monotonic() - run.killed_at > GROUP_GONE_S:
                log.error("job %s: process group %d is still there %.0f s after SIGKILL; reporting the job "
                          "ended anyway", run.job.id, run.pgid, GROUP_GONE_S)
                return
            await asyncio.sleep(_GROUP_POLL_S)

    @staticmethod
    def _signal(run: _Running, sig: signal.Signals) -> None:
        try:
            os.killpg(run.pgid, sig)
        except ProcessLookupError:
            return  # the whole group is gone already
        except PermissionError as exc:  # a process of the group changed its user: nothing we can do
            log.error("job %s: cannot send %s to its process group: %s", run.job.id, sig.name, exc)

    def log_tail(self, job_id: str, max_bytes: int = 8192) -> str:
        if not _JOB_ID.match(job_id):
            raise BackendError(f"invalid job id {job_id!r}")
        path = self.policy.log_dir / f"{job_id}.log"
        if not path.exists():
            raise BackendError(f"no log for job {job_id} on this host")
        want = max(1, min(max_bytes, 256 * 1024))
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(max(0, size - want))
                data = fh.read()
            rotated = path.with_name(path.name + ".1")
            if len(data) < want and rotated.exists():  # the log was rotated: its end is in .1
                with open(rotated, "rb") as fh:
                    fh.seek(max(0, os.fstat(fh.fileno()).st_size - (want - len(data))))
                    data = fh.read() + data
            return data.decode("utf-8", errors="replace")
        except OSError as exc:
            raise BackendError(f"cannot read the log of job {job_id}: {exc.strerror or exc}") from exc

    async def stop_all(self) -> None:
        """Cancel every job and wait until their process groups are gone (SIGKILL after the grace)."""
        for run in list(self._running.values()):
            await self.cancel(run.job.id)
        waiters: Sequence[asyncio.Task[None]] = [r.waiter for r in self._running.values() if r.waiter]
        if waiters:
            await asyncio.wait(waiters, timeout=self.policy.cancel_grace_s + GROUP_GONE_S + 1)


def _group_alive(pgid: int, proc_root: Path = Path("/proc")) -> bool:
    """Whether any live process of the group is left (the reaped first process no longer counts).

    Zombies do not count: they hold no GPU, and where nothing reaps orphans (a container
    without an init) they would keep the group "alive" for ever.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if not proc_root.is_dir():
        return True  # no /proc to tell zombies apart: the signal's answer is all there is
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False
