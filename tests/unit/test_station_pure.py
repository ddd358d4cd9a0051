"""The composition root's pure helpers and its headless sink: no Qt, no network."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aether_desktop.services.bus import Bus
from aether_desktop.station import LogSink, _safe_dsn, failure_summary
from aether_protocol.connection import NatsSettings

NATS_LOG_TAIL = """nats-server exited with code 1 during startup; log /d/nats/nats.log:
[18290] 2026/11/27 20:54:08.168412 [INF]   ID:       NARVHAWJ
[18290] 2026/11/27 20:54:08.169858 [FTL] Error listening on port: 127.0.0.1:4222, "bind: address already in use"
"""


def test_failure_summary_keeps_the_fatal_line_without_pid_or_time() -> None:
    text = failure_summary(RuntimeError(NATS_LOG_TAIL))
    assert text.startswith("nats-server exited with code 1 during startup")
    assert text.endswith('Error listening on port: 127.0.0.1:4222, "bind: address already in use"')
    # A retry that fails the same way (other pid, other time) reads the same: reported once.
    assert failure_summary(RuntimeError(NATS_LOG_TAIL.replace("18290", "18311").replace("20:54", "20:55"))) == text
    assert failure_summary(RuntimeError("binary not found")) == "binary not found"
    assert failure_summary(OSError()) == "OSError"


@pytest.mark.parametrize("dsn,shown", [
    ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("host=h password=secret user=u", "host=h password=*** user=u"),
    ("postgresql:///aether?host=/tmp/x", "postgresql:///aether?host=/tmp/x"),
])
def test_dsn_in_the_log_hides_the_password(dsn: str, shown: str) -> None:
    assert _safe_dsn(dsn) == shown


def test_log_sink_logs_changes_of_state_not_every_backlog_tick(caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink()
    with caplog.at_level(logging.INFO, logger="aether.station"):
        sink.set_db_status(False, 0, "starting embedded PostgreSQL")
        for n in (10, 20, 1_030):
            sink.set_db_status(False, n, f"database unavailable, {n:,} samples waiting")
        sink.set_db_status(True, 0, "")
        for _ in range(3):
            sink.set_connection("reconnecting", "cannot reach nats://x:1")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("INFO", "database: starting embedded PostgreSQL"),
        ("WARNING", "database unavailable, 10 samples waiting"),
        ("INFO", "database ok"),
        ("INFO", "NATS reconnecting: cannot reach nats://x:1"),
    ]


def test_bus_takes_new_settings_before_it_starts() -> None:
    async def go() -> None:
        bus = Bus(NatsSettings(servers=()))
        assert not bus.started
        await bus.reconnect_to(NatsSettings(servers=("nats://127.0.0.1:1",), user="u", password="p"))
        assert bus.settings.servers == ("nats://127.0.0.1:1",) and bus.nc is None and not bus.started
        await bus.stop()

    asyncio.run(go())
