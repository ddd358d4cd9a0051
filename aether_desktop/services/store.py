"""Telemetry/event storage in PostgreSQL: pool, migrations, binary-COPY batch writer.

Every batch is written in ONE transaction: binary COPY into per-connection
TEMP staging tables, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` into
the real tables. The unique keys (host, boot, seq, gpu_index) and the event id
make the write idempotent, so the ingest can ack JetStream messages only after
commit and let redelivery handle every failure in between: each sample is
stored exactly once.

The SQL is built by pure functions at the top of this module (unit-tested
without a database); the :class:`Store` class only runs it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg_pool import AsyncConnectionPool

from aether_protocol.messages import Event, Telemetry

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Arbitrary constant shared by every station: two stations starting against one
# database serialise their migration runs on this session-level advisory lock.
MIGRATION_LOCK_KEY = 0x4165_7468_6572_0001  # "Aether" + 1, fits in bigint

EventHook = Callable[[AsyncConnection, Sequence[Event]], Awaitable[None]]

# --------------------------------------------------------------------------- migrations

_MIGRATION_RE = re.compile(r"^(\d+)_([A-Za-z0-9_]+)\.sql$")

SCHEMA_MIGRATIONS_DDL = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def parse_migration_name(filename: str) -> tuple[int, str] | None:
    """``"010_alerts.sql"`` -> ``(10, "alerts")``; anything else -> None."""
    m = _MIGRATION_RE.match(filename)
    return (int(m.group(1)), m.group(2)) if m else None


def discover_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All ``NNN_name.sql`` files in numeric order (other files are ignored)."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        parsed = parse_migration_name(path.name)
        if parsed is None or not path.is_file():
            continue
        version, name = parsed
        if version in found:
            raise ValueError(
                f"two migrations share version {version}: {found[version].path.name}, {path.name}"
            )
        found[version] = Migration(version, name, path)
    return [found[v] for v in sorted(found)]


async def apply_migrations(
    conn: AsyncConnection, directory: Path = MIGRATIONS_DIR, *, upto: int | None = None
) -> list[int]:
    """Apply pending migrations (each in its own transaction); return the versions applied.

    ``conn`` must be in autocommit mode: the advisory lock is session-level so
    it spans the per-migration transactions. ``upto`` stops after that version
    (tests use it to build an "old" database to upgrade).
    """
    if not conn.autocommit:
        raise ValueError("apply_migrations needs an autocommit connection")
    migrations = [m for m in discover_migrations(directory) if upto is None or m.version <= upto]
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        await conn.execute(SCHEMA_MIGRATIONS_DDL)
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {int(r[0]) for r in await cur.fetchall()}
        for m in migrations:
            if m.version in done:
                continue
            log.info("applying migration %03d_%s", m.version, m.name)
            async with conn.transaction():
                # No parameters: psycopg sends the file as one simple query, so a
                # file may hold many statements.
                await conn.execute(m.sql().encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
                )
            applied_now.append(m.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now


# --------------------------------------------------------------------------- pure SQL builders


@dataclass(frozen=True)
class Column:
    """A staged column: its binary-COPY/staging type and the expression that loads it."""

    name: str
    stage_type: str
    load: str | None = None  # SQL expression over the staging row; default: the column itself

    @property
    def expr(self) -> str:
        return self.load or self.name


# Metrics stored as float4; energy_j is float8 (a large cumulative counter).
REAL_METRICS = (
    "temp_c",
    "mem_used_mib",
    "mem_total_mib",
    "util_pct",
    "mem_util_pct",
    "power_w",
    "power_limit_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "fan_pct",
)

THROTTLE_SEP = "\x1f"  # ASCII unit separator: never part of an NVML reason name

# Timestamps travel as float8 epoch seconds (what the protocol carries) and are
# converted in SQL: cheaper than building a datetime per row in Python.
TELEMETRY_COLUMNS: tuple[Column, ...] = (
    Column("host", "text"),
    Column("gpu_index", "int4"),
    Column("gpu_uuid", "text"),
    Column("ts", "float8", "to_timestamp(ts)"),
    Column("boot", "text"),
    Column("seq", "int8"),
    Column("host_state", "text"),
    Column("state", "text"),
    *(Column(m, "float4") for m in REAL_METRICS),
    Column("energy_j", "float8"),
    # Staged as one joined string: binary-dumping a Python list as text[] costs
    # as much as all the other columns together.
    Column("throttle", "text", f"string_to_array(throttle, E'\\x{ord(THROTTLE_SEP):02x}')"),
    Column("ecc_dbe", "int8"),
    Column("xid", "int4"),
    Column("slowdown_temp_c", "float4"),
)

PROCESS_COLUMNS: tuple[Column, ...] = (
    Column("host", "text"),
    Column("boot", "text"),
    Column("seq", "int8"),
    Column("gpu_index", "int4"),
    Column("ts", "float8", "to_timestamp(ts)"),
    Column("pid", "int8"),
    Column("name", "text"),
    Column("mem_used_mib", "float4"),
)

EVENT_COLUMNS: tuple[Column, ...] = (
    Column("id", "text"),
    Column("host", "text"),
    Column("ts", "float8", "to_timestamp(ts)"),
    Column("kind", "text"),
    Column("job_id", "text"),
    Column("gpus", "int4[]"),
    Column("exit_code", "int4"),
    Column("detail", "text"),
    Column("raw", "text", "raw::jsonb"),
)

STAGE_TELEMETRY = "aether_stage_telemetry"
STAGE_PROCESSES = "aether_stage_processes"
STAGE_EVENTS = "aether_stage_events"


def staging_ddl(table: str, columns: Sequence[Column]) -> str:
    """TEMP staging table, emptied at every commit so it never needs a TRUNCATE."""
    cols = ", ".join(f"{c.name} {c.stage_type}" for c in columns)
    return f"CREATE TEMP TABLE IF NOT EXISTS {table} ({cols}) ON COMMIT DELETE ROWS"


def copy_sql(table: str, columns: Sequence[Column]) -> str:
    return f"COPY {table} ({', '.join(c.name for c in columns)}) FROM STDIN (FORMAT BINARY)"


def copy_types(columns: Sequence[Column]) -> list[str]:
    return [c.stage_type for c in columns]


def insert_select_sql(
    target: str,
    stage: str,
    columns: Sequence[Column],
    returning: str | None = None,
    *,
    skip_existing: bool = True,
) -> str:
    """Move staged rows into ``target``; with ``skip_existing`` rows whose unique key exists are skipped.

    No conflict target: the statement then honours whatever unique key the
    table has (the TimescaleDB path widens the keys with ``ts``).
    """
    names = ", ".join(c.name for c in columns)
    exprs = ", ".join(c.expr for c in columns)
    sql = f"INSERT INTO {target} ({names}) SELECT {exprs} FROM {stage}"
    if skip_existing:
        sql += " ON CONFLICT DO NOTHING"
    return f"{sql} RETURNING {returning}" if returning else sql


UPSERT_HOSTS_SQL = """INSERT INTO hosts (host, first_seen, last_seen, last_boot)
SELECT h, to_timestamp(f), to_timestamp(l), b
FROM unnest(%s::text[], %s::float8[], %s::float8[], %s::text[]) AS u(h, f, l, b)
ON CONFLICT (host) DO UPDATE SET
    first_seen = LEAST(hosts.first_seen, EXCLUDED.first_seen),
    last_boot = CASE WHEN EXCLUDED.last_seen >= hosts.last_seen THEN EXCLUDED.last_boot ELSE hosts.last_boot END,
    last_seen = GREATEST(hosts.last_seen, EXCLUDED.last_seen)"""

UPSERT_GPUS_SQL = """INSERT INTO gpus (host, gpu_index, uuid, name, mem_total_mib, first_seen, last_seen)
SELECT h, i, u, n, m, to_timestamp(f), to_timestamp(l)
FROM unnest(%s::text[], %s::int4[], %s::text[], %s::text[], %s::float4[], %s::float8[], %s::float8[])
    AS x(h, i, u, n, m, f, l)
