"""Command handling: decode a request, act on the backend or the job runner, build the reply.

Every request gets a reply with its id, also a malformed one (then with
``ok: false`` and the reason). Events that a command causes (sleep, wake,
job_started, ...) are handed to ``emit``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aether_protocol import (
    CancelJobCmd,
    Command,
    InjectFaultCmd,
    JobLogCmd,
    PingCmd,
    ProtocolError,
    RejectCounter,
    RunJobCmd,
    SetPowerLimitCmd,
    SleepCmd,
    WakeCmd,
    command_id_and_op,
    decode_command,
    reply,
)
from headless_agent.backend import BackendError, GpuBackend, PartialControlError, resolve_gpus
from headless_agent.jobs import JobPolicy, ProcessJobRunner, check_job

log = logging.getLogger("aether.agent.commands")

# emit(kind, job_id=None, gpus=None, exit_code=None, detail=None)
EmitFn = Callable[..., None]

# A reply must fit the server's max payload (1 MiB by default) and the readers' 1 MiB limit, with room
# to spare: a reply that cannot be sent leaves the requester waiting for its timeout.
MAX_REPLY_BYTES = 512 * 1024

# Read-only commands: never queued behind a control command (and not counted by the
# agent's cap on commands in flight).
_QUERIES = (PingCmd, JobLogCmd)
QUERY_OPS = frozenset({"ping", "job_log"})


class CommandHandler:
    def __init__(
        self,
        backend: GpuBackend,
        runner: ProcessJobRunner | None,
        policy: JobPolicy,
        emit: EmitFn,
        info: Callable[[], dict[str, Any]],
        now: Callable[[], float],
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.backend = backend
        self.runner = runner  # None: jobs run inside the simulated backend
        self.policy = policy
        self.emit = emit
        self.info = info
        self.now = now
        self.rejects = RejectCounter("command")
        self.max_reply_bytes = max_reply_bytes
        self._sim_jobs: dict[str, tuple[int, ...]] = {}
        # Commands that change GPUs or jobs run one at a time, in arrival order
        # (a wake sent right after a sleep must not overtake it); queries
        # (ping, job_log) answer at once, also while a control call hangs on a
        # sick GPU. asyncio.Lock wakes its waiters first come, first served.
        self._control = asyncio.Lock()
        # Set when the agent stops: control commands are refused from then on (also those
        # already queued), so no job starts while jobs are being cancelled.
        self.stopping = False

    async def handle(self, data: bytes) -> bytes:
        try:
            cmd = decode_command(data)
        except ProtocolError as exc:
            self.rejects.count(exc, "cmd")
            cmd_id, _ = command_id_and_op(data)
            return reply(cmd_id, False, f"malformed request ({exc.reason}): {exc.detail[:200]}")
        try:
            if isinstance(cmd, _QUERIES):
                result = await self._execute(cmd)
            else:
                if self.stopping:
                    raise BackendError("the agent is stopping")
                async with self._control:
                    if self.stopping:
                        raise BackendError("the agent is stopping")
                    result = await self._execute(cmd)
        except BackendError as exc:
            log.info("command %s %s refused: %s", type(cmd).__name__, cmd.id, exc)
            return reply(cmd.id, False, str(exc))
        except Exception as exc:  # a bug or an unexpected OS/driver error: still answer, never leave it waiting
            log.exception("command %s %s failed unexpectedly", type(cmd).__name__, cmd.id)
            return reply(cmd.id, False, f"internal error in the agent: {type(exc).__name__}: {str(exc)[:300]}")
        return self._fit(cmd.id, result)

    def _fit(self, cmd_id: str, result: dict[str, object] | None) -> bytes:
        """The ok reply, shortened to fit ``max_reply_bytes`` (a log keeps its end), or an ok:false one."""
        out = reply(cmd_id, True, None, result)
        text = result.get("log") if result is not None else None
        while len(out) > self.max_reply_bytes and isinstance(text, str) and text:
            # JSON escapes can make a character up to 6 bytes: cut in proportion, then check again.
            keep = int(len(text) * self.max_reply_bytes / len(out) * 0.9)
            text = text[len(text) - keep:] if keep > 0 else ""
            out = reply(cmd_id, True, None, {**(result or {}), "log": text})
        if len(out) > self.max_reply_bytes:
            return reply(cmd_id, False, f"the reply would be {len(out)} bytes, over the {self.max_reply_bytes}-byte limit")
        return out

    # ------------------------------------------------------------------ ops

    async def _execute(self, cmd: Command) -> dict[str, object] | None:
        match cmd:
            case PingCmd():
                return self.info()
            case SleepCmd(gpus=gpus):
                targets = resolve_gpus(gpus, self.backend.gpu_count())
                busy = sorted(set(targets) & self.busy_gpus())
                if busy:
                    raise BackendError(f"GPU {busy[0]} is running a job; cancel it or wait before sleeping")
                # Pass None through: "every GPU" skips lost ones, an explicit lost GPU is an error.
                await self._power_state("sleep", self.backend.sleep, gpus, targets)
                return {"gpus": targets}
            case WakeCmd(gpus=gpus):
                targets = resolve_gpus(gpus, self.backend.gpu_count())
                await self._power_state("wake", self.backend.wake, gpus, targets)
                return {"gpus": targets}
            case SetPowerLimitCmd(gpus=gpus, watts=watts):
                targets = resolve_gpus(gpus, self.backend.gpu_count())
                await self._call(self.backend.set_power_limit, gpus, watts)
                return {"gpus": targets, "watts": watts}
            case RunJobCmd(job=job):
                return await self._run_job(job)
            case CancelJobCmd(job_id=job_id):
                return await self._cancel(job_id)
            case JobLogCmd(job_id=job_id, max_bytes=max_bytes):
                if self.runner is None:
                    if job_id in self._sim_jobs:
                        return {"log": f"[simulated job {job_id}: no real output]\n"}
                    raise BackendError(f"no log for job {job_id} on this host")
                return {"log": self.runner.log_tail(job_id, max_bytes)}
            case InjectFaultCmd(spec=spec):
                inject = getattr(self.backend, "inject_fault", None)
                if inject is None:
                    raise BackendError("fault injection is only available on simulated agents")
                try:
                    inject(spec, self.now())
                except ValueError as exc:
                    raise BackendError(str(exc)) from exc
                return {"spec": spec}
        raise BackendError(f"unsupported op {type(cmd).__name__}")

    async def _power_state(self, kind: str, fn: Callable[..., None], gpus: list[int] | None,
                           targets: list[int]) -> None:
        """Sleep or wake; the event names the GPUs that changed, also when others failed."""
        try:
            await self._call(fn, gpus)
        except PartialControlError as exc:
            if exc.done:
                self.emit(kind, gpus=list(exc.done), detail=f"not every GPU: {exc}"[:1000])
            raise
        self.emit(kind, gpus=targets)

    @staticmethod
    async def _call(fn: Callable[..., None], *args: object) -> None:
        # NVML control calls can block for seconds on a sick GPU: keep the loop (ticks, replies) free.
        await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def busy_gpus(self) -> set[int]:
        if self.runner is not None:
            return self.runner.busy_gpus()
        return {g for gpus in self._sim_jobs.values() for g in gpus}

    async def _run_job(self, job: Any) -> dict[str, object]:
        if self.runner is not None:
            try:
                await self.runner.start(job)
            except BackendError as exc:
                self.emit("job_rejected", job_id=job.id, gpus=list(job.gpus), detail=str(exc))
                raise
        else:
            try:
                # The same policy as for real processes, so demo mode behaves like production.
                check_job(job, self.policy, self.backend.gpu_count())
                self.backend.start_job(job, self.now())  # type: ignore[attr-defined]
            except BackendError as exc:
                self.emit("job_rejected", job_id=job.id, gpus=list(job.gpus), detail=str(exc))
                raise
            self._sim_jobs[job.id] = tuple(job.gpus)
        self.emit("job_started", job_id=job.id, gpus=list(job.gpus))
        return {"job_id": job.id}

    async def _cancel(self, job_id: str) -> dict[str, object]:
        if self.runner is not None:
            found = await self.runner.cancel(job_id)
        else:
            found = bool(self.backend.cancel_job(job_id, self.now()))  # type: ignore[attr-defined]
        if not found:
            raise BackendError(f"job {job_id} is not running on this host")
        return {"job_id": job_id}

    def poll_jobs(self) -> None:
        """Turn finished jobs into events (called once per tick)."""
        if self.runner is not None:
            outcomes = self.runner.poll()
        else:
            poll = getattr(self.backend, "poll_jobs", None)
            outcomes = poll(self.now()) if poll is not None else []
        for o in outcomes:
            self._sim_jobs.pop(o.job_id, None)
            self.emit(o.kind, job_id=o.job_id, gpus=list(o.gpus), exit_code=o.exit_code, detail=o.detail,
                      energy_j=o.energy_j)
