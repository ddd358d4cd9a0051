"""Store + History against a real PostgreSQL: migrations, idempotent writes,
inventory, event hooks, rollups, history fetch (raw and rollup), CSV export,
retention."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import re
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pytest

from aether_desktop.services.history import History
from aether_desktop.services.history_sql import fetch_sql, rollup_buckets_sql
from aether_desktop.services.store import (
    MIGRATIONS_DIR,
    Store,
    apply_migrations,
    compression_settings,
    discover_migrations,
)
from aether_protocol.messages import Event, GpuSample, Process, Telemetry

pytestmark = pytest.mark.integration

T0 = 1_764_000_000.0  # a minute boundary


def sample(host: str, seq: int, ts: float, *, gpus: int = 2, boot: str = "b1") -> Telemetry:
    return Telemetry(
        v=1,
        host=host,
        boot=boot,
        seq=seq,
        ts=ts,
        state="active",
        gpus=[
            GpuSample(
                index=i,
                uuid=f"GPU-{host}-{i}",
                name="NVIDIA H100",
                state="ok",
                temp_c=40.0 + i + (seq % 10),
                util_pct=float(seq % 100),
                power_w=100.0 + i,
                mem_used_mib=1000.0,
                mem_total_mib=81559.0,
                energy_j=1e9 + seq,
                throttle=["sw_power_cap", "hw_slowdown"] if seq % 2 else None,
                xid=79 if seq == 3 else None,
            )
            for i in range(gpus)
        ],
    )


async def scalar(dsn: str, sql: str) -> object:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql.encode())
        row = await cur.fetchone()
    return row[0] if row else None


# --------------------------------------------------------------------------- migrations


async def test_migrations_from_empty_database(pg_dsn: str) -> None:
    s = Store(pg_dsn)
    await s.open()
    await s.close()
    every = [m.version for m in discover_migrations()]
    assert s.migrations_applied == every  # the whole folder, other teams' files included
    again = Store(pg_dsn)
    await again.open()  # a second start applies nothing
    await again.close()
    assert again.migrations_applied == []
    assert await scalar(pg_dsn, "SELECT count(*) FROM schema_migrations") == len(every)


def migrations_up_to(tmp_path: Path, last: int) -> Path:
    """A folder holding this project's migrations 001..``last``: an older release's schema."""
    old = tmp_path / "old"
    old.mkdir()
    for m in discover_migrations():
        if m.version <= last:
            shutil.copy(m.path, old / m.path.name)
    return old


async def test_timescaledb_compression_covers_the_unique_key(store: Store, pg_dsn: str) -> None:
    """TimescaleDB refuses compression settings that leave a unique-key column
    out of both segmentby and orderby; the settings come from the real key."""
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        segment_by, order_by = await compression_settings(conn, "telemetry")
        cur = await conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'telemetry'::regclass AND indisunique"
        )
        keys = [str(r[0]) for r in await cur.fetchall()]
    assert (segment_by, order_by) == ("host, gpu_index", "ts, boot, seq")
    covered = {c.strip() for c in f"{segment_by}, {order_by}".split(",")}
    for key in keys:  # e.g. "... USING btree (host, gpu_index, ts, boot, seq)"
        assert set(key.rsplit("(", 1)[1].rstrip(")").replace(" ", "").split(",")) <= covered, key


@contextlib.asynccontextmanager
async def older_schema(pg_dsn: str, tmp_path: Path, last: int) -> AsyncIterator[psycopg.AsyncConnection]:
    """An autocommit connection to a database at an older release's schema (migrations 001..``last``)."""
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await apply_migrations(conn, migrations_up_to(tmp_path, last))
        yield conn


async def test_upgrade_from_older_schema(pg_dsn: str, tmp_path: Path) -> None:
    old = migrations_up_to(tmp_path, 3)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        assert await apply_migrations(conn, old) == [1, 2, 3]
        # The newer release: same files plus later ones; only those run.
        applied = await apply_migrations(conn, MIGRATIONS_DIR)
        assert applied == [m.version for m in discover_migrations() if m.version > 3]
        cur = await conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        rows = await cur.fetchall()
    assert rows[:6] == [
        (1, "telemetry"),
        (2, "gpu_processes"),
        (3, "events"),
        (4, "inventory"),
        (5, "rollups"),
        (6, "telemetry_fast_ingest"),
    ]