ON CONFLICT (host, gpu_index) DO UPDATE SET
    uuid = CASE WHEN EXCLUDED.last_seen >= gpus.last_seen THEN EXCLUDED.uuid ELSE gpus.uuid END,
    name = CASE WHEN EXCLUDED.last_seen >= gpus.last_seen THEN EXCLUDED.name ELSE gpus.name END,
    mem_total_mib = COALESCE(CASE WHEN EXCLUDED.last_seen >= gpus.last_seen
                                  THEN EXCLUDED.mem_total_mib END, gpus.mem_total_mib),
    first_seen = LEAST(gpus.first_seen, EXCLUDED.first_seen),
    last_seen = GREATEST(gpus.last_seen, EXCLUDED.last_seen)"""

# DO UPDATE (not DO NOTHING) on purpose: it row-locks the dirty marker until
# this batch commits, so a concurrent rollup refresh that deletes the marker
# waits for the batch and then aggregates with a snapshot that includes it.
MARK_DIRTY_SQL = """INSERT INTO rollup_dirty (host, gpu_index, bucket)
SELECT h, i, to_timestamp(b) FROM unnest(%s::text[], %s::int4[], %s::float8[]) AS d(h, i, b)
ON CONFLICT (host, gpu_index, bucket) DO UPDATE SET touched_at = EXCLUDED.touched_at"""


# --------------------------------------------------------------------------- pure row building

ROLLUP_BUCKET_S = 60


@dataclass
class TelemetryBatch:
    """Rows for COPY plus the per-batch inventory and rollup bookkeeping."""

    rows: list[tuple[object, ...]] = field(default_factory=list)
    processes: list[tuple[object, ...]] = field(default_factory=list)
    # host -> [first_ts, last_ts, boot at last_ts]
    hosts: dict[str, list[object]] = field(default_factory=dict)
    # (host, index) -> [uuid, name, mem_total_mib, first_ts, last_ts]
    gpus: dict[tuple[str, int], list[object]] = field(default_factory=dict)
    dirty: set[tuple[str, int, int]] = field(default_factory=set)  # (host, index, bucket start s)

    def host_params(self) -> tuple[list[object], ...]:
        keys = sorted(self.hosts)  # fixed order: concurrent upserts lock rows alike, no deadlock
        v = [self.hosts[k] for k in keys]
        return (list(keys), [x[0] for x in v], [x[1] for x in v], [x[2] for x in v])

    def gpu_params(self) -> tuple[list[object], ...]:
        keys = sorted(self.gpus)
        v = [self.gpus[k] for k in keys]
        return (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [x[0] for x in v],
            [x[1] for x in v],
            [x[2] for x in v],
            [x[3] for x in v],
            [x[4] for x in v],
        )

    def dirty_params(self) -> tuple[list[object], ...]:
        keys = sorted(self.dirty)
        return ([k[0] for k in keys], [k[1] for k in keys], [float(k[2]) for k in keys])


def build_telemetry_batch(messages: Sequence[Telemetry]) -> TelemetryBatch:
    """Flatten host messages into one row per GPU sample (pure; order of TELEMETRY_COLUMNS)."""
    b = TelemetryBatch()
    rows_append = b.rows.append
    for t in messages:
        host, boot, seq, ts = t.host, t.boot, t.seq, t.ts
        bucket = int(ts // ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S
        h = b.hosts.get(host)
        if h is None:
            b.hosts[host] = [ts, ts, boot]
        else:
            if ts < h[0]:  # type: ignore[operator]
                h[0] = ts
            if ts >= h[1]:  # type: ignore[operator]
                h[1] = ts
                h[2] = boot
        for g in t.gpus:
            idx = g.index
            rows_append(
                (
                    host, idx, g.uuid, ts, boot, seq, t.state, g.state,
                    g.temp_c, g.mem_used_mib, g.mem_total_mib, g.util_pct, g.mem_util_pct,
                    g.power_w, g.power_limit_w, g.sm_clock_mhz, g.mem_clock_mhz, g.fan_pct,
                    g.energy_j, THROTTLE_SEP.join(g.throttle) if g.throttle is not None else None,
                    g.ecc_dbe, g.xid, g.slowdown_temp_c,
                )
            )  # fmt: skip
            if g.processes:
                for p in g.processes:
                    b.processes.append((host, boot, seq, idx, ts, p.pid, p.name, p.mem_used_mib))
            key = (host, idx)
            inv = b.gpus.get(key)
            if inv is None:
                b.gpus[key] = [g.uuid, g.name, g.mem_total_mib, ts, ts]
            else:
                if ts < inv[3]:  # type: ignore[operator]
                    inv[3] = ts
                if ts >= inv[4]:  # type: ignore[operator]
                    inv[0], inv[1], inv[4] = g.uuid, g.name, ts
                    if g.mem_total_mib is not None:
                        inv[2] = g.mem_total_mib
            b.dirty.add((host, idx, bucket))
    return b


def dedupe_events(events: Sequence[Event]) -> list[Event]:
    """First occurrence of each event id (a batch can hold a redelivered copy)."""
    seen: set[str] = set()
    out: list[Event] = []
    for e in events:
        if e.id not in seen:
            seen.add(e.id)
            out.append(e)
    return out


_json = msgspec.json.Encoder()


def build_event_rows(events: Sequence[Event]) -> list[tuple[object, ...]]:
    return [
        (e.id, e.host, e.ts, e.kind, e.job_id, e.gpus, e.exit_code, e.detail, _json.encode(e).decode())
        for e in events
    ]


# --------------------------------------------------------------------------- TimescaleDB

# (table, unique constraint, its columns). A hypertable's unique keys must
# include the time column; adding ts keeps dedupe exact because a redelivered
# sample carries the very same ts.
_HYPERTABLES = (
    ("telemetry", "telemetry_sample_key", "host, boot, seq, gpu_index, ts"),
    ("gpu_processes", "gpu_processes_key", "host, boot, seq, gpu_index, pid, ts"),
)


async def enable_timescaledb(conn: AsyncConnection, *, raw_retention_days: float = 30.0) -> bool:
    """Turn the raw tables into compressed hypertables when TimescaleDB is usable.

    Plain PostgreSQL (the embedded server) has no such extension and returns
    False at the first query. NOT EXERCISED BY THE TEST SUITE: no TimescaleDB
    server is available here; the statements follow TimescaleDB 2.x's API.
    """
    cur = await conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    if await cur.fetchone() is None:
        return False
    try:
        async with conn.transaction():
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:  # e.g. not in shared_preload_libraries
        log.warning("TimescaleDB is installed but unusable (%s); using plain PostgreSQL tables", exc)
        return False
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        async with conn.transaction():
            for table, key, cols in _HYPERTABLES:
                cur = await conn.execute(
                    "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = %s", (table,)
                )
                if await cur.fetchone() is not None:
                    continue
                log.info("converting %s to a TimescaleDB hypertable", table)
                await conn.execute(
                    f"ALTER TABLE {table} DROP CONSTRAINT {key}, ADD CONSTRAINT {key} UNIQUE ({cols})".encode()
                )
                await conn.execute(
                    "SELECT create_hypertable(%s, 'ts', chunk_time_interval => interval '1 day',"
                    " migrate_data => true)",
                    (table,),
                )
                await conn.execute(
                    f"ALTER TABLE {table} SET (timescaledb.compress,"
                    f" timescaledb.compress_segmentby = 'host, gpu_index',"
                    f" timescaledb.compress_orderby = 'ts')".encode()
                )
                await conn.execute(
                    "SELECT add_compression_policy(%s, interval '2 days', if_not_exists => true)", (table,)
                )
                await conn.execute(
                    "SELECT add_retention_policy(%s, %s * interval '1 day', if_not_exists => true)",
                    (table, raw_retention_days),
                )
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return True


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class WriteResult:
    telemetry_rows: int = 0  # GPU samples newly stored
    telemetry_duplicates: int = 0  # GPU samples already stored (replay/redelivery)
    process_rows: int = 0
    events: int = 0  # events newly stored (and passed to the hooks)
    event_duplicates: int = 0


_TRANSIENT_TXN_ERRORS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


class Store:
    """Connection pool + schema + idempotent batch writer. Services share ``pool``."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        migrations_dir: Path = MIGRATIONS_DIR,
        timescale_raw_retention_days: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._migrations_dir = migrations_dir
        self._ts_retention_days = timescale_raw_retention_days
        self._pool: AsyncConnectionPool | None = None
        self._hooks: list[EventHook] = []
        self.timescaledb = False
        self.migrations_applied: list[int] = []

    @property
    def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError("Store is not open")
        return self._pool

    async def open(self, *, timeout: float = 30.0) -> None:
        """Migrate (under the advisory lock), then open the pool."""
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            self.migrations_applied = await apply_migrations(conn, self._migrations_dir)
            self.timescaledb = await enable_timescaledb(conn, raw_retention_days=self._ts_retention_days)
        pool = AsyncConnectionPool(
            self._dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            open=False,
            # Validates a connection on checkout, so a restarted database costs
            # one failed check instead of a failed batch.
            check=AsyncConnectionPool.check_connection,
            configure=_configure_connection,
            # Give up a broken connection's background reconnect loop quickly:
            # its backoff grows to minutes, whereas a pool below size connects
            # on demand at the next checkout, so recovery follows the database.
            reconnect_timeout=10.0,
            name="aether-store",
        )
        await pool.open(wait=True, timeout=timeout)
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def add_event_hook(self, hook: EventHook) -> None:
        """``hook(conn, new_events)`` runs inside the write transaction, only for
        events stored for the first time, so what it writes is applied exactly once."""
        self._hooks.append(hook)

    async def write_batch(
        self, telemetry: Sequence[Telemetry], events: Sequence[Event], *, timeout: float = 5.0
    ) -> WriteResult:
        """Store a batch in one transaction. Raises psycopg errors; nothing is half-written."""
        tb = build_telemetry_batch(telemetry)
        evs = dedupe_events(events)
        ev_rows = build_event_rows(evs)
        for attempt in range(3):
            try:
                async with self.pool.connection(timeout=timeout) as conn:
                    return await self._write(conn, tb, evs, ev_rows)
            except _TRANSIENT_TXN_ERRORS as exc:
                # Two writers upserting the same inventory rows can deadlock; the
                # whole transaction rolled back, so simply run it again.
                if attempt == 2:
                    raise
                log.info("write_batch retrying after %s", type(exc).__name__)
        raise AssertionError("unreachable")

    async def _write(
        self, conn: AsyncConnection, tb: TelemetryBatch, evs: list[Event], ev_rows: list[tuple[object, ...]]
    ) -> WriteResult:
        tel_new = proc_new = 0
        new_events: list[Event] = []
        async with conn.transaction():
            cur = conn.cursor()
            if tb.rows:
                await _copy_rows(cur, STAGE_TELEMETRY, TELEMETRY_COLUMNS, tb.rows)
                tel_new = await _insert_staged(conn, cur, _INSERT_TELEMETRY)
                if tb.processes:
                    await _copy_rows(cur, STAGE_PROCESSES, PROCESS_COLUMNS, tb.processes)
                    proc_new = await _insert_staged(conn, cur, _INSERT_PROCESSES)
                await cur.execute(UPSERT_HOSTS_SQL, tb.host_params())
                await cur.execute(UPSERT_GPUS_SQL, tb.gpu_params())
                await cur.execute(MARK_DIRTY_SQL, tb.dirty_params())
            if ev_rows:
                await _copy_rows(cur, STAGE_EVENTS, EVENT_COLUMNS, ev_rows)
                await cur.execute(_INSERT_EVENTS)
                new_ids = {r[0] for r in await cur.fetchall()}
                new_events = [e for e in evs if e.id in new_ids]
                if new_events:
                    for hook in self._hooks:
                        await hook(conn, new_events)
        return WriteResult(
            telemetry_rows=tel_new,
            telemetry_duplicates=len(tb.rows) - tel_new,
            process_rows=proc_new,
            events=len(new_events),
            event_duplicates=len(evs) - len(new_events),
        )


