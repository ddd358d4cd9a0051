"""Alerts and anomaly-model metadata in a real PostgreSQL; retraining from stored telemetry."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from aether_desktop.services.alerts import AlertManager
from aether_desktop.services.alerts_store import AlertRepository, AlertWriter
from aether_desktop.services.anomaly import (
    ModelStore,
    bootstrap,
    load_history_ticks,
    retrain_async,
    simulated_messages,
)
from aether_desktop.services.rules import Finding
from aether_desktop.services.store import apply_migrations

pytestmark = pytest.mark.integration
T0 = 1_764_000_000.0


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[AsyncConnectionPool]:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await apply_migrations(conn)
    async with AsyncConnectionPool(pg_dsn, min_size=1, max_size=4, open=False) as p:
        yield p


def _raise(m: AlertManager, host: str, gpus: range, t: float) -> None:
    for k in range(3):
        seen = {(host, g): t + k for g in gpus}
        m.update(t + k, seen, [Finding(host, g, t + k, "model", "thermal_anomaly", "warning", "model", 0.8, "hot")
                               for g in gpus])


async def test_writer_persists_raise_ack_and_clear(pool: AsyncConnectionPool) -> None:
    ids = itertools.count()
    m = AlertManager(id_factory=lambda: f"00000000-0000-0000-0000-{next(ids):012d}")
    repo = AlertRepository(pool)
    writer = AlertWriter(repo, m, model_version=lambda: "v7")
    task = asyncio.create_task(writer.run())
    try:
        _raise(m, "node-1", range(4), T0)
        _raise(m, "node-2", range(1), T0)
        await writer.flush()
        stored = await repo.load_open()
        assert {(a.host, a.gpus) for a in stored} == {("node-1", (0, 1, 2, 3)), ("node-2", (0,))}
        a1 = next(a for a in stored if a.host == "node-1")
        assert a1.first_ts == T0 and a1.kind == "thermal_anomaly"
        m.acknowledge(a1.id, T0 + 10)
        await writer.flush()
        [acked] = await repo.recent(host="node-1")
        assert acked.state == "acknowledged" and acked.acked_ts == T0 + 10
        m.update(T0 + 1000, {("node-1", g): T0 + 1000 for g in range(4)}, [])
        await writer.flush()
        assert [a.host for a in await repo.load_open()] == ["node-2"]
        [cleared] = await repo.recent(state="cleared")
        assert cleared.id == a1.id and cleared.cleared_ts == T0 + 1000
        # A restart picks the open alerts up again, acknowledgements included.
        m2 = AlertManager()
        m2.restore(await repo.load_open(), now=T0 + 1001)
        assert [a.host for a in m2.open_alerts()] == ["node-2"]
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT DISTINCT model_version FROM alerts")
            assert await cur.fetchall() == [("v7",)]
    finally:
        task.cancel()


async def test_model_history_retrain_from_stored_telemetry(pool: AsyncConnectionPool, tmp_path: Path) -> None:
    ticks = list(simulated_messages(1, 4, 3700, seed=21, start_ts=T0))
    tel, procs, inv = [], [], {}
    for tick in ticks:
        for msg in tick:
            ts = datetime.fromtimestamp(msg.ts, tz=UTC)
            for g in msg.gpus:
                inv[(msg.host, g.index)] = (msg.host, g.index, g.uuid, g.name, g.mem_total_mib, ts, ts)
                tel.append((msg.host, g.index, g.uuid, ts, msg.boot, msg.seq, msg.state, g.state, g.temp_c,
                            g.mem_used_mib, g.mem_total_mib, g.util_pct, g.power_w, g.power_limit_w,
                            g.sm_clock_mhz, g.ecc_dbe, g.xid, g.slowdown_temp_c))
                procs += [(msg.host, msg.boot, msg.seq, g.index, ts, p.pid, p.name, p.mem_used_mib)
                          for p in g.processes or ()]
    async with pool.connection() as conn, conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO telemetry (host, gpu_index, gpu_uuid, ts, boot, seq, host_state, state, temp_c, "
            "mem_used_mib, mem_total_mib, util_pct, power_w, power_limit_w, sm_clock_mhz, ecc_dbe, xid, "
            "slowdown_temp_c) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", tel)
        await cur.executemany("INSERT INTO gpu_processes (host, boot, seq, gpu_index, ts, pid, name, mem_used_mib) "
                              "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", procs)
        await cur.executemany("INSERT INTO gpus (host, gpu_index, uuid, name, mem_total_mib, first_seen, last_seen) "
                              "VALUES (%s, %s, %s, %s, %s, %s, %s)", list(inv.values()))
    loaded = await load_history_ticks(pool, T0, T0 + 3700)
    assert len(loaded) == 3700
    used = ("index", "name", "state", "temp_c", "power_w", "util_pct", "mem_used_mib", "sm_clock_mhz",
            "slowdown_temp_c", "ecc_dbe", "xid")
    for got, want in zip(loaded[100][0].gpus, ticks[100][0].gpus, strict=True):
        assert [getattr(got, f) for f in used] == [getattr(want, f) for f in used]
        assert [(p.pid, p.mem_used_mib) for p in got.processes or ()] == [
            (p.pid, p.mem_used_mib) for p in sorted(want.processes or (), key=lambda p: p.pid)]

    base = bootstrap(seed=1, hosts=1, gpus=4, seconds=900, model="H100")
    store = ModelStore(tmp_path)
    store.save(base)
    stages: list[float] = []
    model = await retrain_async(loaded, base, store, progress=lambda f, _s: stages.append(f))
    assert model.version == "v2" and model.info["origin"] == "history"
    assert model.info["train_from"] == T0 and stages[-1] == 1.0
    await AlertRepository(pool).save_model_info(model.info)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT version, origin, n_samples > 0 FROM anomaly_models")
        assert await cur.fetchall() == [("v2", "history", True)]


async def test_alerts_raised_before_the_database_opens_are_stored(pool: AsyncConnectionPool, tmp_path: Path
                                                                  ) -> None:
    from types import SimpleNamespace

    from aether_desktop.services.detection import AlertsRuntime

    rt = AlertsRuntime(tmp_path, clock=lambda: T0 + 5)
    restored: list[list[str]] = []
    rt.manager.on_alerts_restored.connect(lambda alerts: restored.append([a.kind for a in alerts]))
    history: list[int] = []
    rt.on_history.connect(lambda alerts: history.append(len(alerts)))
    # The database is still starting: a GPU falls off the bus; another host's XID comes and goes.
    rt.manager.update(T0, {("pre-1", 3): T0, ("pre-2", 0): T0}, [
        Finding("pre-1", 3, T0, "gpu_lost", "gpu_lost", "critical", "rule", 1.0, "GPU 3 lost"),
        Finding("pre-2", 0, T0, "xid", "xid", "critical", "rule", 79.0, "XID 79")])
    rt.manager.update(T0 + 400, {("pre-2", 0): T0 + 400}, [])
    await rt.open_db(SimpleNamespace(pool=pool))
    try:
        await asyncio.wait_for(rt._writer.flush(), 10.0)
        async with pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT host, kind, state FROM alerts WHERE host LIKE 'pre-%' ORDER BY host")).fetchall()
        assert rows == [("pre-1", "gpu_lost", "active"), ("pre-2", "xid", "cleared")]
        assert history and restored == []  # nothing was open in the database; history was loaded
    finally:
        await rt.stop()