async def test_upgrade_to_006_moves_processes_into_telemetry(pg_dsn: str, tmp_path: Path) -> None:
    """A database written by the 001-005 schema keeps its samples and processes."""
    async with older_schema(pg_dsn, tmp_path, 5) as conn:
        await conn.execute(
            "INSERT INTO telemetry (host, gpu_index, gpu_uuid, ts, boot, seq, host_state, state)"
            " VALUES ('h1', 0, 'u', to_timestamp(%s), 'b', 1, 'active', 'ok'),"
            " ('h1', 1, 'u', to_timestamp(%s), 'b', 1, 'active', 'ok')",
            (T0, T0),
        )
        await conn.execute(
            "INSERT INTO gpu_processes (host, boot, seq, gpu_index, ts, pid, name, mem_used_mib)"
            " VALUES ('h1', 'b', 1, 0, to_timestamp(%s), 20, 'b', 2), ('h1', 'b', 1, 0, to_timestamp(%s), 10, 'a', 1)",
            (T0, T0),
        )
        await apply_migrations(conn)
        cur = await conn.execute(
            "SELECT gpu_index, proc_pid, proc_name, proc_mem_mib FROM telemetry ORDER BY 1"
        )
        assert await cur.fetchall() == [(0, [10, 20], ["a", "b"], [1.0, 2.0]), (1, None, None, None)]
        cur = await conn.execute("SELECT pid, name FROM gpu_processes ORDER BY pid")
        assert await cur.fetchall() == [(10, "a"), (20, "b")]


async def test_upgrade_to_007_keeps_pending_rollup_markers_per_host(pg_dsn: str, tmp_path: Path) -> None:
    async with older_schema(pg_dsn, tmp_path, 6) as conn:
        await conn.execute(
            "INSERT INTO rollup_dirty (host, gpu_index, bucket) VALUES"
            " ('h1', 0, to_timestamp(%s)), ('h1', 1, to_timestamp(%s)), ('h2', 0, to_timestamp(%s))",
            (T0, T0, T0 + 60),
        )
        assert await apply_migrations(conn) == [m.version for m in discover_migrations() if m.version > 6]
        cur = await conn.execute("SELECT host, date_part('epoch', bucket) FROM rollup_dirty ORDER BY 1")
        assert await cur.fetchall() == [("h1", T0), ("h2", T0 + 60)]


async def test_processes_stored_with_their_sample_and_readable_as_rows(store: Store, pg_dsn: str) -> None:
    def with_procs(seq: int, procs: list[Process] | None) -> Telemetry:
        m = sample("h1", seq, T0 + seq, gpus=1)
        return Telemetry(**{**{f: getattr(m, f) for f in m.__struct_fields__},
                            "gpus": [GpuSample(**{**{f: getattr(m.gpus[0], f) for f in m.gpus[0].__struct_fields__},
                                                  "processes": procs})]})  # fmt: skip

    procs = [
        Process(pid=300, name="train.py", mem_used_mib=2048.0),
        Process(pid=12, name=None, mem_used_mib=None),
    ]
    r = await store.write_batch([with_procs(0, procs), with_procs(1, []), with_procs(2, None)], [])
    assert (r.telemetry_rows, r.process_rows) == (3, 2)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT seq, proc_pid, proc_name, proc_mem_mib FROM telemetry ORDER BY seq")
        assert await cur.fetchall() == [
            (0, [12, 300], [None, "train.py"], [None, 2048.0]),
            (1, [], [], []),  # reported: nothing running
            (2, None, None, None),  # not reported
        ]
        # The compatibility view gives one row per process, as the old table did.
        cur = await conn.execute(
            "SELECT seq, gpu_index, pid, name, mem_used_mib FROM gpu_processes ORDER BY pid"
        )
        assert await cur.fetchall() == [(0, 0, 12, None, None), (0, 0, 300, "train.py", 2048.0)]
        # An old-style writer adds a process to an existing sample through the view.
        await conn.execute(
            "INSERT INTO gpu_processes (host, boot, seq, gpu_index, ts, pid, name, mem_used_mib)"
            " VALUES ('h1', 'b1', 2, 0, to_timestamp(%s), 5, 'late', 1)",
            (T0 + 2,),
        )
        cur = await conn.execute("SELECT proc_pid, proc_name FROM telemetry WHERE seq = 2")
        assert await cur.fetchone() == ([5], ["late"])


