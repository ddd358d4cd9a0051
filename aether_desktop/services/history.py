"""History queries over the stored telemetry: plots, rollups, CSV export, retention.

Plots never receive more points than they can draw: every query is decimated
server-side into buckets, each carrying its samples' min and max, about
``max_points`` points per GPU. Short ranges read the raw ``telemetry`` table;
long ones, and ones older than the raw samples' retention, read the one-minute
rollups in ``telemetry_1m``, which an incremental refresh keeps current to
about a minute (a minute is rolled up once it has ended). The SQL text and the
series shaping are in :mod:`history_sql`.
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

from aether_desktop.services.history_sql import (
    RECENT_GPUS_SQL,
    RETENTION_TABLES,
    ROLLUP_MAX_WAIT_S,
    ROLLUP_QUIET_S,
    ROLLUP_S,
    TAKE_DIRTY_SQL,
    Series,
    break_gaps,
    check_metrics,
    envelope,
    export_rollups_sql,
    export_sql,
    fetch_sql,
    recent_sql,
    retention_delete_sql,
    rollup_buckets_sql,
    rollup_range_sql,
)

log = logging.getLogger(__name__)

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
DIRTY_CHUNK = 5000
RETENTION_CHUNK = 20_000
RECENT_MAX_SAMPLES = 200_000

GpuKey = tuple[str, int]


@dataclass(frozen=True)
class Export:
    """What :meth:`History.export_csv` wrote: rows, and what one row is."""

    rows: int
    what: str


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
