"""Bus live-telemetry batching: queueing, chunked decode, delivery, overflow (no network).

The NATS subscription callback is called directly with nats-py ``Msg`` objects, the way
nats-py's dispatch loop calls it; the wire itself is covered by the integration tests.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence

import pytest
from nats.aio.msg import Msg

from aether_desktop.services.bus import Bus
from aether_protocol import GpuSample, Telemetry, encode
from aether_protocol.connection import NatsSettings

UNREACHABLE = NatsSettings(servers=("nats://127.0.0.1:1",))


def telemetry(host: str, seq: int = 0, gpus: int = 2) -> bytes:
    return encode(Telemetry(v=1, host=host, boot="b", seq=seq, ts=1_764_262_800.0 + seq, state="active",
                            gpus=[GpuSample(index=i, uuid=f"GPU-{i}", name="H100", state="ok", temp_c=40.0)
                                  for i in range(gpus)]))


def nats_msg(host: str, data: bytes) -> Msg:
    return Msg(_client=None, subject=f"aether.telemetry.{host}", data=data)  # type: ignore[arg-type]


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[list[Telemetry], float]] = []
        self.singles: list[Telemetry] = []

    def batch(self, msgs: Sequence[Telemetry], received_at: float) -> None:
        self.batches.append((list(msgs), received_at))

    def single(self, msg: Telemetry, received_at: float) -> None:
        self.singles.append(msg)


async def feed(bus: Bus, *msgs: Msg) -> None:
    for m in msgs:
        await bus._on_telemetry_msg(m)


async def test_callback_only_queues_and_process_pending_delivers_in_order() -> None:
    rec = Recorder()
    bus = Bus(UNREACHABLE, on_telemetry=rec.single, on_telemetry_batch=rec.batch)
    await feed(bus, *(nats_msg(f"h{k}", telemetry(f"h{k}", k)) for k in range(5)))
    assert bus.messages == 5 and bus.telemetry_backlog == 5 and not rec.batches
    assert bus.process_pending() == 5
    (msgs, received_at), = rec.batches
    assert [m.host for m in msgs] == [f"h{k}" for k in range(5)] and received_at > 1e9
    assert [m.host for m in rec.singles] == [m.host for m in msgs]
    assert bus.telemetry_backlog == 0


async def test_bad_messages_are_counted_not_delivered() -> None:
    rec = Recorder()
    bus = Bus(UNREACHABLE, on_telemetry_batch=rec.batch)
    await feed(bus, nats_msg("h1", b"{"), nats_msg("h1", telemetry("other")), nats_msg("h1", telemetry("h1")),
               nats_msg("h1", b"[" * 5000))
    bus.process_pending()
    assert [m.host for m in rec.batches[0][0]] == ["h1"]
    assert bus.telemetry_rejects.total == 3
    assert bus.telemetry_rejects.by_reason["host_mismatch"] == 1


async def test_full_queue_drops_oldest_and_counts() -> None:
    rec = Recorder()
    bus = Bus(UNREACHABLE, on_telemetry_batch=rec.batch, queue_limit=3)
    await feed(bus, *(nats_msg("h1", telemetry("h1", seq)) for seq in range(5)))
    assert bus.overflow_drops == 2 and bus.telemetry_backlog == 3
    bus.process_pending()
    assert [m.seq for m in rec.batches[0][0]] == [2, 3, 4]  # the freshest survive


async def test_budget_bounds_a_chunk() -> None:
    rec = Recorder()
    bus = Bus(UNREACHABLE, on_telemetry_batch=rec.batch)
    await feed(bus, *(nats_msg(f"h{k}", telemetry(f"h{k}")) for k in range(40)))
    # With no time left the chunk still makes progress: one clock check's worth (16).
    assert bus.process_pending(budget_s=0.0) == 16
    assert bus.telemetry_backlog == 24


@pytest.mark.parametrize("enabled", [True, False])
async def test_gc_state_is_restored(enabled: bool) -> None:
    bus = Bus(UNREACHABLE, on_telemetry_batch=Recorder().batch)
    await feed(bus, nats_msg("h1", telemetry("h1")))
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        bus.process_pending()
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


async def test_drain_task_delivers_and_survives_a_failing_consumer() -> None:
    got: list[str] = []
    calls = 0

    def flaky(msgs: Sequence[Telemetry], received_at: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("consumer bug")
        got.extend(m.host for m in msgs)

    bus = Bus(UNREACHABLE, on_telemetry_batch=flaky)
    await bus.start()  # no server: the connect loop retries in the background
    try:
        await feed(bus, nats_msg("h1", telemetry("h1")))
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        await feed(bus, nats_msg("h2", telemetry("h2")), nats_msg("h3", telemetry("h3")))
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == ["h2", "h3"] and calls == 2
    finally:
        await bus.stop()
