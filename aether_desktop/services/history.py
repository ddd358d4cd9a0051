"""History queries over the stored telemetry: plots, rollups, CSV export, retention.

Plots never receive more points than they can draw: every query is decimated
server-side into about ``max_points`` buckets per GPU (bucket averages).
Short ranges read the raw ``telemetry`` table; long ones read the one-minute
rollups in ``telemetry_1m``, which an incremental refresh keeps current
to about a minute (a minute is rolled up once it has ended).

Metric names are the protocol's field names, checked against a whitelist;
user strings never reach SQL text, only the fixed column names they map to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from aether_desktop.services.store_sql import REAL_METRICS

log = logging.getLogger(__name__)

# Numeric per-GPU metrics (protocol field names) a plot or export can ask for.
METRICS: tuple[str, ...] = (*REAL_METRICS, "energy_j", "ecc_dbe", "xid", "slowdown_temp_c")
MIN_MAX_METRICS = ("temp_c", "mem_used_mib", "util_pct", "power_w")

# Beyond this span (or this many raw rows, assuming 1 Hz sampling) a fetch
# reads the rollups: 2 h x 16 GPUs is 115,200 raw rows, about the most that
# aggregates within a plot-refresh budget on a small machine.
RAW_MAX_SPAN_S = 2 * 3600.0
RAW_MAX_ROWS = 200_000
# A range starting this close to the raw retention cutoff already reads the
# rollups: the retention job runs every few minutes, not continuously.
RAW_CUTOFF_MARGIN_S = 3600.0
# A long range's newest minutes are read from raw rows (a minute is rolled up
# about a minute after it ends; at most ROLLUP_MAX_WAIT_S after).
ROLLUP_TAIL_S = 180.0
# History queries come from the UI: fail in seconds, not after the pool's 30 s,
# when the database is down, and never run unbounded on a sick server.
QUERY_CHECKOUT_S = 5.0
SET_QUERY_TIMEOUT = b"SET LOCAL statement_timeout = '30s'"
ROLLUP_S = 60.0
ROLLUP_QUIET_S = 5.0  # a minute is rolled up once no rows came for it for this long
ROLLUP_MAX_WAIT_S = 120.0  # ... or once it waited this long
DIRTY_CHUNK = 5000
RETENTION_CHUNK = 20_000

Series = tuple[np.ndarray, np.ndarray]
GpuKey = tuple[str, int]


@dataclass(frozen=True)
class Export:
    """What :meth:`History.export_csv` wrote: rows, and what one row is."""

    rows: int
    what: str


def check_metrics(metrics: Sequence[str]) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    return list(dict.fromkeys(metrics))


# --------------------------------------------------------------------------- pure SQL builders


def rollup_aggregates() -> list[tuple[str, str]]:
    """(telemetry_1m column, aggregate over telemetry rows aliased ``t``)."""
    aggs = [("n", "count(*)")]
    for m in METRICS:
        if m in MIN_MAX_METRICS:
            aggs.append((f"{m}_min", f"min(t.{m})"))
        aggs.append((f"{m}_avg", f"avg(t.{m})"))
        if m in MIN_MAX_METRICS or m in ("energy_j", "ecc_dbe"):
            aggs.append((f"{m}_max", f"max(t.{m})"))
    aggs += [
        ("xid_n", "count(t.xid)"),
        ("throttled_n", "count(*) FILTER (WHERE cardinality(t.throttle) > 0)"),
        ("lost_n", "count(*) FILTER (WHERE t.state = 'lost')"),
    ]
    return aggs


def _rollup_upsert(select: str) -> str:
    """``select`` (host, gpu_index, bucket, then the aggregates' columns) upserted into telemetry_1m."""
    aggs = rollup_aggregates()
    cols = ", ".join(c for c, _ in aggs)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c, _ in aggs)
    return (
        f"INSERT INTO telemetry_1m (host, gpu_index, bucket, {cols}) {select}"
        f"ON CONFLICT (host, gpu_index, bucket) DO UPDATE SET {updates}"
    )


