"""PullConsumer against a real nats-server (JetStream): batches, prefetch, statuses, close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api

from aether_desktop.services.pull_consumer import PullConsumer
from tests.servers import NatsProc

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(nats_server: NatsProc) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        await js.add_stream(api.StreamConfig(name="S", subjects=["s.>"]))
        config = api.ConsumerConfig(durable_name="d", ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=1000)
        await js.add_consumer("S", config)
        yield client
    finally:
        await client.close()


async def publish(nc: NatsClient, n: int, start: int = 0) -> None:
    js = nc.jetstream()
    for i in range(start, start + n):
        await js.publish("s.x", str(i).encode())


async def test_batches_in_order_prefetched_and_acked(nc: NatsClient) -> None:
    await publish(nc, 25)
    pc = PullConsumer(nc, "S", "d")
    await pc.subscribe()
    try:
        first, status = await pc.fetch(10, 0.5)
        assert status is None and [m.data for m in first] == [str(i).encode() for i in range(10)]
        t = time.monotonic()
        second, _ = await pc.fetch(10, 0.5)  # prefetched while the first was "processed"
        third, _ = await pc.fetch(10, 0.5)  # only 5 left: handed out at once, not after a wait
        assert time.monotonic() - t < 0.4
        assert [m.data for m in second + third] == [str(i).encode() for i in range(10, 25)]
        for m in first + second + third:
            await m.ack()
        empty, status = await pc.fetch(10, 0.3)  # nothing there: a quiet expiry, no error
        assert empty == [] and status is None
        await publish(nc, 3, 25)
        late, _ = await pc.fetch(10, 0.5)  # a lingering pull delivers what arrives meanwhile
        assert [m.data for m in late] == [b"25", b"26", b"27"]
    finally:
        await pc.close()


async def test_close_naks_what_was_never_handed_out(nc: NatsClient) -> None:
    await publish(nc, 20)
    pc = PullConsumer(nc, "S", "d")
    await pc.subscribe()
    got, _ = await pc.fetch(5, 0.5)  # and 5 more are prefetched
    await pc.close()
    again = PullConsumer(nc, "S", "d")
    await again.subscribe()
    try:
        # The 5 handed out (never acked) wait for ack_wait; the prefetched ones come back at once.
        seen: list[bytes] = []
        for _ in range(3):
            msgs, _ = await again.fetch(20, 0.3)
            seen += [m.data for m in msgs]
        assert sorted(seen, key=int) == [str(i).encode() for i in range(5, 20)]
        assert [m.data for m in got] == [str(i).encode() for i in range(5)]
    finally:
        await again.close()


async def test_deleted_consumer_is_reported_not_hung(nc: NatsClient) -> None:
    pc = PullConsumer(nc, "S", "d")
    await pc.subscribe()
    try:
        await nc.jetstream().delete_consumer("S", "d")
        msgs, status = await asyncio.wait_for(pc.fetch(10, 0.3), 5)
        assert msgs == []
        assert status is not None and not status.startswith(("404", "408"))
    finally:
        await pc.close()
