"""JetStream setup for the ingest: the two streams, their durable consumers, and the status it reports.

Split out of :mod:`aether_desktop.services.ingest`, which re-exports every name here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import nats.js.errors
from nats.js import api

from aether_protocol import subjects

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestStatus:
    db_ok: bool = True
    nats_ok: bool = True  # connected, and both streams answer pulls
    # GPU samples (and events) in the streams not yet stored: the messages waiting
    # (consumers' pending + unacked), telemetry ones counted at the GPU samples
    # per message seen so far (one each until the first is seen).
    waiting: int = 0
    waiting_messages: int = 0  # the messages themselves
    rows_written: int = 0  # GPU samples newly stored since start
    events_written: int = 0
    duplicates: int = 0  # samples/events skipped because already stored (redelivery, replay)
    rejected: int = 0  # messages that broke the protocol or could not be stored (never stored)
    # The database's error while db_ok is False, else what keeps samples from
    # being stored (a stream that refuses pulls, a failing hook), else None.
    last_error: str | None = None


class RejectCounter:
    """Rejected messages per reason: ProtocolError.reason (``unstorable``: its rows
    could not be built) or ``db_refused`` (PostgreSQL refused it)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self._counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)


StatusCallback = Callable[[IngestStatus], None]


class StatusBoard:
    """The ingest's :class:`IngestStatus`, changed field by field and passed to
    ``on_status`` on every change.

    It also keeps what keeps samples from being stored other than the database
    (by source: "telemetry pull", "events store", ...): while any lasts it is
    in ``last_error`` (unless the database's own error is there) and a refused
    pull makes ``nats_ok`` False; cleared, it goes from both.
    """

    def __init__(self, on_status: StatusCallback | None, connected: Callable[[], bool]) -> None:
        self.status = IngestStatus()
        self._on_status = on_status
        self._connected = connected
        self._problems: dict[str, tuple[str, bool]] = {}  # key -> (text, NATS-side)

    def update(self, **changes: Any) -> None:
        new = replace(self.status, **changes)
        if new == self.status:
            return
        self.status = new
        if self._on_status is not None:
            try:
                self._on_status(new)
            except Exception:  # noqa: BLE001 - a UI callback must not stop storage
                log.exception("on_status callback failed")

    def nats_ok(self) -> bool:
        return self._connected() and not any(nats_side for _, nats_side in self._problems.values())

    def problems(self) -> str | None:
        return "; ".join(text for text, _ in self._problems.values()) or None

    def set_problem(self, key: str, text: str | None, *, nats_side: bool = False) -> None:
        """Report (``text``) or clear (None) one problem; a NATS-side one makes nats_ok False."""
        if text is None:
            if self._problems.pop(key, None) is None:
                return  # the usual case: one dict lookup per batch
        elif self._problems.get(key) == (text, nats_side):
            return
        else:
            self._problems[key] = (text, nats_side)
        changes: dict[str, Any] = {"nats_ok": self.nats_ok()}
        if self.status.db_ok:
            changes["last_error"] = self.problems()
        self.update(**changes)


@dataclass(frozen=True)
class StreamSpec:
    kind: str  # "telemetry" | "events"
    stream: str
    subject: str


def stream_specs(prefix: str) -> tuple[StreamSpec, StreamSpec]:
    subjects.check_prefix(prefix)
    return (
        StreamSpec(
            "telemetry",
            subjects.stream_name(subjects.TELEMETRY_STREAM, prefix),
            subjects.all_telemetry(prefix),
        ),
        StreamSpec(
            "events", subjects.stream_name(subjects.EVENTS_STREAM, prefix), subjects.all_events(prefix)
        ),
    )


async def ensure_stream(
    js: Any, spec: StreamSpec, *, max_age_s: float = 86400.0, duplicate_window_s: float = 120.0
) -> str | None:
    """Create ``spec``'s stream, or bring an existing one to this configuration;
    "created", "updated", or None when it was already as wanted."""
    try:
        info = await js.stream_info(spec.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            api.StreamConfig(
                name=spec.stream,
                subjects=[spec.subject],
                storage=api.StorageType.FILE,
                # LIMITS (not work-queue) retention: live viewers and other stations'
                # durables can read the same messages; max_age bounds the disk.
                retention=api.RetentionPolicy.LIMITS,
                max_age=max_age_s,
                duplicate_window=duplicate_window_s,
            )
        )
        return "created"
    current = info.config
    wanted = {"subjects": [spec.subject], "max_age": max_age_s, "duplicate_window": duplicate_window_s}
    if all(getattr(current, k) == v for k, v in wanted.items()):
        return None
    # From the stream's own configuration: what an operator set (max_bytes,
    # replicas, ...) stays; a bare config would reset it to the defaults.
    await js.update_stream(replace(current, **wanted))
    return "updated"


async def ensure_streams(
    js: Any,
    prefix: str = subjects.DEFAULT_PREFIX,
    *,
    max_age_s: float = 86400.0,
    duplicate_window_s: float = 120.0,
) -> None:
    """Create the two streams, or bring an existing one to this configuration (idempotent)."""
    for spec in stream_specs(prefix):
        await ensure_stream(js, spec, max_age_s=max_age_s, duplicate_window_s=duplicate_window_s)


async def ensure_consumer(js: Any, spec: StreamSpec, durable: str, *, ack_wait_s: float,
                          max_ack_pending: int) -> str | None:
    """Create the durable pull consumer on ``spec``'s stream, or update an existing
    one's ack_wait and max_ack_pending (the settings this side chooses that
    JetStream lets a durable change); "created", "updated" or None."""
    try:
        info = await js.consumer_info(spec.stream, durable)
    except nats.js.errors.NotFoundError:
        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            # Unlimited redeliveries: a message the database could not take
            # yet must never be dropped by the server.
            max_deliver=-1,
            max_ack_pending=max_ack_pending,
            filter_subject=spec.subject,
        )
        await js.add_consumer(spec.stream, config)
        return "created"
    current = info.config
    if current.ack_wait == ack_wait_s and current.max_ack_pending == max_ack_pending:
        return None
    # The rest as it is (a durable's filter and delivery policy cannot change).
    await js.add_consumer(spec.stream, replace(current, ack_wait=ack_wait_s, max_ack_pending=max_ack_pending))
    return "updated"