def rollup_buckets_sql() -> str:
    """Recompute the given (host, bucket) minutes of every GPU of the host from raw rows.

    The host's GPUs come from the inventory (a GPU's first rows and its
    inventory row are written together). Each GPU-minute is aggregated in a
    LATERAL subquery: an index range scan on (host, gpu_index, ts), whatever
    the table's size. A plain join let the planner guess that a tenth of the
    table matched the markers' time ranges, so it read the whole raw table
    (1.1 s for 50 markers over 4.8 million rows) and compared each row with
    every marker of its host; the LATERAL form reads only the minutes' rows
    (28 ms) and costs PostgreSQL a quarter of the CPU per row rolled up.
    """
    aggs = rollup_aggregates()
    exprs = ", ".join(f"{e} AS {c}" for c, e in aggs)
    return _rollup_upsert(
        f"SELECT d.host, g.gpu_index, d.bucket, {', '.join(f'a.{c}' for c, _ in aggs)} "
        "FROM unnest(%s::text[], %s::timestamptz[]) AS d(host, bucket) "
        "JOIN gpus g ON g.host = d.host "
        f"CROSS JOIN LATERAL (SELECT {exprs} FROM telemetry t "
        "WHERE t.host = d.host AND t.gpu_index = g.gpu_index "
        "AND t.ts >= d.bucket AND t.ts < d.bucket + interval '1 minute') a "
        "WHERE a.n > 0 "  # a GPU with no rows in that minute gets no rollup row
    )


def rollup_range_sql() -> str:
    """Recompute every minute from a start time (a rebuild, or after a bulk import)."""
    exprs = ", ".join(e for _, e in rollup_aggregates())
    return _rollup_upsert(
        f"SELECT t.host, t.gpu_index, date_bin('1 minute', t.ts, timestamptz 'epoch'), {exprs} "
        "FROM telemetry t WHERE t.ts >= %s GROUP BY 1, 2, 3 "
    )


# SKIP LOCKED: markers an in-flight ingest batch holds are left for the next
# refresh (that batch re-marks them anyway), so a refresh never waits on ingest.
# A marker is taken once its minute has been quiet for ROLLUP_QUIET_S (no batch
# touched it: the minute ended, or its host stopped), or once it has waited
# ROLLUP_MAX_WAIT_S. Recomputing a minute that is still filling at every refresh
# (every 5 s) read about six times the rows written; quiet, each row is read
# about once. A sample that arrives later (an agent's buffer) marks its minute
# again. Database clock only: agents' clocks play no part.
TAKE_DIRTY_SQL = """DELETE FROM rollup_dirty WHERE (host, bucket) IN (
    SELECT host, bucket FROM rollup_dirty
    WHERE touched_at < now() - make_interval(secs => %s) OR dirty_since < now() - make_interval(secs => %s)
    ORDER BY bucket LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING host, bucket"""


