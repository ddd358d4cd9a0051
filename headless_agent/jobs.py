"""Running real jobs on a GPU host: allowlisted argv, no shell, one log file per job.

A job runs only if the agent was started with ``--allow-jobs`` and its
``argv[0]`` is in the allowlist (an empty allowlist refuses everything). The
argv is executed directly (``subprocess`` without a shell), so ``; rm -rf /``
is just an argument. ``CUDA_VISIBLE_DEVICES`` is set to the job's GPUs.
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

log = logging.getLogger("aether.agent.jobs")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables a job may not override: they decide what the job can touch.
_PROTECTED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "LD_PRELOAD", "LD_LIBRARY_PATH", "PATH"})
_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# The agent's own secrets (NATS password, token, creds path) are not the job's business.
_SECRET_ENV_PREFIX = "AETHER_NATS"


@dataclass(frozen=True)
class JobPolicy:
    allow_jobs: bool = False
    allowed_commands: tuple[str, ...] = ()
    log_dir: Path = Path("/tmp/aether-jobs")
    cancel_grace_s: float = 10.0
    # A running job's log beyond this is rotated: its last LOG_KEEP_BYTES go to
    # "<id>.log.1" and the log starts over (0: no limit). A chatty job cannot fill the disk.
    max_log_bytes: int = 64 * 1024 * 1024


LOG_KEEP_BYTES = 1024 * 1024


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
        if not _ENV_NAME.match(name):
            raise BackendError(f"invalid environment variable name {name!r}")
        if name in _PROTECTED_ENV:
            raise BackendError(f"a job may not set {name}")
    if job.cwd is not None:
        if not os.path.isabs(job.cwd):
            # Relative to wherever the agent was started (often / under systemd): never what was meant.
            raise BackendError(f"working directory {job.cwd!r} must be an absolute path")
        if not Path(job.cwd).is_dir():
            raise BackendError(f"working directory {job.cwd!r} does not exist on this host")
        if not os.access(job.cwd, os.X_OK):
            raise BackendError(f"working directory {job.cwd!r} is not accessible to the agent's user")


def job_environment(job: JobSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_SECRET_ENV_PREFIX)}
    env.update(job.env or {})
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in job.gpus)
    env["AETHER_JOB_ID"] = job.id
    return env


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
        self._signal(run, signal.SIGTERM)
        asyncio.ensure_future(self._kill_later(run))
        return True

    async def _kill_later(self, run: _Running) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(run.proc.wait()), self.policy.cancel_grace_s)
        except TimeoutError:
            log.warning("job %s ignored SIGTERM for %.0f s: killing it", run.job.id, self.policy.cancel_grace_s)
            self._signal(run, signal.SIGKILL)

    @staticmethod
    def _signal(run: _Running, sig: signal.Signals) -> None:
        try:
            os.killpg(run.proc.pid, sig)
        except ProcessLookupError:
            return

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
        for run in list(self._running.values()):
            await self.cancel(run.job.id)
        waiters: Sequence[asyncio.Task[None]] = [r.waiter for r in self._running.values() if r.waiter]
        if waiters:
            await asyncio.wait(waiters, timeout=self.policy.cancel_grace_s + 1)
