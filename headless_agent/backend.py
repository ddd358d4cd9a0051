"""The GPU backend interface: NVML on real hosts, a simulated fleet elsewhere.

An agent reads every GPU once per tick through ``read()`` and publishes the
frozen ``GpuSample`` snapshots it returns as they are. Control calls raise
``BackendError`` with a message fit for an ``ok:false`` reply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aether_protocol import GpuSample, JobSpec


class BackendError(RuntimeError):
    """A control request the backend cannot honour; the message is shown to the operator."""


class PartialControlError(BackendError):
    """A control call on several GPUs that took effect on some of them (``done``) and failed on others.

    The agent still reports the GPUs that changed (a ``sleep`` event for those that went to sleep),
    so the station's picture matches the host even though the request as a whole failed.
    """

    def __init__(self, message: str, done: Sequence[int]) -> None:
        super().__init__(message)
        self.done = tuple(done)


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended: reported by the job runner as an event."""

    job_id: str
    gpus: tuple[int, ...]
    kind: str  # "job_finished" | "job_failed" | "job_cancelled"
    exit_code: int | None
    detail: str | None = None
    energy_j: float | None = None


JobCallback = Callable[[JobOutcome], None]


class GpuBackend(Protocol):
    """What the agent needs from a source of GPUs."""

    def gpu_count(self) -> int: ...

    def read(self, now: float) -> list[GpuSample]:
        """Read every GPU once. A GPU that fails is returned with state 'lost', never dropped."""
        ...

    def sleep(self, gpus: Sequence[int] | None) -> None: ...

    def wake(self, gpus: Sequence[int] | None) -> None: ...

    def set_power_limit(self, gpus: Sequence[int] | None, watts: float) -> None: ...

    def close(self) -> None: ...


class SimulatedJobs(Protocol):
    """Optional capability of a simulated backend: jobs that load simulated GPUs."""

    def start_job(self, job: JobSpec, now: float) -> None: ...

    def cancel_job(self, job_id: str, now: float) -> bool: ...

    def poll_jobs(self, now: float) -> list[JobOutcome]: ...

    def inject_fault(self, spec: str, now: float) -> None: ...


def resolve_gpus(gpus: Sequence[int] | None, count: int) -> list[int]:
    """``None`` means every GPU; an index out of range is a BackendError."""
    if gpus is None:
        return list(range(count))
    bad = [g for g in gpus if g < 0 or g >= count]
    if bad:
        raise BackendError(f"no GPU with index {bad[0]} on this host (it has {count})")
    return list(dict.fromkeys(gpus))
