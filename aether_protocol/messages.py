"""Aether wire protocol v1: message types and pure encode/decode functions.

The canonical contract is docs/PROTOCOL.md. Everything here is pure (no I/O)
so agent, station and tests share one implementation.

Validation is done by msgspec while decoding (types, required fields,
patterns, finite numbers, the value ranges storage can hold); a few rules
msgspec cannot express (version, message size) are checked around it. Every
failure becomes a ProtocolError with a short machine-usable ``reason`` so
readers can count rejections per reason.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

import msgspec

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024

# Finite floats only: msgspec's JSON decoder already refuses NaN/Infinity
# literals, but a huge literal such as 1e999 decodes to inf; the bounds reject
# it (and any NaN, since NaN fails every comparison).
Finite = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
NonNeg = Annotated[float, msgspec.Meta(ge=0, le=1e300)]

# Value ranges of what the station stores (docs/PROTOCOL.md, "Value ranges"): a
# value its column cannot hold would otherwise pass here and then fail (or, for
# a binary-COPYed int4, silently wrap) only when the batch is written.
MAX_TS = 253_402_300_799.0  # 9999-12-31T23:59:59Z: PostgreSQL's timestamptz and Python's datetime hold it
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=MAX_TS)]
Count = Annotated[int, msgspec.Meta(ge=0, le=INT8_MAX)]  # seq, pid, ecc_dbe: int8 columns
Index = Annotated[int, msgspec.Meta(ge=0, le=INT4_MAX)]  # GPU indexes, XID codes: int4 columns
ExitCode = Annotated[int, msgspec.Meta(ge=-INT4_MAX - 1, le=INT4_MAX)]
HostId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
ShortStr = Annotated[str, msgspec.Meta(max_length=256)]

GpuState = Literal["ok", "sleeping", "lost"]
HostState = Literal["active", "sleeping"]
THROTTLE_REASONS = (
    "gpu_idle",
    "sw_power_cap",
    "hw_slowdown",
    "sw_thermal",
    "hw_thermal",
    "hw_power_brake",
    "sync_boost",
    "app_clocks",
)
EventKind = Literal[
    "job_started",
    "job_finished",
    "job_failed",
    "job_cancelled",
    "job_rejected",
    "gpu_lost",
    "gpu_recovered",
    "xid",
    "sleep",
    "wake",
    "agent_started",
    "agent_stopping",
]


EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


class ProtocolError(ValueError):
    """A message that breaks the contract. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- telemetry


class Process(msgspec.Struct, frozen=True, omit_defaults=True):
    pid: Count
    name: ShortStr | None = None
    mem_used_mib: NonNeg | None = None


class MigInstance(msgspec.Struct, frozen=True, omit_defaults=True):
    """Optional extension field (v1-compatible): one MIG instance of a GPU."""

    index: Index
    uuid: ShortStr | None = None
    mem_used_mib: NonNeg | None = None
    mem_total_mib: NonNeg | None = None


class GpuSample(msgspec.Struct, frozen=True, omit_defaults=True):
    """One GPU read once in one tick: the frozen snapshot that goes on the wire."""

    index: Index
    uuid: ShortStr
    name: ShortStr
    state: GpuState
    temp_c: Finite | None = None
    mem_used_mib: NonNeg | None = None
    mem_total_mib: NonNeg | None = None
    util_pct: NonNeg | None = None
    mem_util_pct: NonNeg | None = None
    power_w: NonNeg | None = None
    power_limit_w: NonNeg | None = None
    sm_clock_mhz: NonNeg | None = None
    mem_clock_mhz: NonNeg | None = None
    fan_pct: NonNeg | None = None
    energy_j: NonNeg | None = None
    throttle: list[ShortStr] | None = None
    ecc_dbe: Count | None = None
    xid: Index | None = None
    processes: list[Process] | None = None
    # Optional extensions (old readers ignore unknown fields).
    mig: list[MigInstance] | None = None
    slowdown_temp_c: Finite | None = None


class Telemetry(msgspec.Struct, frozen=True, omit_defaults=True):
    v: int
    host: HostId
    boot: ShortStr
    seq: Count
    ts: Timestamp
    state: HostState
    gpus: list[GpuSample]
    interval_s: NonNeg | None = None


# --------------------------------------------------------------------------- events


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    v: int
    host: HostId
    ts: Timestamp
    id: ShortStr
    kind: EventKind
    job_id: ShortStr | None = None
    gpus: list[Index] | None = None
    exit_code: ExitCode | None = None
    detail: Annotated[str, msgspec.Meta(max_length=65536)] | None = None
    # Optional extensions.
    xid: Index | None = None
    energy_j: NonNeg | None = None


# --------------------------------------------------------------------------- commands


# A job's environment variables: names as POSIX shells accept them. The agent sets
# these itself, and a job may never override them: the GPUs it was given and their
# numbering, the PATH its argv[0] is looked up in, and AETHER_* (the job id, the
# agent's own NATS secrets). Station forms refuse them early; agents refuse them always.
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
AGENT_SET_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "PATH"})
AGENT_SET_ENV_PREFIX = "AETHER_"


