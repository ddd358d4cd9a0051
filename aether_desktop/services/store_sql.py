"""Pure parts of the store: column layouts and SQL text (no I/O; unit-tested).

:mod:`store` runs them; :mod:`store_rows` builds the rows they COPY. Columns
whose values are pre-encoded into PostgreSQL's binary format there are COPYed
as bytea: binary COPY carries no type oids, the server reads each field as the
target column's type.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """A COPYed column: its binary type and the expression that loads it from staging."""

    name: str
    stage_type: str
    load: str | None = None  # SQL expression over the staging row; default: the column itself
    encoded: bool = False  # rows carry an Encoded value (dumped verbatim, as bytea)

    @property
    def expr(self) -> str:
        return self.load or self.name

    @property
    def copy_type(self) -> str:
        return "bytea" if self.encoded else self.stage_type


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

# Table order of telemetry (001 + 006); rows are built in this order.
TELEMETRY_COLUMNS: tuple[Column, ...] = (
    Column("host", "text"),
    Column("gpu_index", "int4"),
    Column("gpu_uuid", "text"),
    Column("ts", "timestamptz", encoded=True),
    Column("boot", "text"),
    Column("seq", "int8"),
    Column("host_state", "text"),
    Column("state", "text"),
    *(Column(m, "float4") for m in REAL_METRICS),
    Column("energy_j", "float8"),
    Column("throttle", "text[]", encoded=True),
    Column("ecc_dbe", "int8"),
    Column("xid", "int4"),
    Column("slowdown_temp_c", "float4"),
    Column("proc_pid", "int8[]", encoded=True),
    Column("proc_name", "text[]", encoded=True),
    Column("proc_mem_mib", "float4[]", encoded=True),
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
STAGE_EVENTS = "aether_stage_events"


def staging_ddl(table: str, columns: Sequence[Column]) -> str:
    """TEMP staging table, emptied at every commit so it never needs a TRUNCATE."""
    cols = ", ".join(f"{c.name} {c.stage_type}" for c in columns)
    return f"CREATE TEMP TABLE IF NOT EXISTS {table} ({cols}) ON COMMIT DELETE ROWS"


def copy_sql(table: str, columns: Sequence[Column]) -> str:
    return f"COPY {table} ({', '.join(c.name for c in columns)}) FROM STDIN (FORMAT BINARY)"


def copy_types(columns: Sequence[Column]) -> list[str]:
    """Dumper types for COPY's set_types(): pre-encoded columns are passed as bytea."""
    return [c.copy_type for c in columns]


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
    table has (the TimescaleDB path may change it).
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
# One marker per host-minute (migration 007).
MARK_DIRTY_SQL = """INSERT INTO rollup_dirty (host, bucket)
SELECT h, to_timestamp(b) FROM unnest(%s::text[], %s::float8[]) AS d(h, b)
ON CONFLICT (host, bucket) DO UPDATE SET touched_at = EXCLUDED.touched_at"""


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def array_literal(values: Sequence[object]) -> str:
    """One PostgreSQL array literal (``{...}``) for a list of str, int, float or None.

    psycopg adapts a list parameter element by element in Python (15 % of the
    ingest's time for a wide fleet's inventory and marker upserts); one string
    is passed in C and the statement casts it (``%s::text[]``). Strings are
    always quoted and escaped, so any text is safe; floats use repr(), which
    round-trips exactly.
    """
    kinds = set(map(type, values))
    if kinds <= {str}:
        return "{" + ",".join(map(_quote, values)) + "}"  # type: ignore[arg-type]
    if kinds <= {int, float}:
        return "{" + ",".join(map(repr, values)) + "}"  # exact types: repr is the number
    parts = []
    for v in values:
        if v is None:
            parts.append("NULL")
        elif isinstance(v, str):
            parts.append(_quote(v))
        elif isinstance(v, bool):
            raise TypeError("no array literal for bool")
        elif isinstance(v, numbers.Integral):  # int(), float(): numpy's reprs name their type
            parts.append(repr(int(v)))
        elif isinstance(v, numbers.Real):
            parts.append(repr(float(v)))
        else:
            raise TypeError(f"no array literal for {type(v).__name__}")
    return "{" + ",".join(parts) + "}"


def literal_params(params: Sequence[Sequence[object]]) -> tuple[str, ...]:
    """UNNEST parameters (one list per column) as array literals."""
    return tuple(array_literal(col) for col in params)


# Statements the store runs, built once.
COPY_TELEMETRY = copy_sql("telemetry", TELEMETRY_COLUMNS).encode()
COPY_STAGE_TELEMETRY = copy_sql(STAGE_TELEMETRY, TELEMETRY_COLUMNS).encode()
INSERT_STAGED_TELEMETRY = insert_select_sql("telemetry", STAGE_TELEMETRY, TELEMETRY_COLUMNS).encode()
COPY_STAGE_EVENTS = copy_sql(STAGE_EVENTS, EVENT_COLUMNS).encode()
INSERT_EVENTS = insert_select_sql("events", STAGE_EVENTS, EVENT_COLUMNS, returning="id").encode()
STAGING_DDL = ";\n".join(
    staging_ddl(t, c) for t, c in ((STAGE_TELEMETRY, TELEMETRY_COLUMNS), (STAGE_EVENTS, EVENT_COLUMNS))
).encode()
