"""Parse and validate a job request from text fields (the dialog) or CLI arguments (pure, no I/O).

Both the submission dialog and ``aether submit`` go through :func:`parse_job`, so a
request means the same thing wherever it was typed. Every problem is reported as a
:class:`FieldError` naming the field, so the dialog can show the message next to it
and the CLI can print one line per problem.
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aether_desktop.services.jobtypes import JobKind, JobRequest
from aether_protocol import ENV_NAME_RE, agent_sets_env

# Limits mirror aether_protocol.JobSpec (argv items <= 4096 chars, cwd <= 256) so a
# request accepted here is never refused later by the wire codec.
MAX_ARG_CHARS = 4096
MAX_CWD_CHARS = 256
MAX_GPUS = 64
MAX_PRIORITY = 1_000_000
_HOST_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

FIELDS = ("command", "gpus", "mem", "kind", "expected", "priority", "deadline", "env", "cwd")


@dataclass(frozen=True)
class FieldError:
    field: str  # one of FIELDS
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class JobFields:
    """The raw text of each field, exactly as typed."""

    command: str
    gpus: str = "1"
    mem: str = ""
    kind: str = "training"
    expected: str = "10m"
    priority: str = "0"
    deadline: str = ""
    env: str = ""  # KEY=VALUE, one per line
    cwd: str = ""


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- single fields


def split_command(text: str) -> tuple[str, ...]:
    """Split a command line as a POSIX shell would, without running a shell.

    Shell operators are not interpreted: ``python a.py; rm -rf /`` becomes the argv
    ``["python", "a.py;", "rm", "-rf", "/"]`` and the agent runs ``python`` with those
    arguments.
    """
    try:
        argv = tuple(shlex.split(text, comments=False, posix=True))
    except ValueError as exc:  # unbalanced quotes or a trailing backslash
        raise ValueError(f"cannot split the command line: {exc}") from None
    if not argv:
        raise ValueError("enter the command to run")
    for arg in argv:
        if len(arg) > MAX_ARG_CHARS:
            raise ValueError(f"an argument is longer than {MAX_ARG_CHARS} characters")
        if "\x00" in arg:
            raise ValueError("the command contains a NUL character")
    return argv


_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
# GPU memory is counted in binary units everywhere in the protocol (MiB), so "8G" is 8 GiB.
_MEM_FACTOR_MIB = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024.0}


def parse_memory(text: str) -> float:
    """GPU memory in MiB: ``8G`` (GiB), ``8000M``, ``8000`` (MiB); empty means no requirement."""
    if not text.strip():
        return 0.0
    m = _MEM_RE.match(text)
    if not m:
        raise ValueError("use a size such as 8G, 8000M or 8000 (MiB)")
    value = float(m.group(1)) * _MEM_FACTOR_MIB[m.group(2).upper()]
    if value > 16 * 1024 * 1024:
        raise ValueError("more than 16 TiB of GPU memory is not a real request")
    return value


_DUR_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.IGNORECASE)
_DUR_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90m``, ``2h``, ``1h30m``, ``45s`` or ``1d``."""
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise ValueError("enter a duration such as 90m, 2h or 3600 (seconds)")
    try:
        value = float(s)
    except ValueError:
        parts = _DUR_PART_RE.findall(s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError("use a duration such as 90m, 2h, 1h30m or 3600 (seconds)") from None
        value = sum(float(n) * _DUR_UNIT_S[u] for n, u in parts)
    if not value > 0:
        raise ValueError("the duration must be more than zero")
    if value > 365 * 86400:
        raise ValueError("the duration must be under a year")
    return value


def deadline_example(now: float) -> str:
    """A "finish by" example the operator can copy: tomorrow at 18:00, local time."""
    tomorrow = datetime.fromtimestamp(now).date() + timedelta(days=1)
    return f"{tomorrow.isoformat()}T18:00"


def parse_deadline(text: str, now: float) -> float | None:
    """The "finish by" time: an ISO date-time (local time unless it has an offset) or ``+4h``."""
    s = text.strip()
    if not s:
        return None
    if s.startswith("+"):
        return now + parse_duration(s[1:])
    try:
        when = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"use an ISO date-time such as {deadline_example(now)} or a delay such as +4h") from None
    # A naive time is what the operator reads on their own clock: local time.
    ts = when.astimezone().timestamp() if when.tzinfo is None else when.timestamp()
    if ts <= now:
        raise ValueError("the deadline is in the past")
    return ts


def parse_gpus(text: str) -> tuple[int, str | None, tuple[int, ...] | None]:
    """``2`` (any two GPUs on one host) or ``host:0,1`` (those GPUs): (count, host, indices)."""
    s = text.strip()
    if not s:
        raise ValueError("enter a number of GPUs or specific GPUs as host:0,1")
    if ":" not in s:
        try:
            count = int(s)
        except ValueError:
            raise ValueError("enter a number of GPUs, or specific GPUs as host:0,1") from None
        if not 1 <= count <= MAX_GPUS:
            raise ValueError(f"the number of GPUs must be 1 to {MAX_GPUS}")
        return count, None, None
    host, _, rest = s.partition(":")
    host = host.strip()
    if not _HOST_RE.match(host):
        raise ValueError(f"{host!r} is not a host id (1-64 characters of A-Z a-z 0-9 _ -)")
    try:
        indices = tuple(int(p) for p in rest.split(",") if p.strip())
    except ValueError:
        raise ValueError("GPU indices must be whole numbers separated by commas, e.g. host:0,1") from None
    if not indices:
        raise ValueError("list the GPU indices after the host, e.g. host:0,1")
    if any(i < 0 for i in indices):
        raise ValueError("GPU indices cannot be negative")
    if len(set(indices)) != len(indices):
        raise ValueError("a GPU index is listed twice")
    if len(indices) > MAX_GPUS:
        raise ValueError(f"at most {MAX_GPUS} GPUs")
    return len(indices), host, tuple(sorted(indices))