_INSERT_TELEMETRY = (
    insert_select_sql("telemetry", STAGE_TELEMETRY, TELEMETRY_COLUMNS, skip_existing=False).encode(),
    insert_select_sql("telemetry", STAGE_TELEMETRY, TELEMETRY_COLUMNS).encode(),
)
_INSERT_PROCESSES = (
    insert_select_sql("gpu_processes", STAGE_PROCESSES, PROCESS_COLUMNS, skip_existing=False).encode(),
    insert_select_sql("gpu_processes", STAGE_PROCESSES, PROCESS_COLUMNS).encode(),
)
_INSERT_EVENTS = insert_select_sql("events", STAGE_EVENTS, EVENT_COLUMNS, returning="id").encode()
_STAGING_DDL = ";\n".join(
    staging_ddl(t, c)
    for t, c in (
        (STAGE_TELEMETRY, TELEMETRY_COLUMNS),
        (STAGE_PROCESSES, PROCESS_COLUMNS),
        (STAGE_EVENTS, EVENT_COLUMNS),
    )
).encode()


async def _configure_connection(conn: AsyncConnection) -> None:
    """Create the session's staging tables once per pooled connection (a new
    connection after a database restart gets them again)."""
    await conn.execute(_STAGING_DDL)
    await conn.commit()


async def _insert_staged(
    conn: AsyncConnection, cur: AsyncCursor[tuple[object, ...]], sql: tuple[bytes, bytes]
) -> int:
    """Plain INSERT first (about 25% faster than ON CONFLICT's speculative
    insertion); only a batch that holds already-stored rows, i.e. a replay or
    redelivery, pays for a second pass that skips them."""
    plain, skipping = sql
    try:
        async with conn.transaction():  # a savepoint: the staged rows survive its rollback
            await cur.execute(plain)
    except psycopg.errors.UniqueViolation:
        await cur.execute(skipping)
    return max(cur.rowcount, 0)


async def _copy_rows(
    cur: AsyncCursor[tuple[object, ...]],
    table: str,
    columns: Sequence[Column],
    rows: list[tuple[object, ...]],
) -> None:
    async with cur.copy(copy_sql(table, columns).encode()) as copy:
        copy.set_types(copy_types(columns))
        for row in rows:
            await copy.write_row(row)
