"""Telemetry/event storage in PostgreSQL: pool, migrations, binary-COPY batch writer.

Every batch is written in ONE transaction. Telemetry is binary-COPYed straight
into ``telemetry`` inside a savepoint; only a batch that holds an
already-stored sample (a replay or JetStream redelivery) hits the unique key,
rolls back to the savepoint and goes through a TEMP staging table with
``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. The unique keys make every
write idempotent, so the ingest acks JetStream messages only after commit and
lets redelivery handle every failure in between: each sample is stored
exactly once.

Pure SQL text lives in :mod:`store_sql` and row building in :mod:`store_rows`
(both unit-tested without a database); this module runs them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.adapt import PyFormat
from psycopg_pool import AsyncConnectionPool

from aether_desktop.services.store_rows import (
    InventoryCache,
    PreparedBatch,
    TelemetryBatch,
    prepare_batch,
)
from aether_desktop.services.store_sql import (
    COPY_STAGE_EVENTS,
    COPY_STAGE_TELEMETRY,
    COPY_TELEMETRY,
    EVENT_COLUMNS,
    INSERT_EVENTS,
    INSERT_STAGED_TELEMETRY,
    MARK_DIRTY_SQL,
    STAGING_DDL,
    TELEMETRY_COLUMNS,
    UPSERT_GPUS_SQL,
    UPSERT_HOSTS_SQL,
    Column,
    copy_types,
    literal_params,
)
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


# --------------------------------------------------------------------------- TimescaleDB

# Raw tables that become hypertables. A hypertable's unique keys must include
# the time column; telemetry's key (006) already does. (gpu_processes is a view
# over telemetry since 006.)
_HYPERTABLES = ("telemetry",)
_SEGMENT_BY = ("host", "gpu_index")  # one compressed segment per GPU: the plots' access path
# Compression only from this release on: before the fix (timescale/timescaledb#7673,
# merged February 2025; 2.19.0 is the first feature release certainly carrying it),
# INSERT ... ON CONFLICT DO NOTHING into a compressed chunk stopped at the first
# conflict and silently skipped the rest of the rows (#7672): exactly the staging
# path's replay of a batch that holds already-stored samples.
_COMPRESSION_MIN_VERSION = (2, 19, 0)


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"2.18.1"`` -> (2, 18, 1); ``"2.19.0-dev"`` -> (2, 19, 0); ``"2.19"`` -> (2, 19, 0)."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("-")[0])[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0], parts[1], parts[2]

# Columns of every unique index of a table, key by key, in index order.
_UNIQUE_KEY_COLUMNS_SQL = """SELECT a.attname
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s::regclass AND i.indisunique
ORDER BY i.indexrelid, k.n"""


async def compression_settings(
    conn: AsyncConnection, table: str, *, segment_by: Sequence[str] = _SEGMENT_BY, time_column: str = "ts"
) -> tuple[str, str]:
    """(segmentby, orderby) for TimescaleDB compression of ``table``.

    TimescaleDB refuses to compress a table whose unique constraint has a
    column that is neither a segmentby nor an orderby column ("column "boot"
    must be used for segmenting or ordering"), and for a unique index it must
    decompress whole segments to check ON CONFLICT. So orderby is the time
    column followed by every other unique-key column, read from the catalog,
    so a later change of the key is followed.
    """
    cur = await conn.execute(_UNIQUE_KEY_COLUMNS_SQL, (table,))
    order = [time_column]
    for (col,) in await cur.fetchall():
        if col not in segment_by and col not in order:
            order.append(str(col))
    return ", ".join(segment_by), ", ".join(order)


async def enable_timescaledb(conn: AsyncConnection, *, raw_retention_days: float = 30.0) -> bool:
    """Turn the raw tables into compressed hypertables when TimescaleDB is usable.

    Plain PostgreSQL (the embedded server) has no such extension and returns
    False at the first query. A conversion TimescaleDB refuses is rolled back
    whole and logged; the tables then stay plain, and the station's own
    retention job and rollups keep them, as on plain PostgreSQL.

    NOT EXERCISED AGAINST A REAL TIMESCALEDB: none is available where this was
    built (the statements follow TimescaleDB 2.x's API; the unit tests check
    them against a fake connection, and the compression settings against the
    real schema's unique key).
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
    cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    row = await cur.fetchone()
    version = str(row[0]) if row else "0"
    compress = version_tuple(version) >= _COMPRESSION_MIN_VERSION
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        async with conn.transaction():
            for table in _HYPERTABLES:
                cur = await conn.execute(
                    "SELECT compression_enabled FROM timescaledb_information.hypertables"
                    " WHERE hypertable_name = %s",
                    (table,),
                )
                row = await cur.fetchone()
                compressed = bool(row[0]) if row is not None else False
                if row is None:
                    log.info("converting %s to a TimescaleDB hypertable", table)
                    # No default (ts DESC) btree: the BRIN on ts and the unique key
                    # (host, gpu_index, ts, ...) serve every query, and one more
                    # btree per row would cost ingest a fifth of its speed.
                    await conn.execute(
                        "SELECT create_hypertable(%s, 'ts', chunk_time_interval => interval '1 day',"
                        " create_default_indexes => false, migrate_data => true)",
                        (table,),
                    )
                if compress and not compressed:  # new, or TimescaleDB was upgraded to 2.19+
                    segment_by, order_by = await compression_settings(conn, table)
                    await conn.execute(
                        f"ALTER TABLE {table} SET (timescaledb.compress,"
                        f" timescaledb.compress_segmentby = '{segment_by}',"
                        f" timescaledb.compress_orderby = '{order_by}')".encode()
                    )
                    await conn.execute(
                        "SELECT add_compression_policy(%s, interval '2 days', if_not_exists => true)", (table,)
                    )
                elif not compress:
                    if compressed:
                        # Compressed by an earlier station or by hand: compress no more
                        # chunks (those already compressed stay so).
                        await conn.execute("SELECT remove_compression_policy(%s, if_exists => true)", (table,))
                    log.warning(
                        "TimescaleDB %s: %s is not compressed further (compression needs %s+, where"
                        " replayed samples cannot be skipped silently)",
                        version, table, ".".join(map(str, _COMPRESSION_MIN_VERSION)),
                    )  # fmt: skip
                await conn.execute(
                    "SELECT add_retention_policy(%s, %s * interval '1 day', if_not_exists => true)",
                    (table, raw_retention_days),
                )
    except psycopg.Error as exc:
        log.warning("TimescaleDB refused a step (%s); rolled back, the raw tables stay as they were", exc)
        return False
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return True


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class WriteResult:
    telemetry_rows: int = 0  # GPU samples newly stored
    telemetry_duplicates: int = 0  # GPU samples already stored (replay/redelivery)
    process_rows: int = 0  # process entries stored with the new samples
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
        max_size: int = 6,  # ingest writers (3) + rollups, history, alerts, jobs
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
        self._inventory = InventoryCache()
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
            configure=self._configure_connection,
            # Give up a broken connection's background reconnect loop quickly:
            # its backoff grows to minutes, whereas a pool below size connects
            # on demand at the next checkout, so recovery follows the database.
            reconnect_timeout=10.0,
            name="aether-store",
        )
        await pool.open(wait=True, timeout=timeout)
        self._pool = pool

    async def _configure_connection(self, conn: AsyncConnection) -> None:
        # A new connection may mean a restarted or restored database: forget what the
        # inventory was known to hold (it costs one upsert of each row, once).
        self._inventory.clear()
        await _configure_connection(conn)

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
        return await self.write_prepared(prepare_batch(telemetry, events), timeout=timeout)

    async def write_prepared(self, batch: PreparedBatch, *, timeout: float = 5.0, hooks: bool = True) -> WriteResult:
        """:meth:`write_batch` for a batch built beforehand by :func:`store_rows.prepare_batch`.

        ``hooks=False`` stores new events without running the event hooks: the
        last resort for an event a hook keeps failing on (kept, not lost)."""
        for attempt in range(3):
            try:
                async with self.pool.connection(timeout=timeout) as conn:
                    return await self._write(conn, batch.telemetry, batch.events, batch.event_rows, hooks)
            except _TRANSIENT_TXN_ERRORS as exc:
                # Two writers upserting the same inventory rows can deadlock; the
                # whole transaction rolled back, so simply run it again.
                if attempt == 2:
                    raise
                log.info("write_batch retrying after %s", type(exc).__name__)
        raise AssertionError("unreachable")

    async def _write(
        self,
        conn: AsyncConnection,
        tb: TelemetryBatch,
        evs: list[Event],
        ev_rows: list[tuple[object, ...]],
        hooks: bool = True,
    ) -> WriteResult:
        """COPY telemetry straight into its table (no staging pass, no ON
        CONFLICT's speculative insertion: about twice as cheap for PostgreSQL).
        Only a batch holding already-stored samples, i.e. a replay or a
        redelivery, fails on the unique key; the whole transaction (COPY is its
        first statement, so nothing else is lost) then runs again through the
        staging table, which skips them. No savepoint: two round trips fewer
        per batch, and round trips are what the writers wait on."""
        if tb.rows:
            try:
                return await self._write_txn(conn, tb, evs, ev_rows, direct=True, hooks=hooks)
            except psycopg.errors.UniqueViolation:
                pass
        return await self._write_txn(conn, tb, evs, ev_rows, direct=False, hooks=hooks)

    async def _write_txn(
        self,
        conn: AsyncConnection,
        tb: TelemetryBatch,
        evs: list[Event],
        ev_rows: list[tuple[object, ...]],
        *,
        direct: bool,
        hooks: bool = True,
    ) -> WriteResult:
        tel_new = 0
        new_events: list[Event] = []
        hosts: list[str] = []
        gpus: list[tuple[str, int]] = []
        async with conn.transaction():
            cur = conn.cursor()
            if tb.rows:
                if direct:
                    await _copy_rows(cur, COPY_TELEMETRY, TELEMETRY_COLUMNS, tb.rows)
                    tel_new = len(tb.rows)
                else:
                    await _copy_rows(cur, COPY_STAGE_TELEMETRY, TELEMETRY_COLUMNS, tb.rows)
                    await cur.execute(INSERT_STAGED_TELEMETRY)
                    tel_new = max(cur.rowcount, 0)
                # One round trip for the three (pipeline mode). They still run
                # in this order, over sorted keys, so concurrent writers take
                # the inventory's row locks in the same order. Inventory rows
                # go only when they change something (InventoryCache).
                hosts = self._inventory.hosts_to_send(tb)
                gpus = self._inventory.gpus_to_send(tb)
                async with conn.pipeline():
                    if hosts:
                        await cur.execute(UPSERT_HOSTS_SQL, literal_params(tb.host_params(hosts)))
                    if gpus:
                        await cur.execute(UPSERT_GPUS_SQL, literal_params(tb.gpu_params(gpus)))
                    await cur.execute(MARK_DIRTY_SQL, literal_params(tb.dirty_params()))
            if ev_rows:
                await _copy_rows(cur, COPY_STAGE_EVENTS, EVENT_COLUMNS, ev_rows)
                await cur.execute(INSERT_EVENTS)
                new_ids = {r[0] for r in await cur.fetchall()}
                new_events = [e for e in evs if e.id in new_ids]
                if new_events and hooks:
                    for hook in self._hooks:
                        await hook(conn, new_events)
        if tb.rows:
            self._inventory.committed(tb, hosts, gpus)
        return WriteResult(
            telemetry_rows=tel_new,
            telemetry_duplicates=len(tb.rows) - tel_new,
            # Exact for all-new batches (the common case); a replayed batch
            # reports what it carried.
            process_rows=tb.processes if tel_new else 0,
            events=len(new_events),
            event_duplicates=len(evs) - len(new_events),
        )


async def _configure_connection(conn: AsyncConnection) -> None:
    """Create the session's staging tables once per pooled connection (a new
    connection after a database restart gets them again)."""
    await conn.execute(STAGING_DDL)
    await conn.commit()


_BYTES_BINARY = psycopg.adapters.get_dumper(bytes, PyFormat.BINARY)


async def _copy_rows(
    cur: AsyncCursor[tuple[object, ...]],
    sql: bytes,
    columns: Sequence[Column],
    rows: list[tuple[object, ...]],
) -> None:
    # set_types() picks dumpers by oid, and the last one registered for bytea
    # is psycopg.Binary's (pure Python, it unwraps a wrapper first); the
    # dumper for plain bytes (C with psycopg-binary) copies Encoded values
    # as they are. Registered on this cursor only.
    cur.adapters.register_dumper(bytes, _BYTES_BINARY)
    async with cur.copy(sql) as copy:
        copy.set_types(copy_types(columns))
        # The formatter is what AsyncCopy.write_row() calls; calling it directly
        # saves a coroutine per row (a fifth of the client's COPY cost) and
        # awaits only when it hands back a full buffer to send.
        fmt = copy.formatter
        for row in rows:
            if data := fmt.write_row(row):
                await copy.write(data)
