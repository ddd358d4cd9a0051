"""The dispatcher's pure placement helpers: GPU reservation, pinning and decision checks.

No I/O: the :class:`~aether_desktop.services.dispatcher.Dispatcher` calls these once per
pending job with the fleet's candidates, and they are unit-testable on their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from aether_desktop.services.jobtypes import Decision, GpuCandidate, JobRequest


def reserve(
    candidates: Sequence[GpuCandidate], placed: Iterable[tuple[str | None, Sequence[int], float]]
) -> list[GpuCandidate]:
    """Count placed jobs (dispatched or running) against their GPUs.

    Telemetry alone cannot be trusted for that: two jobs placed in the same tick (or
    before the agent's next sample) would both see the same GPU as free, and a running
    job's process may not be listed at all (CUDA not initialised yet, or a driver that
    does not report processes). A job that telemetry does list is counted twice, which
    only makes a busy GPU look busier.
    """
    extra: dict[tuple[str, int], tuple[int, float]] = {}
    for host, gpus, mem in placed:
        for g in gpus:
            if host is not None:
                n, m = extra.get((host, g), (0, 0.0))
                extra[(host, g)] = (n + 1, m + mem)
    out = []
    for c in candidates:
        n, m = extra.get((c.host, c.index), (0, 0.0))
        out.append(replace(c, running_jobs=c.running_jobs + n, mem_used_mib=c.mem_used_mib + m) if n else c)
    return out


def pinned_candidates(job: JobRequest, candidates: Sequence[GpuCandidate]) -> list[GpuCandidate]:
    """A job pinned to ``host:0,1`` may only be placed there, whatever the placer would prefer."""
    if job.host is None:
        return list(candidates)
    return [c for c in candidates if c.host == job.host and (job.gpus is None or c.index in job.gpus)]


def sleeping_gpus(seen: Sequence[GpuCandidate], d: Decision) -> list[int]:
    """The decision's GPUs that were sleeping when the placer saw them (to wake first)."""
    chosen = set(d.gpus)
    return sorted(c.index for c in seen if c.host == d.host and c.index in chosen and c.state == "sleeping")


def pin_wait(job: JobRequest, cands: Sequence[GpuCandidate]) -> Decision | None:
    """A 'wait' for a pinned job whose pinned GPUs the fleet cannot show now; None to ask the placer.

    Only an online host's own GPU list is trusted to say a pinned GPU does not exist
    (the placer then rejects the job); a host that is unknown or offline may yet come
    back with it.
    """
    if job.host is None:
        return None
    on_host = [c for c in cands if c.host == job.host]
    have = {c.index for c in on_host}
    wanted = set(job.gpus) if job.gpus is not None else set()
    if len(on_host) >= job.num_gpus and wanted <= have:
        return None
    if on_host and any(c.state != "offline" for c in on_host):
        return None  # online and short of GPUs: the placer says why, and rejects
    gpus = ",".join(map(str, job.gpus or ()))
    if on_host:
        return Decision("wait", f"pinned host {job.host} is offline; waiting for it to come back")
    return Decision("wait", f"pinned GPUs {job.host}:{gpus} are not all reported by the fleet")


def check_decision(job: JobRequest, d: Decision) -> Decision:
    """Turn an unusable answer from the placer into a 'wait' that says why."""
    if d.action == "place" and (not d.host or len(d.gpus) != job.num_gpus):
        return Decision("wait", f"scheduler returned an unusable placement ({d.host} {list(d.gpus)}); retrying",
                        candidates=d.candidates)  # fmt: skip
    if d.action == "defer" and d.not_before_ts is None:
        return replace(d, action="wait")
    return d
