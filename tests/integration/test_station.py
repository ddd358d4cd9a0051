"""The whole station without a window: real nats-server, real PostgreSQL, real agent processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from aether_desktop.config import StationConfig
from aether_desktop.station import Station
from aether_desktop.wiring import wire_services
from tests.integration.agent_proc import start_agent, stop_agent
from tests.servers import free_port

pytestmark = pytest.mark.integration


class Sink:
    def __init__(self) -> None:
        self.connection: list[tuple[str, str]] = []
        self.db: list[tuple[bool, int, str]] = []
        self.notices: list[tuple[str, str]] = []

    def set_connection(self, state: str, detail: str) -> None:
        self.connection.append((state, detail))

    def set_db_status(self, ok: bool, waiting: int, detail: str) -> None:
        self.db.append((ok, waiting, detail))

    def post_notice(self, level: str, text: str) -> None:
        self.notices.append((level, text))


async def wait_for(pred, timeout: float = 40.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred() if asyncio.iscoroutinefunction(pred) else pred():
            return True
        await asyncio.sleep(0.2)
    return False


async def test_station_shows_a_hand_started_agent_and_stores_its_history(
        nats_url: str, pg_dsn: str, tmp_path: Path) -> None:
    cfg = StationConfig(nats_servers=(nats_url,), db_dsn=pg_dsn, data_dir=tmp_path / "data")
    sink = Sink()
    station = Station(cfg, sink)
    wire_services(station)
    await station.start()
    agent = start_agent(nats_url, "hand-01", "--simulate", "3", "--interval", "0.5", log=tmp_path / "a.log")
    try:
        # (Slots may appear a moment before the first live message: the database backfill
        # lists GPUs it has stored, shown offline until they report.)
        assert await wait_for(
            lambda: station.fleet.n_slots == 3 and station.fleet.host_online("hand-01", time.time())
        ), (tmp_path / "a.log").read_text()
        assert await station.wait_db(60)

        async def stored() -> bool:
            async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
                cur = await conn.execute("SELECT count(DISTINCT seq), count(*) FROM telemetry WHERE host='hand-01'")
                seqs, rows = await cur.fetchone()  # type: ignore[misc]
                return bool(seqs >= 4 and rows == seqs * 3)

        assert await wait_for(stored, timeout=60)
        ok, text = await station.bus.send("hand-01", "sleep", [1])  # type: ignore[union-attr]
        assert ok, text
        now = time.time()
        hist = await station.history.fetch([("hand-01", 0)], now - 300, now + 5, ["temp_c", "power_w"])
        ts, vals = hist[("hand-01", 0)]["temp_c"]
        assert len(ts) >= 3 and len(ts) == len(vals)
    finally:
        stop_agent(agent)
    # No telemetry for 3 intervals: the host is shown offline.
    assert await wait_for(lambda: not station.fleet.host_online("hand-01", time.time()), timeout=20)
    await station.stop()
    assert any(state == "connected" for state, _ in sink.connection)
    assert any(ok for ok, _, _ in sink.db)

    # Restarted, with the agent gone: the live view is refilled from the database.
    again = Station(cfg, Sink())
    wire_services(again)
    await again.start()
    try:
        assert await wait_for(lambda: again.fleet.n_slots >= 3, timeout=60)
        rows = [again.fleet.row_of(("hand-01", i)) for i in range(3)]
        assert None not in rows
        temps = again.fleet.matrix("temp_c", time.time(), rows)
        # Seconds of GPUs 0 and 2 (GPU 1 was put to sleep above and reports no temperature).
        assert (np.isfinite(temps[[0, 2]]).sum(axis=1) >= 2).all(), np.isfinite(temps).sum(axis=1)
        assert not again.fleet.host_online("hand-01", time.time())
        assert np.isfinite(again.fleet.latest("power_w")[rows]).all()  # the last stored values
    finally:
        await again.stop()


async def test_station_without_database_keeps_the_live_view(nats_url: str, tmp_path: Path) -> None:
    cfg = StationConfig(nats_servers=(nats_url,), no_db=True, data_dir=tmp_path / "data")
    sink = Sink()
    station = Station(cfg, sink)
    await station.start()
    agent = start_agent(nats_url, "live-01", "--simulate", "2", "--interval", "0.5")
    try:
        assert await wait_for(lambda: station.fleet.n_slots == 2)
    finally:
        stop_agent(agent)
        await station.stop()
    assert sink.db[-1][0] is True and "off" in sink.db[-1][2]


async def test_station_reports_an_unreachable_database_and_keeps_running(nats_url: str, tmp_path: Path) -> None:
    cfg = StationConfig(nats_servers=(nats_url,), db_dsn="postgresql://nobody@127.0.0.1:1/none",
                        data_dir=tmp_path / "data")
    sink = Sink()
    station = Station(cfg, sink)
    wire_services(station)
    await station.start()
    agent = start_agent(nats_url, "nodb-01", "--simulate", "1", "--interval", "0.5")
    try:
        assert await wait_for(lambda: station.fleet.n_slots == 1)
        assert await wait_for(lambda: any(not ok and "unavailable" in d for ok, _, d in sink.db), timeout=20)
    finally:
        stop_agent(agent)
        await station.stop()


def _embedded_pid(data_dir: Path) -> int:
    return int(json.loads((data_dir / "nats" / "server.json").read_text())["pid"])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_station_restarts_its_embedded_nats_server_when_it_dies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = StationConfig(no_db=True, data_dir=data, demo_hosts=1, demo_gpus=2)
    sink = Sink()
    station = Station(cfg, sink)
    arrivals: list[float] = []
    station.add_telemetry_listener(lambda _msg, at: arrivals.append(at))
    await station.start()
    try:
        assert await wait_for(lambda: station.fleet.n_slots == 2)
        first_url, first_pid = station.nats_servers[0], _embedded_pid(data)
        agent_pid = station.demo.procs["demo-01"].pid  # type: ignore[union-attr]
        os.kill(first_pid, signal.SIGKILL)
        assert await wait_for(lambda: any("started it again" in t for _, t in sink.notices), timeout=30), sink.notices
        # Back on its previous port: the bus and the demo agent reconnect by themselves (the
        # agent keeps running, with what it buffered meanwhile), and the live view flows again.
        assert station.nats_servers[0] == first_url
        assert await wait_for(lambda: station.bus.state == "connected", timeout=15)  # type: ignore[union-attr]
        assert station.demo.procs["demo-01"].pid == agent_pid  # type: ignore[union-attr]
        restarted = time.time()
        assert await wait_for(lambda: arrivals and arrivals[-1] > restarted, timeout=20)
    finally:
        await station.stop()
    assert _gone(_embedded_pid(data)) if (data / "nats" / "server.json").exists() else True
    assert _gone(agent_pid)


async def test_station_follows_its_embedded_server_to_a_new_port(tmp_path: Path) -> None:
    data = tmp_path / "data"
    station = Station(StationConfig(no_db=True, data_dir=data, demo_hosts=1, demo_gpus=1), Sink())
    arrivals: list[float] = []
    station.add_telemetry_listener(lambda _msg, at: arrivals.append(at))
    await station.start()
    squatter = socket.socket()
    try:
        assert await wait_for(lambda: station.fleet.n_slots == 1)
        first_url = station.nats_servers[0]
        agent_pid = station.demo.procs["demo-01"].pid  # type: ignore[union-attr]
        os.kill(_embedded_pid(data), signal.SIGKILL)
        # Someone takes the old port before the station restarts the server (its watchdog
        # looks every 2 s), as soon as the killed server has let go of it.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(100):
            try:
                squatter.bind(("127.0.0.1", int(first_url.rsplit(":", 1)[1])))
                break
            except OSError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("the killed server's port did not come free within 1 s")
        squatter.listen()
        assert await wait_for(lambda: station.nats_servers[0] != first_url, timeout=30)
        assert await wait_for(lambda: station.bus.state == "connected", timeout=15)  # type: ignore[union-attr]
        # The demo agent was restarted against the new URL, and the live view flows again.
        assert await wait_for(lambda: station.demo.procs["demo-01"].pid != agent_pid, timeout=15)  # type: ignore[union-attr]
        moved = time.time()
        assert await wait_for(lambda: arrivals and arrivals[-1] > moved, timeout=20)
    finally:
        squatter.close()
        await station.stop()


async def test_station_keeps_running_when_the_embedded_server_cannot_start(tmp_path: Path) -> None:
    port = free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    cfg = StationConfig(no_db=True, data_dir=tmp_path / "data", embedded_port=port, demo_hosts=1, demo_gpus=1)
    sink = Sink()
    station = Station(cfg, sink)
    try:
        await station.start()  # does not raise: the operator is told, the station keeps running
        assert sink.connection[-1][0] == "closed" and "address already in use" in sink.connection[-1][1]
        assert any(level == "error" and "could not start" in text for level, text in sink.notices)
        assert station.demo is None  # deferred until the server is up
        blocker.close()  # the port frees up: the watchdog starts the server, then the demo fleet
        assert await wait_for(lambda: station.bus.state == "connected", timeout=30)  # type: ignore[union-attr]
        assert await wait_for(lambda: station.fleet.n_slots == 1, timeout=30)
        assert station.nats_servers == (f"nats://127.0.0.1:{port}",)
    finally:
        blocker.close()
        await station.stop()