def fetch_sql(metrics: Sequence[str], rollup: bool) -> str:
    """Per GPU and bucket: the samples' mean time, then each metric's min and max.

    Params: start, width, hosts, indexes, then the sources' time ranges: raw
    only: start, end; rollups: start, tail, tail, end (minutes before
    ``tail`` from ``telemetry_1m``, the newest ones, which may not be rolled
    up yet, from raw rows).

    Min and max, not the mean: a five-second thermal excursion must still show
    in a week's plot (the rollups keep each minute's min and max for that; a
    metric without them contributes its average). Each GPU's rows come from a
    LATERAL subquery, fenced with OFFSET 0 so it is not merged into a join: an
    index range scan on (host, gpu_index, time) per GPU, however large the
    table. A join let the planner read every GPU's rows in the range through
    the BRIN index and throw away all but the selected GPUs' (301 ms instead
    of 96 ms for 16 GPUs x 1 h of a 400-GPU fleet).
    """
    check_metrics(metrics)
    gpu = "host = k.host AND gpu_index = k.gpu_index"
    raw_cols = ", ".join(f"{m} AS {m}_lo, {m} AS {m}_hi" for m in metrics)
    raw = (
        f"SELECT date_part('epoch', ts) AS e, 1 AS w, {raw_cols} FROM telemetry "
        f"WHERE {gpu} AND ts >= to_timestamp(%s) AND ts < to_timestamp(%s)"
    )
    src = raw
    if rollup:
        roll_cols = ", ".join(
            f"{m}_min AS {m}_lo, {m}_max AS {m}_hi" if m in MIN_MAX_METRICS else f"{m}_avg AS {m}_lo, {m}_avg AS {m}_hi"
            for m in metrics
        )
        src = (
            f"SELECT date_part('epoch', bucket) + {ROLLUP_S / 2} AS e, n AS w, {roll_cols} FROM telemetry_1m "
            f"WHERE {gpu} AND bucket >= to_timestamp(%s) AND bucket < to_timestamp(%s) UNION ALL {raw}"
        )
    vals = ", ".join(f"min(t.{m}_lo)::float8, max(t.{m}_hi)::float8" for m in metrics)
    return (
        f"SELECT k.host, k.gpu_index, floor((t.e - %s) / %s)::bigint AS b, sum(t.e * t.w) / sum(t.w), {vals} "
        f"FROM unnest(%s::text[], %s::int4[]) AS k(host, gpu_index) "
        f"CROSS JOIN LATERAL ({src} OFFSET 0) t "
        f"GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )


def envelope(ts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Series:
    """Each bucket's min then max at its time (one point where they agree): the
    curve covers every value the bucket held, as pyqtgraph's peak mode does."""
    two = ~(np.isnan(lo) | np.isnan(hi)) & (lo != hi)
    counts = 1 + two.astype(np.intp)
    first = np.cumsum(counts) - counts
    values = np.empty(int(counts.sum()), dtype=np.float64)
    values[first] = lo
    values[first[two] + 1] = hi[two]
    return np.repeat(ts, counts), values


def break_gaps(ts: np.ndarray, values: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """NaN rows where no bucket held data for a while, so a plot shows the outage
    instead of a line across it. "A while": over two buckets, and over three
    times the usual step (an agent sampling every 5 s leaves most 1-s buckets
    empty without being down)."""
    if len(ts) < 2:
        return ts, values
    steps = np.diff(ts)
    limit = max(2.0 * width, 3.0 * float(np.median(steps)))
    at = np.flatnonzero(steps > limit) + 1
    if not len(at):
        return ts, values
    mid = (ts[at - 1] + ts[at]) / 2.0
    return np.insert(ts, at, mid), np.insert(values, at, np.nan, axis=0)


EXPORT_COLUMNS = (
    "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS time_utc",
    "date_part('epoch', ts) AS ts",
    "host",
    "gpu_index",
    "gpu_uuid",
    "boot",
    "seq",
    "host_state",
    "state",
    *METRICS,
    "array_to_string(throttle, ';') AS throttle",
)


def export_sql(all_gpus: bool) -> str:
    """CSV of raw samples in a time range; params: [hosts, indexes,] start, end.

    Selected GPUs are read like the plots read them (:func:`fetch_sql`): one
    index range scan per GPU, not the whole fleet's rows in the range."""
    where = "ts >= to_timestamp(%s) AND ts < to_timestamp(%s)"
    if all_gpus:
        src = f"(SELECT * FROM telemetry WHERE {where}) t"
    else:
        src = (
            "unnest(%s::text[], %s::int4[]) AS k(h, g) CROSS JOIN LATERAL "
            f"(SELECT * FROM telemetry WHERE host = k.h AND gpu_index = k.g AND {where} OFFSET 0) t"
        )
    return (
        f"COPY (SELECT {', '.join(EXPORT_COLUMNS)} FROM {src} "
        f"ORDER BY ts, host, gpu_index) TO STDOUT WITH (FORMAT csv, HEADER true)"
    )


ROLLUP_EXPORT_COLUMNS = (
    "to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS minute_utc",
    "date_part('epoch', bucket) AS ts",
    "host",
    "gpu_index",
    *(c for c, _ in rollup_aggregates()),
)


def export_rollups_sql(all_gpus: bool) -> str:
    """CSV of one-minute rollups (min/avg/max per metric) in a time range; params as :func:`export_sql`."""
    where = "bucket >= to_timestamp(%s) AND bucket < to_timestamp(%s)"
    if all_gpus:
        src = f"(SELECT * FROM telemetry_1m WHERE {where}) t"
    else:
        src = (
            "unnest(%s::text[], %s::int4[]) AS k(h, g) CROSS JOIN LATERAL "
            f"(SELECT * FROM telemetry_1m WHERE host = k.h AND gpu_index = k.g AND {where} OFFSET 0) t"
        )
    return (
        f"COPY (SELECT {', '.join(ROLLUP_EXPORT_COLUMNS)} FROM {src} "
        f"ORDER BY bucket, host, gpu_index) TO STDOUT WITH (FORMAT csv, HEADER true)"
    )


# (table, time column, which cutoff): raw samples go after raw_days, the
# rollups and the event log after rollup_days. (Processes are columns of
# telemetry since migration 006; gpu_processes is a view.)
RETENTION_TABLES = (
    ("telemetry", "ts", "raw"),
    ("rollup_dirty", "bucket", "raw"),
    ("telemetry_1m", "bucket", "rollup"),
    ("events", "ts", "rollup"),
)


def retention_delete_sql(table: str, column: str) -> str:
    """Delete at most ``%s`` rows older than ``%s``: short transactions, small WAL bursts."""
    return (
        f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {table} WHERE {column} < to_timestamp(%s) LIMIT %s))"
    )


RECENT_MAX_SAMPLES = 200_000

# GPUs that reported in a time range, with their identity, for the live view.
RECENT_GPUS_SQL = (
    b"SELECT host, gpu_index, uuid, name FROM gpus"
    b" WHERE last_seen > to_timestamp(%s) AND first_seen <= to_timestamp(%s) ORDER BY host, gpu_index"
)


def recent_sql(metrics: Sequence[str]) -> str:
    """Raw samples of every GPU in (start, end], newest first; params: start, end, limit.

    The BRIN index on ts finds them; the limit keeps the newest when agents
    sample faster than once a second."""
    cols = ", ".join(f"t.{m}" for m in check_metrics(metrics))
    return (
        f"SELECT t.host, t.gpu_index, date_part('epoch', t.ts), {cols} FROM telemetry t"
        " WHERE t.ts > to_timestamp(%s) AND t.ts <= to_timestamp(%s) ORDER BY t.ts DESC LIMIT %s"
    )


@dataclass(frozen=True)
class RecentSamples:
    """What :meth:`History.recent` read: GPUs seen, and one entry per sample."""

    start: float  # the window actually read (it shrinks for large fleets)
    identities: list[tuple[str, int, str, str]]  # (host, gpu_index, uuid, name)
    keys: list[GpuKey]  # per sample
    ts: np.ndarray  # float64 epoch seconds, per sample
    values: np.ndarray  # float32 (samples, metrics), NaN where not reported


# --------------------------------------------------------------------------- queries


class History:
    def __init__(self, pool: AsyncConnectionPool, *, raw_retention_days: float | None = None) -> None:
        self._pool = pool
        # Raw samples older than this are deleted by the retention job: a range
        # reaching past it reads the rollups (kept much longer), however short.
        self._raw_retention_s = None if raw_retention_days is None else raw_retention_days * 86400.0

    async def fetch(
        self,
        keys: Sequence[GpuKey],
        start: float,
        end: float,
        metrics: Sequence[str],
        max_points: int = 2000,
        *,
        now: float | None = None,
    ) -> dict[GpuKey, dict[str, Series]]:
        """Per GPU and metric: (ts seconds, values) float64 arrays of at most about
        ``max_points`` points: each bucket's min and max (see :func:`envelope`),
        NaN where nothing was reported and across outages."""
        metrics = check_metrics(metrics)
        keys = list(dict.fromkeys((h, int(i)) for h, i in keys))
        empty = np.empty(0, dtype=np.float64)
        out: dict[GpuKey, dict[str, Series]] = {k: {m: (empty, empty) for m in metrics} for k in keys}
        if not keys or not metrics or end <= start:
            return out
        now = time.time() if now is None else now
        rollup = self.reads_rollups(start, end, len(keys), now=now)
        # Two points per bucket at most (min and max).
        width = (end - start) / max(max_points // 2, 1)
        sources: tuple[float, ...] = (start, end)
        if rollup:
            width = max(width, ROLLUP_S)
            # The newest minutes come from raw rows: a minute is rolled up only
            # once it has ended and gone quiet.
            tail = max(start, min(end, (now - ROLLUP_TAIL_S) // ROLLUP_S * ROLLUP_S))
            sources = (start, tail, tail, end)
        params = (start, width, [k[0] for k in keys], [k[1] for k in keys], *sources)
        async with self._pool.connection(timeout=QUERY_CHECKOUT_S) as conn, conn.transaction():
            await conn.execute(SET_QUERY_TIMEOUT)
            cur = await conn.execute(fetch_sql(metrics, rollup).encode(), params)
            rows = await cur.fetchall()
        grouped: dict[GpuKey, list[tuple[object, ...]]] = {}
        for r in rows:
            grouped.setdefault((r[0], r[1]), []).append(r[3:])
        for key, vals in grouped.items():
            # None (no value in the bucket) becomes NaN with a float dtype.
            arr = np.array(vals, dtype=np.float64).reshape(len(vals), 2 * len(metrics) + 1)
            ts, arr = break_gaps(arr[:, 0], arr[:, 1:], width)
            out[key] = {m: envelope(ts, arr[:, 2 * i], arr[:, 2 * i + 1]) for i, m in enumerate(metrics)}
        return out

    def reads_rollups(self, start: float, end: float, gpus: int = 1, *, now: float | None = None) -> bool:
        """Whether a range is read from the one-minute rollups: a long one, or one
        that reaches back past the raw samples' retention, however short."""
        span = end - start
        if span > RAW_MAX_SPAN_S or span * gpus > RAW_MAX_ROWS:
            return True
        if self._raw_retention_s is None:
            return False
        now = time.time() if now is None else now
        return start < now - self._raw_retention_s + RAW_CUTOFF_MARGIN_S

    async def recent(
        self,
        now: float,
        window_s: float,
        metrics: Sequence[str],
        max_samples: int = RECENT_MAX_SAMPLES,
        chunk: int = 20_000,
    ) -> RecentSamples:
        """Every GPU's raw samples of the last ``window_s`` before ``now``, to refill
        the live view after a restart.

        The window shrinks so that about ``max_samples`` rows come back (a
        1,000-GPU fleet gets its last 200 s, a 16-GPU one all 10 minutes). Rows
        are read through a server-side cursor in chunks, yielding to the event
        loop in between, so the window keeps painting meanwhile.
        """
        metrics = check_metrics(metrics)
        start = now - window_s
        keys: list[GpuKey] = []
        ts_parts: list[np.ndarray] = [np.empty(0)]
        value_parts: list[np.ndarray] = [np.empty((0, len(metrics)), np.float32)]
        async with self._pool.connection() as conn:
            gpus = await (await conn.execute(RECENT_GPUS_SQL, (start, now))).fetchall()
            if gpus:
                start = max(start, now - max_samples / len(gpus))  # about 1 sample/s per GPU
                async with conn.transaction():  # a named cursor lives in a transaction
                    cur = conn.cursor("aether_recent")
                    await cur.execute(recent_sql(metrics).encode(), (start, now, max_samples))
                    # Converted chunk by chunk: no single step holds the loop for long.
                    while rows := await cur.fetchmany(chunk):
                        keys += [(r[0], r[1]) for r in rows]
                        ts_parts.append(np.array([r[2] for r in rows], dtype=np.float64))
                        value_parts.append(np.array([r[3:] for r in rows], dtype=np.float32).reshape(len(rows), -1))
                        await asyncio.sleep(0)
        identities = [(str(h), int(i), str(u), str(n)) for h, i, u, n in gpus]
        return RecentSamples(start, identities, keys, np.concatenate(ts_parts), np.concatenate(value_parts))

    async def export_csv(self, keys: Sequence[GpuKey], start: float, end: float, path: Path) -> Export:
        """Every metric of ``keys`` (empty: every GPU) in a range to a CSV file: raw
        samples, or one-minute rollups (min/avg/max) for a range that reaches back
        past the raw samples' retention."""
        params: tuple[object, ...] = (start, end)
        if keys:
            params = ([k[0] for k in keys], [int(k[1]) for k in keys], start, end)
        rollups = self.reads_rollups(start, start)
        sql = export_rollups_sql(not keys) if rollups else export_sql(not keys)
        tmp = path.with_name(path.name + ".part")
        async with self._pool.connection(timeout=QUERY_CHECKOUT_S) as conn:
            cur = conn.cursor()
            # Blocking writes to a local file are short (a few KiB per chunk)
            # and keep the export a single streaming pass.
            with tmp.open("wb") as f:
                async with cur.copy(sql.encode(), params) as copy:
                    async for chunk in copy:
                        f.write(chunk)
            rows = max(cur.rowcount, 0)
        tmp.replace(path)  # never leave a half-written file under the final name
        if rollups:
            days = (self._raw_retention_s or 0) / 86400.0
            return Export(rows, f"one-minute rollups (raw samples are kept {days:g} days)")
        return Export(rows, "samples (every metric, full resolution)")

    async def refresh_rollups(
        self,
        since: float | None = None,
        *,
        quiet_s: float = ROLLUP_QUIET_S,
        max_wait_s: float = ROLLUP_MAX_WAIT_S,
    ) -> int:
        """Bring ``telemetry_1m`` up to date; returns the GPU-minutes recomputed.

        Without ``since``: only the host-minutes ingest marked dirty that have
        been quiet for ``quiet_s`` or waited ``max_wait_s`` (cheap, run it
        often; rollups trail raw data by about a minute). With ``since``: every
        minute from that time on (a rebuild). Idempotent either way: minutes
        are recomputed from raw rows and upserted.
        """
        done = 0
        async with self._pool.connection() as conn:
            if since is not None:
                async with conn.transaction():
                    bucket0 = int(since // ROLLUP_S) * ROLLUP_S
                    await conn.execute(
                        "DELETE FROM rollup_dirty WHERE bucket >= to_timestamp(%s)", (float(bucket0),)
                    )
                    cur = await conn.execute(rollup_range_sql().encode(), (_ts(bucket0),))
                    done += max(cur.rowcount, 0)
            while True:
                async with conn.transaction():
                    cur = await conn.execute(TAKE_DIRTY_SQL, (quiet_s, max_wait_s, DIRTY_CHUNK))
                    dirty = await cur.fetchall()
                    if dirty:
                        # A second statement, so its snapshot includes every
                        # batch that committed while the markers were taken.
                        cur = await conn.execute(
                            rollup_buckets_sql().encode(), ([d[0] for d in dirty], [d[1] for d in dirty])
                        )
                        done += max(cur.rowcount, 0)
                if len(dirty) < DIRTY_CHUNK:
                    return done

    async def run_retention(self, raw_days: float = 30, rollup_days: float = 365) -> dict[str, int]:
        """Delete rows older than the limits, in short chunks; returns rows deleted per table.

        On TimescaleDB the raw hypertables drop whole chunks instead (cheap).
        """
        now = time.time()
        cut = {"raw": now - raw_days * 86400.0, "rollup": now - rollup_days * 86400.0}
        deleted: dict[str, int] = {}
        async with self._pool.connection() as conn:
            await conn.set_autocommit(True)  # one short transaction per chunk
            try:
                hyper = await _hypertables(conn)
                for table, column, which in RETENTION_TABLES:
                    if table in hyper:
                        await conn.execute(
                            "SELECT drop_chunks(%s, older_than => %s)", (table, _ts(cut[which]))
                        )
                        deleted[table] = -1  # unknown: whole chunks dropped
                        continue
                    sql = retention_delete_sql(table, column).encode()
                    total = 0
                    while True:
                        cur = await conn.execute(sql, (cut[which], RETENTION_CHUNK))
                        total += max(cur.rowcount, 0)
                        if cur.rowcount < RETENTION_CHUNK:
                            break
                    deleted[table] = total
            finally:
                await conn.set_autocommit(False)
        log.info("retention: %s", deleted)
        return deleted


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


async def _hypertables(conn: AsyncConnection) -> set[str]:
    cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
    row = await cur.fetchone()
    if not row or not row[0]:
        return set()
    cur = await conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")
    return {str(r[0]) for r in await cur.fetchall()}