def parse_env(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped."""
    env: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"line {n}: expected KEY=VALUE")
        if not ENV_NAME_RE.match(key):
            raise ValueError(f"line {n}: {key!r} is not a valid variable name (letters, digits, _)")
        # Every agent refuses what it sets itself, so the form does too. (Loader and interpreter
        # hooks such as LD_AUDIT are the agents' call: an operator may allow them on a host.)
        if agent_sets_env(key):
            raise ValueError(f"line {n}: {key} is set by the agent (GPUs, program path, job id)")
        if key in env:
            raise ValueError(f"line {n}: {key} is set twice")
        if "\x00" in value:
            raise ValueError(f"line {n}: the value contains a NUL character")
        env[key] = value
    return env


def parse_priority(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("the priority must be a whole number (higher runs first)") from None
    if abs(value) > MAX_PRIORITY:
        raise ValueError(f"the priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
    return value


def parse_cwd(text: str) -> str | None:
    s = text.strip()
    if not s:
        return None
    # The directory is on the GPU host, so it cannot be checked here; a relative path
    # would depend on wherever the agent happens to run.
    if not s.startswith("/"):
        raise ValueError("the working directory must be an absolute path on the GPU host")
    if len(s) > MAX_CWD_CHARS:
        raise ValueError(f"the working directory must be at most {MAX_CWD_CHARS} characters")
    return s


def parse_kind(text: str) -> JobKind:
    s = text.strip().lower()
    if s == "training":
        return "training"
    if s == "inference":
        return "inference"
    raise ValueError("the kind must be training or inference")


# --------------------------------------------------------------------------- whole request


def parse_job(fields: JobFields, *, now: float, job_id: str | None = None) -> JobRequest | list[FieldError]:
    """A valid JobRequest, or every field error at once (never just the first)."""
    errors: list[FieldError] = []

    def field(name: str, fn: Callable[..., Any], *args: object) -> Any:
        try:
            return fn(*args)
        except ValueError as exc:
            errors.append(FieldError(name, str(exc)))
            return None

    argv: tuple[str, ...] | None = field("command", split_command, fields.command)
    gpus: tuple[int, str | None, tuple[int, ...] | None] | None = field("gpus", parse_gpus, fields.gpus)
    mem: float | None = field("mem", parse_memory, fields.mem)
    kind: JobKind | None = field("kind", parse_kind, fields.kind)
    expected: float | None = field("expected", parse_duration, fields.expected)
    priority: int | None = field("priority", parse_priority, fields.priority)
    deadline: float | None = field("deadline", parse_deadline, fields.deadline, now)
    env: dict[str, str] | None = field("env", parse_env, fields.env)
    cwd: str | None = field("cwd", parse_cwd, fields.cwd)

    if deadline is not None and expected is not None and deadline < now + expected:
        errors.append(
            FieldError("deadline", "the deadline is sooner than the expected duration: it could never be met")
        )
    if errors:
        return errors
    assert argv is not None and gpus is not None and mem is not None and kind is not None
    assert expected is not None and priority is not None and env is not None
    num_gpus, host, indices = gpus
    return JobRequest(
        id=job_id or new_job_id(),
        argv=argv,
        num_gpus=num_gpus,
        host=host,
        gpus=indices,
        mem_mib=mem,
        kind=kind,
        expected_s=expected,
        priority=priority,
        deadline_ts=deadline,
        env=env,
        cwd=cwd,
        submitted_ts=now,
    )


def errors_by_field(errors: list[FieldError]) -> dict[str, str]:
    """One message per field (joined when a field has several), for inline display."""
    out: dict[str, str] = {}
    for e in errors:
        out[e.field] = f"{out[e.field]}; {e.message}" if e.field in out else e.message
    return out


def argv_display(argv: tuple[str, ...]) -> str:
    """The argv as a copy-pastable line (quoted the way shlex would split it back)."""
    return shlex.join(argv)


def fields_from_request(req: JobRequest) -> JobFields:
    """The text fields that parse back to ``req`` (to edit a copy of an earlier job)."""
    gpus = f"{req.host}:{','.join(map(str, req.gpus))}" if req.host and req.gpus else str(req.num_gpus)
    return JobFields(
        command=shlex.join(req.argv),
        gpus=gpus,
        mem=f"{req.mem_mib:g}" if req.mem_mib else "",
        kind=req.kind,
        expected=f"{req.expected_s:g}",
        priority=str(req.priority),
        deadline="",  # an old deadline is usually past; the operator sets a new one
        env="\n".join(f"{k}={v}" for k, v in req.env.items()),
        cwd=req.cwd or "",
    )
