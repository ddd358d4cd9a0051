"""JetStream setup for the ingest: the two streams, their durable consumers, and the status it reports.

Split out of :mod:`aether_desktop.services.ingest`, which re-exports every name here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js import api

from aether_protocol import subjects


@dataclass(frozen=True)
class IngestStatus:
    db_ok: bool = True
    nats_ok: bool = True
    waiting: int = 0  # messages in the streams not yet stored (consumers' pending + unacked)
    rows_written: int = 0  # GPU samples newly stored since start
    events_written: int = 0
    duplicates: int = 0  # samples/events skipped because already stored (redelivery, replay)
    rejected: int = 0  # messages that broke the protocol (never stored)
    last_error: str | None = None


class RejectCounter:
    """Rejected messages per reason (ProtocolError.reason, or ``db_refused``)."""

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


async def ensure_streams(
    js: Any,
    prefix: str = subjects.DEFAULT_PREFIX,
    *,
    max_age_s: float = 86400.0,
    duplicate_window_s: float = 120.0,
) -> None:
    """Create the two streams, or bring an existing one to this configuration (idempotent)."""
    for spec in stream_specs(prefix):
        config = api.StreamConfig(
            name=spec.stream,
            subjects=[spec.subject],
            storage=api.StorageType.FILE,
            # LIMITS (not work-queue) retention: live viewers and other stations'
            # durables can read the same messages; max_age bounds the disk.
            retention=api.RetentionPolicy.LIMITS,
            max_age=max_age_s,
            duplicate_window=duplicate_window_s,
        )
        try:
            info = await js.stream_info(spec.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            continue
        current = info.config
        if (
            current.subjects != config.subjects
            or current.max_age != config.max_age
            or current.duplicate_window != config.duplicate_window
        ):
            await js.update_stream(config)


async def ensure_consumer(js: Any, spec: StreamSpec, durable: str, *, ack_wait_s: float,
                          max_ack_pending: int) -> None:
    """Create the durable pull consumer on ``spec``'s stream; an existing one is used as it is."""
    config = api.ConsumerConfig(
        durable_name=durable,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        # Unlimited redeliveries: a message the database could not take
        # yet must never be dropped by the server.
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
    )
    try:
        # An existing durable is used as it is (as pull_subscribe does).
        await js.consumer_info(spec.stream, durable)
    except nats.js.errors.NotFoundError:
        config.filter_subject = spec.subject
        await js.add_consumer(spec.stream, config)