def agent_sets_env(name: str) -> bool:
    """Whether the agent owns environment variable ``name`` (a job may not set it)."""
    return name in AGENT_SET_ENV or name.startswith(AGENT_SET_ENV_PREFIX)


class JobSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    id: ShortStr
    argv: Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]], msgspec.Meta(min_length=1)]
    gpus: list[Index]
    env: dict[str, str] | None = None
    cwd: ShortStr | None = None
    kind: Literal["training", "inference"] | None = None
    mem_mib: NonNeg | None = None
    expected_s: NonNeg | None = None


class _Cmd(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="op"):
    v: int
    id: ShortStr


class PingCmd(_Cmd, tag="ping", frozen=True, omit_defaults=True):
    pass


class SleepCmd(_Cmd, tag="sleep", frozen=True, omit_defaults=True):
    gpus: list[Index] | None = None


class WakeCmd(_Cmd, tag="wake", frozen=True, omit_defaults=True):
    gpus: list[Index] | None = None


class SetPowerLimitCmd(_Cmd, tag="set_power_limit", frozen=True, omit_defaults=True):
    watts: NonNeg
    gpus: list[Index] | None = None


class RunJobCmd(_Cmd, tag="run_job", frozen=True, omit_defaults=True):
    job: JobSpec


class CancelJobCmd(_Cmd, tag="cancel_job", frozen=True, omit_defaults=True):
    job_id: ShortStr


class JobLogCmd(_Cmd, tag="job_log", frozen=True, omit_defaults=True):
    """Extension op: tail of a job's log file (agents that lack it answer ok:false)."""

    job_id: ShortStr
    max_bytes: Count = 8192


class InjectFaultCmd(_Cmd, tag="inject_fault", frozen=True, omit_defaults=True):
    """Extension op, simulated agents only: start a fault (see headless_agent.faults)."""

    spec: ShortStr


Command = (
    PingCmd | SleepCmd | WakeCmd | SetPowerLimitCmd | RunJobCmd | CancelJobCmd | JobLogCmd | InjectFaultCmd
)
COMMAND_OPS = ("ping", "sleep", "wake", "set_power_limit", "run_job", "cancel_job", "job_log", "inject_fault")


class Reply(msgspec.Struct, frozen=True):
    v: int
    id: str
    ok: bool
    error: str | None = None
    # Optional extension: a small result payload (e.g. a log tail).
    data: dict[str, object] | None = None


# --------------------------------------------------------------------------- codecs

_encoder = msgspec.json.Encoder()
_telemetry_dec = msgspec.json.Decoder(Telemetry)
_event_dec = msgspec.json.Decoder(Event)
_command_dec = msgspec.json.Decoder(Command)
_reply_dec = msgspec.json.Decoder(Reply)


class _IdOnly(msgspec.Struct):
    id: str | None = None
    op: object = None


_id_dec = msgspec.json.Decoder(_IdOnly)


def encode(msg: msgspec.Struct) -> bytes:
    """Encode any protocol message to compact UTF-8 JSON."""
    return _encoder.encode(msg)


def _decode(dec: msgspec.json.Decoder[Any], data: bytes | str) -> Any:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversize", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        msg = dec.decode(data)
    except msgspec.DecodeError as exc:
        text = str(exc)
        if text.startswith("JSON is malformed") or "malformed" in text or "truncated" in text:
            raise ProtocolError("invalid_json", text) from None
        if "required field" in text:
            raise ProtocolError("missing_field", text) from None
        raise ProtocolError("invalid_value", text) from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"v={msg.v!r}")
    return msg


def decode_telemetry(data: bytes | str) -> Telemetry:
    msg = _decode(_telemetry_dec, data)
    assert isinstance(msg, Telemetry)
    return msg


def decode_event(data: bytes | str) -> Event:
    msg = _decode(_event_dec, data)
    assert isinstance(msg, Event)
    return msg


def decode_reply(data: bytes | str) -> Reply:
    msg = _decode(_reply_dec, data)
    assert isinstance(msg, Reply)
    return msg


def decode_command(data: bytes | str) -> Command:
    """Decode a command; an unknown ``op`` gets its own clear reason."""
    try:
        msg = _decode(_command_dec, data)
    except ProtocolError as exc:
        if exc.reason == "invalid_value" and "$.op" in exc.detail:
            op = command_id_and_op(data)[1]
            raise ProtocolError("unknown_op", f"unknown op {op!r}") from None
        raise
    return msg  # type: ignore[no-any-return]


def command_id_and_op(data: bytes | str) -> tuple[str | None, object]:
    """Best-effort id/op of a request that failed to decode, so the reply can carry its id."""
    try:
        if len(data) > MAX_MESSAGE_BYTES:
            return None, None
        raw = _id_dec.decode(data)
    except msgspec.DecodeError:
        return None, None
    return (raw.id if isinstance(raw.id, str) else None), raw.op


def reply(cmd_id: str | None, ok: bool, error: str | None = None, data: dict[str, object] | None = None) -> bytes:
    return encode(Reply(v=PROTOCOL_VERSION, id=cmd_id or "", ok=ok, error=error, data=data))
