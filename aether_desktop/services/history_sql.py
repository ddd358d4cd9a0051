"""Pure parts of history: metric names, SQL text and series shaping (no I/O; unit-tested).

:mod:`history` runs them. Metric names are the protocol's field names, checked
against a whitelist; user strings never reach SQL text, only the fixed column
names they map to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aether_desktop.services.store_sql import REAL_METRICS

# Numeric per-GPU metrics (protocol field names) a plot or export can ask for.
METRICS: tuple[str, ...] = (*REAL_METRICS, "energy_j", "ecc_dbe", "xid", "slowdown_temp_c")
MIN_MAX_METRICS = ("temp_c", "mem_used_mib", "util_pct", "power_w")

ROLLUP_S = 60.0
ROLLUP_QUIET_S = 5.0  # a minute is rolled up once no rows came for it for this long
ROLLUP_MAX_WAIT_S = 120.0  # ... or once it waited this long

Series = tuple[np.ndarray, np.ndarray]


def check_metrics(metrics: Sequence[str]) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    return list(dict.fromkeys(metrics))




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
