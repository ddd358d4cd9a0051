"""The dispatcher's pure command helpers: its lock id, command ids, ``run_job`` and delivery checks.

No I/O: the :class:`~aether_desktop.services.dispatcher.Dispatcher` sends what these build.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

from aether_desktop.services.bus import HostOffline
from aether_desktop.services.jobtypes import JobRequest
from aether_protocol import PROTOCOL_VERSION, JobSpec, RunJobCmd


def lock_key(prefix: str) -> int:
    """The advisory lock id for one deployment (subject prefix): a stable signed bigint."""
    digest = hashlib.blake2b(f"aether-dispatcher:{prefix}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def command_id() -> str:
    return "c-" + uuid.uuid4().hex[:12]


def run_job_command(job: JobRequest, gpus: Sequence[int], cmd_id: str) -> RunJobCmd:
    spec = JobSpec(
        id=job.id, argv=list(job.argv), gpus=list(gpus), env=dict(job.env) or None, cwd=job.cwd,
        kind=job.kind, mem_mib=job.mem_mib or None, expected_s=job.expected_s,
    )  # fmt: skip
    return RunJobCmd(v=PROTOCOL_VERSION, id=cmd_id, job=spec)


def not_delivered(exc: HostOffline) -> bool:
    """True when the request surely never reached an agent (no responders, no NATS).

    A timeout, a connection lost mid-request or an unreadable reply say nothing of
    whether the agent got the command and acted on it.
    """
    return exc.reason.startswith(("no responders", "the station is not connected"))