async def test_copy_path_and_staging_path_store_the_same_ts(store: Store, pg_dsn: str) -> None:
    """The unique key holds ts: a sample must get the same ts whichever path stores it
    (binary COPY, the staging fallback, or SQL's to_timestamp in older rows)."""
    odd = [1_764_000_000.1234565, 1_764_000_000.0000005, 1_764_000_000.9999995]
    first = [sample("h1", i, ts, gpus=1) for i, ts in enumerate(odd)]
    assert (await store.write_batch(first, [])).telemetry_rows == 3  # COPY path
    again = [*first, sample("h1", 9, odd[0] + 1, gpus=1)]
    r = await store.write_batch(again, [])  # duplicates: staging path
    assert (r.telemetry_rows, r.telemetry_duplicates) == (1, 3)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM telemetry t JOIN unnest(%s::float8[]) AS o(s) ON t.ts = to_timestamp(o.s)",
            (odd,),
        )
        assert await cur.fetchone() == (3,)


async def test_two_stations_migrating_at_once(pg_dsn: str) -> None:
    conns = [await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) for _ in range(2)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    every = [m.version for m in discover_migrations()]
    assert sorted(results[0] + results[1]) == every  # each applied exactly once, by one of them


async def test_failed_migration_rolls_back(pg_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE a (x int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE b (x int); SELECT no_such_function();")
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            await apply_migrations(conn, tmp_path)
    assert await scalar(pg_dsn, "SELECT max(version) FROM schema_migrations") == 1
    assert await scalar(pg_dsn, "SELECT to_regclass('b') IS NULL") is True


# --------------------------------------------------------------------------- writes


async def test_write_batch_idempotent_with_inventory_and_hooks(store: Store, pg_dsn: str) -> None:
    seen: list[list[str]] = []

    async def hook(conn: psycopg.AsyncConnection, events: Sequence[Event]) -> None:
        seen.append([e.id for e in events])
        await conn.execute("SELECT 1")  # runs inside the write transaction

    store.add_event_hook(hook)
    msgs = [sample("h1", s, T0 + s) for s in range(10)] + [sample("h2", 0, T0, boot="z")]
    ev = Event(v=1, host="h1", ts=T0, id="e1", kind="xid", gpus=[0], detail="XID 79")
    r = await store.write_batch(msgs, [ev, ev])
    assert (r.telemetry_rows, r.telemetry_duplicates, r.events, r.event_duplicates) == (22, 0, 1, 0)
    r = await store.write_batch(msgs[:5], [ev])
    assert (r.telemetry_rows, r.telemetry_duplicates, r.events) == (0, 10, 0)
    # A mixed batch: old rows skipped, new ones stored.
    r = await store.write_batch(msgs[8:] + [sample("h1", 10, T0 + 70)], [])
    assert (r.telemetry_rows, r.telemetry_duplicates) == (2, 6)
    assert seen == [["e1"]]
    assert await scalar(pg_dsn, "SELECT count(*) FROM telemetry") == 24
    assert await scalar(pg_dsn, "SELECT count(*) FROM events") == 1
    assert await scalar(pg_dsn, "SELECT raw->>'detail' FROM events") == "XID 79"
    assert await scalar(pg_dsn, "SELECT throttle FROM telemetry WHERE seq = 1 LIMIT 1") == [
        "sw_power_cap",
        "hw_slowdown",
    ]
    assert await scalar(pg_dsn, "SELECT xid FROM telemetry WHERE seq = 3 LIMIT 1") == 79
    assert (
        await scalar(pg_dsn, "SELECT date_part('epoch', last_seen) FROM hosts WHERE host = 'h1'") == T0 + 70
    )
    # Inventory rows are refreshed when last_seen moves by over a minute (InventoryCache); a
    # new identity goes at once.
    await store.write_batch([sample("h1", 11, T0 + 75)], [])
    assert await scalar(pg_dsn, "SELECT date_part('epoch', last_seen) FROM hosts WHERE host = 'h1'") == T0 + 70
    await store.write_batch([sample("h1", 0, T0 + 76, boot="b2")], [])
    assert await scalar(pg_dsn, "SELECT last_boot FROM hosts WHERE host = 'h1'") == "b2"
    assert await scalar(pg_dsn, "SELECT date_part('epoch', first_seen) FROM hosts WHERE host = 'h1'") == T0
    assert await scalar(pg_dsn, "SELECT count(*) FROM gpus") == 4
    assert await scalar(pg_dsn, "SELECT name FROM gpus WHERE host = 'h2' AND gpu_index = 1") == "NVIDIA H100"


async def test_failing_hook_rolls_back_the_whole_batch(store: Store, pg_dsn: str) -> None:
    async def hook(conn: psycopg.AsyncConnection, events: Sequence[Event]) -> None:
        raise RuntimeError("boom")

    store.add_event_hook(hook)
    ev = Event(v=1, host="h1", ts=T0, id="e1", kind="wake")
    with pytest.raises(RuntimeError):
        await store.write_batch([sample("h1", 0, T0)], [ev])
    assert await scalar(pg_dsn, "SELECT count(*) FROM telemetry") == 0
    assert await scalar(pg_dsn, "SELECT count(*) FROM events") == 0


# --------------------------------------------------------------------------- rollups + history


async def test_rollups_and_history_raw_and_rollup_paths(store: Store, pg_dsn: str, tmp_path: Path) -> None:
    # 3 hours at 1 Hz... too many rows for a quick test; 10 s spacing, 2 GPUs.
    msgs = [sample("h1", s, T0 + 10 * s) for s in range(3 * 360)]
    for i in range(0, len(msgs), 300):
        await store.write_batch(msgs[i : i + 300], [])
    hist = History(store.pool)
    # Just written: not quiet yet, nothing taken; quiet_s=0 takes every marker now.
    assert await hist.refresh_rollups() == 0
    assert await hist.refresh_rollups(quiet_s=0) == 2 * 180  # 180 minutes x 2 GPUs were dirty
    assert await hist.refresh_rollups(quiet_s=0) == 0
    assert await scalar(pg_dsn, "SELECT count(*) FROM telemetry_1m") == 360
    assert await scalar(pg_dsn, "SELECT sum(n) FROM telemetry_1m") == len(msgs) * 2
    assert await scalar(pg_dsn, "SELECT throttled_n FROM telemetry_1m ORDER BY bucket LIMIT 1") == 3
    assert (
        await scalar(pg_dsn, "SELECT xid_n FROM telemetry_1m WHERE gpu_index = 0 ORDER BY bucket LIMIT 1")
        == 1
    )

    # Late data for an old minute: only that bucket is recomputed.
    late = Telemetry(
        **{**{f: getattr(msgs[0], f) for f in msgs[0].__struct_fields__}, "seq": 99_999, "ts": T0 + 5}
    )
    await store.write_batch([late], [])
    assert await hist.refresh_rollups(quiet_s=0) == 2
    assert await scalar(pg_dsn, "SELECT n FROM telemetry_1m WHERE gpu_index = 0 ORDER BY bucket LIMIT 1") == 7

    keys = [("h1", 0), ("h1", 1), ("nope", 0)]
    # Raw path: 30 minutes, decimated to at most 50 points.
    raw = await hist.fetch(keys, T0, T0 + 1800, ["temp_c", "util_pct"], max_points=50)
    ts, temp = raw[("h1", 0)]["temp_c"]
    assert 0 < len(ts) <= 50 and ts.dtype == np.float64
    # Each bucket's min and max at its time: time never goes back.
    assert np.all(np.diff(ts) >= 0) and ts[0] >= T0 and ts[-1] < T0 + 1800
    assert np.nanmin(temp) == 40 and np.nanmax(temp) == 49  # the samples' own extremes, not bucket means
    assert len(raw[("nope", 0)]["temp_c"][0]) == 0
    # Rollup path: 3 hours (over the 2 h raw limit).
    roll = await hist.fetch(keys, T0, T0 + 3 * 3600, ["power_w"], max_points=100)
    ts, power = roll[("h1", 1)]["power_w"]
    assert 0 < len(ts) <= 100
    assert np.allclose(power, 101.0)
    # Rebuild from a time: recomputes everything after it.
    assert await hist.refresh_rollups(since=T0 + 3600) == 2 * 120

    with pytest.raises(ValueError):
        await hist.fetch(keys, T0, T0 + 10, ["temp_c; DROP TABLE telemetry"])

    out = tmp_path / "export.csv"
    done = await hist.export_csv([("h1", 1)], T0, T0 + 600, out)
    assert done.rows == 61 and "full resolution" in done.what  # 60 samples every 10 s plus the late one
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 61
    assert rows[0]["host"] == "h1" and rows[0]["gpu_index"] == "1" and float(rows[0]["power_w"]) == 101.0
    assert rows[1]["seq"] == "99999" and rows[2]["throttle"] == "sw_power_cap;hw_slowdown"
    assert rows[0]["time_utc"].endswith("Z")
    assert (await hist.export_csv([], T0, T0 + 600, out)).rows == 122  # every GPU


def steady(host: str, t0: float, seconds: range, temp: float = 40.0, spike: range = range(0)) -> list[Telemetry]:
    """One GPU sampled at 1 Hz at a steady temperature, with an optional excursion to 95 degrees."""
    return [
        Telemetry(v=1, host=host, boot="b1", seq=s, ts=t0 + s, state="active", gpus=[
            GpuSample(index=0, uuid=f"GPU-{host}", name="NVIDIA H100", state="ok",
                      temp_c=95.0 if s in spike else temp, power_w=100.0)])
        for s in seconds
    ]


async def test_history_keeps_spikes_shows_outages_and_recent_minutes(store: Store) -> None:
    """What an operator must see in a long range: a five-second thermal excursion
    (not averaged away by the rollups), an outage as a gap (not a line across
    it), and the last minutes (not yet rolled up) up to now."""
    now = time.time()
    t0 = (now - 3 * 3600) // 60 * 60
    # 0-30 min at 40 C with a 5 s excursion at 20 min; down 30-90 min; 80 C from 90 min to now.
    rows = steady("s1", t0, range(0, 1800), spike=range(1200, 1205))
    rows += steady("s1", t0, range(5400, int(now - t0)), temp=80.0)
    for i in range(0, len(rows), 2000):
        await store.write_batch(rows[i : i + 2000], [])
    hist = History(store.pool)
    await hist.refresh_rollups(quiet_s=0)
    # Only rows older than the last three minutes are rolled up, as in a running station.
    async with store.pool.connection() as conn:
        await conn.execute("DELETE FROM telemetry_1m WHERE bucket >= to_timestamp(%s)", (now - 150,))
    for span, rollup in ((3 * 3600, True), (3600, False)):
        got = await hist.fetch([("s1", 0)], now - span, now, ["temp_c"], max_points=400, now=now)
        ts, temp = got[("s1", 0)]["temp_c"]
        assert len(ts) <= 400 and hist.reads_rollups(now - span, now) is rollup
        if rollup:
            assert np.nanmax(temp[ts < t0 + 1800]) == 95.0  # the excursion survives a 3 h range
            outage = (ts > t0 + 1800 + 120) & (ts < t0 + 5400 - 120)
            assert outage.any() and np.isnan(temp[outage]).all()  # a gap, not a ramp from 40 to 80
        assert ts[-1] > now - 60 and temp[-1] == 80.0  # the newest samples, not rolled up yet


async def test_short_range_older_than_raw_retention_reads_the_rollups(store: Store, tmp_path: Path) -> None:
    now = time.time()
    t0 = (now - 40 * 86400) // 60 * 60
    await store.write_batch(steady("o1", t0, range(0, 3600, 10), spike=range(600, 601)), [])
    hist = History(store.pool, raw_retention_days=30)
    await hist.refresh_rollups(quiet_s=0)
    await hist.run_retention(raw_days=30, rollup_days=365)
    # One hour, 40 days ago: the raw samples are gone, the rollups are not.
    assert hist.reads_rollups(t0, t0 + 3600) and not hist.reads_rollups(now - 3600, now)
    got = await hist.fetch([("o1", 0)], t0, t0 + 3600, ["temp_c"], now=now)
    ts, temp = got[("o1", 0)]["temp_c"]
    assert len(ts) >= 60 and np.nanmax(temp) == 95.0
    out = tmp_path / "old.csv"
    done = await hist.export_csv([("o1", 0)], t0, t0 + 3600, out)
    assert done.rows == 60 and "rollups" in done.what and "30 days" in done.what
    with out.open() as f:
        first = next(csv.DictReader(f))
    assert first["minute_utc"].endswith(":00Z") and first["n"] == "6" and float(first["temp_c_max"]) == 40.0


async def test_retention_deletes_only_old_rows(store: Store, pg_dsn: str) -> None:
    now = time.time()
    old = [sample("h1", s, now - 40 * 86400 + s) for s in range(50)]
    recent = [sample("h1", 1000 + s, now - 86400 + s) for s in range(50)]
    await store.write_batch(
        old + recent, [Event(v=1, host="h1", ts=now - 400 * 86400, id="ancient", kind="wake")]
    )
    hist = History(store.pool)
    await hist.refresh_rollups(quiet_s=0)
    deleted = await hist.run_retention(raw_days=30, rollup_days=365)
    assert deleted["telemetry"] == 100
    assert deleted["events"] == 1
    assert await scalar(pg_dsn, "SELECT count(*) FROM telemetry") == 100
    assert await scalar(pg_dsn, "SELECT min(date_part('epoch', ts)) FROM telemetry") >= now - 86400 - 1
    assert await scalar(pg_dsn, "SELECT count(*) FROM telemetry_1m") > 0  # 40-day-old rollups are kept
    old_buckets = await scalar(
        pg_dsn, f"SELECT count(*) FROM telemetry_1m WHERE bucket < to_timestamp({now - 30 * 86400})"
    )
    assert old_buckets in (2, 4)  # 50 s of samples x 2 GPUs: one or two minutes
    deleted = await hist.run_retention(raw_days=30, rollup_days=30)
    assert deleted["telemetry_1m"] == old_buckets and deleted["telemetry"] == 0


async def test_recent_samples_for_the_live_view_shrink_with_the_fleet(store: Store) -> None:
    now = time.time()
    # Two hosts x 2 GPUs, one sample a second for the last 100 s; and one old host.
    await store.write_batch([sample(h, k, now - 100 + k) for h in ("r1", "r2") for k in range(100)], [])
    await store.write_batch([sample("gone", 0, now - 3600)], [])
    hist = History(store.pool)
    metrics = ("temp_c", "power_w")
    got = await hist.recent(now, 600, metrics)
    assert [i[:2] for i in got.identities] == [("r1", 0), ("r1", 1), ("r2", 0), ("r2", 1)]
    assert got.identities[0][2:] == ("GPU-r1-0", "NVIDIA H100")
    assert len(got.keys) == len(got.ts) == got.values.shape[0] == 400 and got.values.shape[1] == 2
    k = got.keys.index(("r2", 1))
    assert got.values[k, 1] == 101.0 and now - 101 < got.ts[k] <= now
    # At most max_samples: a window of max_samples / GPUs seconds.
    small = await hist.recent(now, 600, metrics, max_samples=80)
    assert small.start == pytest.approx(now - 20) and 70 <= len(small.keys) <= 80
    assert all(t > now - 20 for t in small.ts)
    # Nothing recent: nothing back.
    empty = await hist.recent(now - 7200, 600, metrics)
    assert empty.identities == [] and empty.keys == [] and empty.values.shape == (0, 2)


async def test_rollups_wait_until_a_minute_is_quiet(store: Store, pg_dsn: str) -> None:
    now = time.time()
    minute = (now // 60) * 60
    await store.write_batch([sample("live", k, minute + k) for k in range(3)], [])
    hist = History(store.pool)
    # Rows came for this minute just now: recomputing it at every refresh would be wasted work.
    assert await hist.refresh_rollups() == 0
    assert await scalar(pg_dsn, "SELECT count(*) FROM rollup_dirty") == 1  # one marker per host-minute
    # ... unless it has waited too long.
    assert await hist.refresh_rollups(max_wait_s=0) == 2
    assert await scalar(pg_dsn, "SELECT sum(n) FROM telemetry_1m WHERE host = 'live'") == 6
    # A late sample (an agent's buffer) marks its minute again; once quiet, it is taken.
    await store.write_batch([sample("live", 9, minute + 9)], [])
    await asyncio.sleep(0.3)
    assert await hist.refresh_rollups(quiet_s=0.2) == 2
    assert await scalar(pg_dsn, "SELECT sum(n) FROM telemetry_1m WHERE host = 'live'") == 8


async def test_array_literals_round_trip_through_postgresql(pg_dsn: str) -> None:
    from aether_desktop.services.store_sql import (
    array_literal,
)

    texts = ["plain", 'q"uote', "back\\slash", "{brace,comma}", " spaced ", "NULL", "", "ünï €", None]
    floats = [0.1, 1e-300, 123456789.125, -2.5, None]
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute(
            "SELECT %s::text[], %s::float8[], %s::int4[]", (array_literal(texts), array_literal(floats), array_literal([0, 7]))
        )
        assert await cur.fetchone() == (texts, floats, [0, 7])


async def test_recent_keeps_the_newest_samples_when_agents_sample_faster_than_1_hz(store: Store) -> None:
    now = time.time()
    fast = [sample("fast", k, now - 20 + k / 3, gpus=1) for k in range(60)]  # 3 Hz for 20 s
    await store.write_batch(fast, [])
    got = await History(store.pool).recent(now, 600, ("temp_c",), max_samples=30)
    assert len(got.keys) == 30 and got.ts.min() >= now - 10.1  # the newest 10 s, not the oldest


async def test_rollup_of_a_few_minutes_reads_only_their_rows(store: Store, pg_dsn: str) -> None:
    """A refresh of a few host-minutes must be index range scans, not a pass over
    the whole raw table (which a plain join of the markers planned: seconds per
    refresh on a month of data)."""
    hosts, seconds = 20, 1500  # 60,000 rows over 25 minutes
    for start in range(0, seconds, 250):
        await store.write_batch(
            [sample(f"r{h:02d}", s, T0 + s) for s in range(start, start + 250) for h in range(hosts)], []
        )
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("ANALYZE telemetry")
        # One minute of every host: what a refresh takes once a minute has ended.
        markers = ([f"r{h:02d}" for h in range(hosts)], [datetime.fromtimestamp(T0 + 600, tz=UTC)] * hosts)
        cur = await conn.execute(("EXPLAIN " + rollup_buckets_sql()).encode(), markers)
        plan = "\n".join(str(r[0]) for r in await cur.fetchall())
    # (On a TimescaleDB hypertable the chunks' copies are named _hyper_N_M_chunk_telemetry_sample_key.)
    assert re.search(r"Index Scan (using|on) \S*telemetry_sample_key", plan), plan
    assert "Seq Scan on telemetry t" not in plan, plan
    # Plots read each selected GPU's range through the same index, not the whole fleet's rows.
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        params = (T0, 10.0, ["r00", "r01"], [0, 1], T0, T0 + seconds)
        cur = await conn.execute(("EXPLAIN " + fetch_sql(["temp_c"], rollup=False)).encode(), params)
        plan = "\n".join(str(r[0]) for r in await cur.fetchall())
    assert "telemetry_sample_key" in plan and "Seq Scan on telemetry" not in plan, plan
    # And the rollups are complete: 2 GPUs x 20 hosts x 60 samples in that minute.
    hist = History(store.pool)
    await hist.refresh_rollups(max_wait_s=0)
    assert await scalar(pg_dsn, "SELECT count(*) FROM telemetry_1m") == hosts * 2 * 25
    assert await scalar(pg_dsn, f"SELECT sum(n) FROM telemetry_1m WHERE bucket = to_timestamp({T0 + 600})") == 2400
