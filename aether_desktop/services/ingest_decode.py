"""The ingest's decode stage: a fetched batch of JetStream messages to the rows it stores.

Pure CPU work (no I/O) run by :mod:`ingest` between fetching and writing; it
yields to the event loop every slice so the writers' round trips are answered
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from nats.aio.msg import Msg

from aether_desktop.services.store_rows import (
    PreparedBatch,
    TelemetryBatch,
    decode_into,
    prepare_events,
    unstorable,
)
from aether_protocol.messages import Event, ProtocolError


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic GC out of a decode burst.

    Decoding a batch allocates tens of thousands of container objects (structs,
    lists) that all live until the batch is stored; each allocation burst
    triggers collections that re-scan them (and everything else alive in the
    station) without ever freeing any: that doubled the decode cost. Pausing
    for one batch (a few milliseconds) only postpones collection; reference
    counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class DecodedBatch:
    """Messages that decoded, and what writing them needs."""

    msgs: list[Msg]
    prepared: PreparedBatch


# Messages decoded between two turns of the event loop: about 5 ms of work, so
# the writers' round trips to PostgreSQL are answered promptly meanwhile
# (decoding a whole batch at once held them, and PostgreSQL, up for 50 ms).
DECODE_SLICE = 200

async def decode_batch(
    msgs: Sequence[Msg], kind: str, slice_size: int = DECODE_SLICE
) -> tuple[list[Msg], list[tuple[Msg, ProtocolError]], PreparedBatch]:
    """(decodable messages, rejected ones with the reason, the batch to write)."""
    good: list[Msg] = []
    bad: list[tuple[Msg, ProtocolError]] = []
    out: TelemetryBatch | list[Event] = TelemetryBatch() if kind == "telemetry" else []
    for i in range(0, len(msgs), slice_size):
        part = msgs[i : i + slice_size]
        with gc_paused():  # no await inside: the pause covers this slice only
            rejected = decode_into([m.data for m in part], out)
        skip = {j for j, _ in rejected}
        good += [m for j, m in enumerate(part) if j not in skip] if skip else part
        bad += [(part[j], err) for j, err in rejected]
        if len(msgs) > slice_size:
            await asyncio.sleep(0)
    if isinstance(out, TelemetryBatch):
        return good, bad, PreparedBatch(out, [], [])
    failed: list[tuple[int, Exception]] = []
    prepared = prepare_events(out, failed)  # out[k] was decoded from good[k]
    if failed:
        bad += [(good[k], unstorable(exc)) for k, exc in failed]
        left_out = {k for k, _ in failed}
        good = [m for k, m in enumerate(good) if k not in left_out]
    return good, bad, prepared
