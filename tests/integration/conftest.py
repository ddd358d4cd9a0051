"""Fixtures the ingest tests share: a NATS client and an open store, on the servers tests/conftest.py starts.

A test module that needs them set up differently defines its own (it takes precedence).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from aether_desktop.services.store import Store
from tests.servers import NatsProc


@pytest.fixture
async def nc(nats_server: NatsProc) -> AsyncIterator[NatsClient]:
    client = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=5
    )
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[Store]:
    s = Store(pg_dsn)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
