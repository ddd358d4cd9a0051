"""Pure SQL builders and row building of the store/history/ingest services (no database)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import msgspec
import numpy as np
import psycopg
import pytest

from aether_desktop.services import history_sql, store, store_rows, store_sql
from aether_desktop.services.ingest import RejectCounter, stream_specs
from aether_protocol.messages import Event, GpuSample, Process, Telemetry, encode


def tel(seq: int, ts: float, *, host: str = "h1", boot: str = "b") -> Telemetry:
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
                uuid=f"U{i}-{seq}",
                name=f"N{seq}",
                state="ok",
                temp_c=40.0,
                mem_total_mib=None if seq == 2 else 80.0 + seq,
                throttle=["a", "b"] if i == 0 else None,
                processes=[Process(pid=7, name="py")] if i == 1 else None,
            )
            for i in range(2)
        ],
    )


def test_migration_names_and_order(tmp_path: Path) -> None:
    assert store.parse_migration_name("010_alerts.sql") == (10, "alerts")
    assert store.parse_migration_name("README.md") is None
    assert store.parse_migration_name("1a_x.sql") is None
    for name in ("020_jobs.sql", "002_b.sql", "010_a.sql", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [m.version for m in store.discover_migrations(tmp_path)] == [2, 10, 20]
    (tmp_path / "10_dup.sql").write_text("")
    with pytest.raises(ValueError, match="share version 10"):
        store.discover_migrations(tmp_path)


def test_own_migration_files_are_numbered_001_to_009() -> None:
    mine = [m for m in store.discover_migrations() if m.version < 10]
    assert [m.version for m in mine] == [1, 2, 3, 4, 5, 6, 7]


def test_staging_copy_and_insert_sql() -> None:
    cols = store_sql.TELEMETRY_COLUMNS
    ddl = store_sql.staging_ddl("s", cols)
    assert ddl.startswith("CREATE TEMP TABLE IF NOT EXISTS s (host text, gpu_index int4,")
    assert "ts timestamptz" in ddl and "proc_pid int8[]" in ddl
    assert ddl.endswith("ON COMMIT DELETE ROWS")
    assert store_sql.copy_sql("s", cols[:2]) == "COPY s (host, gpu_index) FROM STDIN (FORMAT BINARY)"
    # Pre-encoded columns are dumped verbatim (bytea), the rest by psycopg's own dumpers.
    assert store_sql.copy_types(cols[:4]) == ["text", "int4", "text", "bytea"]
    assert store_sql.copy_types(cols)[-3:] == ["bytea"] * 3
    staged = store_sql.INSERT_STAGED_TELEMETRY.decode()
    assert staged.startswith("INSERT INTO telemetry (host, gpu_index,") and staged.endswith(
        "ON CONFLICT DO NOTHING"
    )
    ev = store_sql.insert_select_sql("events", "e", store_sql.EVENT_COLUMNS, returning="id")
    assert ev.endswith("ON CONFLICT DO NOTHING RETURNING id") and "raw::jsonb" in ev


def test_telemetry_columns_match_the_migrations() -> None:
    """The COPY column order is the table's: 001's columns, then 006's additions."""
    sql = (store.MIGRATIONS_DIR / "001_telemetry.sql").read_text()
    body = sql[sql.index("CREATE TABLE telemetry") :]
    declared = re.findall(r"^\s{4}([a-z_0-9]+)\s+(?:text|integer|bigint|real|double|timestamptz)", body, re.M)
    added = re.findall(
        r"ADD COLUMN ([a-z_0-9]+) ", (store.MIGRATIONS_DIR / "006_telemetry_fast_ingest.sql").read_text()
    )
    assert declared + added == [c.name for c in store_sql.TELEMETRY_COLUMNS]


def test_encode_ts_matches_postgres_to_timestamp() -> None:
    # to_timestamp(float8) = rint((s - 946684800) * 1e6) microseconds since 2000.
    for s in (946_684_800.0, 1_764_000_000.0, 1_764_000_000.1234565, 1_764_000_000.0000005, 0.5):
        want = int(np.rint((s - 946_684_800.0) * 1e6))
        assert store_rows.encode_ts(s) == struct.pack(">q", want)


def test_array_encoding_is_postgres_binary_format() -> None:
    assert store_rows.encode_text_array([]) == struct.pack(">iii", 0, 0, 25)
    enc = store_rows.encode_text_array(["ab", None])
    assert enc == struct.pack(">iiiii", 1, 1, 25, 2, 1) + struct.pack(">i", 2) + b"ab" + b"\xff\xff\xff\xff"
    pids, names, mems = store_rows.encode_processes(
        [Process(pid=9, mem_used_mib=1.5), Process(pid=3, name="x")]
    )
    assert pids == struct.pack(">iiiii", 1, 0, 20, 2, 1) + struct.pack(">iqiq", 8, 3, 8, 9)  # ordered by pid
    assert names == struct.pack(">iiiii", 1, 1, 25, 2, 1) + struct.pack(">i", 1) + b"x" + b"\xff\xff\xff\xff"
    assert mems.endswith(b"\xff\xff\xff\xff" + struct.pack(">if", 4, 1.5))


def test_build_telemetry_batch_rows_inventory_and_dirty_buckets() -> None:
    b = store_rows.build_telemetry_batch([tel(1, 125.0), tel(0, 61.0), tel(2, 130.0, boot="c")])
    assert len(b.rows) == 6 and len(b.rows[0]) == len(store_sql.TELEMETRY_COLUMNS)
    assert b.rows[0][:8] == ("h1", 0, "U0-1", store_rows.encode_ts(125.0), "b", 1, "active", "ok")
    assert b.rows[0][19] == store_rows.encode_text_array(["a", "b"]) and b.rows[1][19] is None
    assert b.rows[0][-3:] == (None, None, None)  # processes not reported
    assert b.rows[1][-3:] == store_rows.encode_processes([Process(pid=7, name="py")])
    assert b.processes == 3
    assert b.hosts == {"h1": [61.0, 130.0, "c"]}
    assert b.gpus[("h1", 0)] == ["U0-2", "N2", 81.0, 61.0, 130.0]  # latest name/uuid, last known memory
    assert b.dirty == {("h1", 60), ("h1", 120)}  # host-minutes (migration 007)
    hosts, first, last, boots = b.host_params()
    assert (hosts, first, last, boots) == (["h1"], [61.0], [130.0], ["c"])
    assert b.dirty_params() == (["h1", "h1"], [60.0, 120.0])
    assert store_rows.build_telemetry_batch([]).rows == []


def test_batch_built_in_slices_equals_one_pass() -> None:
    msgs = [tel(1, 125.0), tel(0, 61.0), tel(2, 130.0, boot="c"), tel(3, 200.0, host="h2")]
    whole = store_rows.build_telemetry_batch(msgs)
    sliced = store_rows.build_telemetry_batch(msgs[2:], store_rows.build_telemetry_batch(msgs[:2]))
    assert sliced.rows == whole.rows and sliced.processes == whole.processes == 4
    assert (sliced.hosts, sliced.gpus, sliced.dirty) == (whole.hosts, whole.gpus, whole.dirty)
    assert sliced.gpu_params() == whole.gpu_params() and sliced.dirty_params() == whole.dirty_params()


def test_decode_into_builds_rows_and_reports_rejects() -> None:
    good = encode(tel(1, 125.0))
    out = store_rows.TelemetryBatch()
    bad = store_rows.decode_into([b"not json", good, b'{"v": 2}'], out)
    assert [(i, e.reason) for i, e in bad] == [(0, "invalid_json"), (2, "missing_field")]
    assert out.rows == store_rows.build_telemetry_batch([tel(1, 125.0)]).rows
    events: list[Event] = []
    e = Event(v=1, host="h", ts=1.0, id="a", kind="wake")
    assert store_rows.decode_into([encode(e)], events) == [] and events == [e]
    prepared = store_rows.prepare_batch([tel(1, 125.0)], [e, e])
    assert prepared.events == [e] and len(prepared.event_rows) == 1 and len(prepared.telemetry.rows) == 2


def _unstorable_tel(seq: int, ts: float) -> Telemetry:
    """Valid protocol, but GPU 1's process memory does not fit its float4[] column:
    GPU 0's row builds first, so the failure comes in the middle of the message."""
    m = tel(seq, ts)
    big = [Process(pid=7, name="py", mem_used_mib=1e300)]
    gpus = [m.gpus[0], msgspec.structs.replace(m.gpus[1], uuid="other", processes=big)]
    return msgspec.structs.replace(m, gpus=gpus)


def test_a_message_whose_rows_cannot_be_built_leaves_no_trace() -> None:
    far = msgspec.structs.replace(tel(4, 150.0, host="h9"), ts=1e300)  # built directly: never validated
    msgs = [tel(1, 125.0), _unstorable_tel(5, 140.0), far, tel(2, 130.0, boot="c")]
    failed: list[tuple[int, Exception]] = []
    b = store_rows.build_telemetry_batch(msgs, failed=failed)
    assert [(k, type(e)) for k, e in failed] == [(1, OverflowError), (2, struct.error)]
    want = store_rows.build_telemetry_batch([msgs[0], msgs[3]])
    assert b.rows == want.rows and b.processes == want.processes == 2
    assert (b.hosts, b.gpus, b.dirty) == (want.hosts, want.gpus, want.dirty)  # no bookkeeping of its own either
    with pytest.raises(OverflowError):  # no list to report to: the caller sees the exception
        store_rows.build_telemetry_batch(msgs)


def test_decode_into_rejects_an_unstorable_message_and_keeps_the_rest() -> None:
    out = store_rows.TelemetryBatch()
    payloads = [b"not json", encode(tel(1, 125.0)), encode(_unstorable_tel(5, 140.0)), encode(tel(2, 130.0))]
    bad = store_rows.decode_into(payloads, out)
    assert [(i, e.reason) for i, e in bad] == [(0, "invalid_json"), (2, "unstorable")]
    assert isinstance(bad[1][1].__cause__, OverflowError)  # logged with its traceback
    assert out.rows == store_rows.build_telemetry_batch([tel(1, 125.0), tel(2, 130.0)]).rows


def test_prepare_events_leaves_out_an_event_it_cannot_row() -> None:
    e1 = Event(v=1, host="h", ts=1.0, id="a", kind="wake")
    broken = Event(v=1, host="h", ts=2.0, id="b", kind="sleep", detail=object())  # type: ignore[arg-type]
    failed: list[tuple[int, Exception]] = []
    prepared = store_rows.prepare_events([e1, broken, e1], failed)
    assert [(k, type(e)) for k, e in failed] == [(1, TypeError)]
    assert prepared.events == [e1] and len(prepared.event_rows) == 1
    assert store_rows.prepare_events([e1], failed).events == [e1] and len(failed) == 1


def test_events_deduped_and_rowed() -> None:
    e1 = Event(v=1, host="h", ts=1.0, id="a", kind="wake")
    e2 = Event(v=1, host="h", ts=2.0, id="b", kind="sleep", gpus=[0, 1])
    assert store_rows.dedupe_events([e1, e2, e1]) == [e1, e2]
    row = store_rows.build_event_rows([e2])[0]
    assert row[:8] == ("b", "h", 2.0, "sleep", None, [0, 1], None, None)
    assert '"kind":"sleep"' in str(row[8])


def test_rollup_columns_match_the_migration() -> None:
    sql = (store.MIGRATIONS_DIR / "005_rollups.sql").read_text()
    body = sql[sql.index("CREATE TABLE telemetry_1m") : sql.index("PRIMARY KEY")]
    declared = re.findall(r"^\s{4}([a-z_0-9]+)\s", body, re.M)
    assert sorted(declared[3:]) == sorted(c for c, _ in history_sql.rollup_aggregates())
    up = history_sql.rollup_buckets_sql()
    assert "ON CONFLICT (host, gpu_index, bucket) DO UPDATE SET n = EXCLUDED.n" in up
    assert "unnest(%s::text[], %s::timestamptz[]) AS d(host, bucket) JOIN gpus g" in up
    assert "CROSS JOIN LATERAL (SELECT count(*) AS n, " in up and "WHERE a.n > 0" in up
    assert "date_bin('1 minute', t.ts, timestamptz 'epoch')" in history_sql.rollup_range_sql()


def test_fetch_sql_uses_whitelisted_metrics_only() -> None:
    raw = history_sql.fetch_sql(["temp_c", "power_w"], rollup=False)
    # Each bucket's min and max per metric (spikes survive decimation).
    assert "min(t.temp_c_lo)::float8, max(t.temp_c_hi)::float8" in raw
    assert "FROM unnest(%s::text[], %s::int4[])" in raw and raw.count("%s") == 6
    assert "CROSS JOIN LATERAL (SELECT date_part('epoch', ts) AS e, 1 AS w, temp_c AS temp_c_lo" in raw
    assert "OFFSET 0) t" in raw  # not merged into a join: an index range scan per GPU
    roll = history_sql.fetch_sql(["util_pct", "fan_pct"], rollup=True)
    # The rollups' min/max where kept (the average otherwise), then the newest minutes from raw rows.
    assert "util_pct_min AS util_pct_lo, util_pct_max AS util_pct_hi" in roll
    assert "fan_pct_avg AS fan_pct_lo, fan_pct_avg AS fan_pct_hi" in roll
    assert "FROM telemetry_1m WHERE" in roll and " UNION ALL SELECT " in roll and roll.count("%s") == 8
    with pytest.raises(ValueError, match="unknown metric"):
        history_sql.fetch_sql(["temp_c", "1; DROP TABLE x"], rollup=False)
    assert history_sql.check_metrics(["temp_c", "temp_c"]) == ["temp_c"]


def test_export_and_retention_sql() -> None:
    assert history_sql.export_sql(True).count("%s") == 2
    some = history_sql.export_sql(False)
    assert some.count("%s") == 4 and "FORMAT csv, HEADER true" in some
    sql = history_sql.retention_delete_sql("telemetry", "ts")
    assert sql.startswith("DELETE FROM telemetry WHERE ctid = ANY(ARRAY(SELECT ctid FROM telemetry")
    tables = {t for t, _, _ in history_sql.RETENTION_TABLES}
    assert tables >= {"telemetry", "telemetry_1m", "events"} and "gpu_processes" not in tables  # a view


def test_stream_names_follow_the_prefix() -> None:
    tel_spec, ev_spec = stream_specs("aether")
    assert (tel_spec.stream, tel_spec.subject) == ("AETHER_TELEMETRY", "aether.telemetry.*")
    assert (ev_spec.stream, ev_spec.subject) == ("AETHER_EVENTS", "aether.events.*")
    assert stream_specs("lab.a")[0].stream == "AETHER_TELEMETRY_LAB_A"
    with pytest.raises(ValueError):
        stream_specs("bad prefix")


def test_reject_counter() -> None:
    c = RejectCounter()
    c.add("invalid_json")
    c.add("invalid_json")
    c.add("oversize")
    assert c.total == 3 and c.snapshot() == {"invalid_json": 2, "oversize": 1}


def test_inventory_cache_sends_only_rows_that_change_something() -> None:
    def batch(ts: float, *, boot: str = "b", uuid: str = "U") -> store_rows.TelemetryBatch:
        m = tel(0, ts, boot=boot)
        gpus = [msgspec.structs.replace(g, uuid=f"{uuid}{g.index}", name="N", mem_total_mib=80.0) for g in m.gpus]
        return store_rows.build_telemetry_batch([msgspec.structs.replace(m, gpus=gpus)])

    cache = store_rows.InventoryCache(refresh_s=10.0)
    first = batch(100.0)
    assert cache.hosts_to_send(first) == ["h1"] and cache.gpus_to_send(first) == [("h1", 0), ("h1", 1)]
    cache.committed(first, ["h1"], [("h1", 0), ("h1", 1)])
    assert cache.hosts_to_send(batch(105.0)) == [] and cache.gpus_to_send(batch(105.0)) == []
    later = batch(111.0)  # last_seen would move by more than 10 s
    assert cache.hosts_to_send(later) == ["h1"] and len(cache.gpus_to_send(later)) == 2
    assert cache.gpus_to_send(batch(50.0)) == [("h1", 0), ("h1", 1)]  # reaches before first_seen
    cache.committed(later, ["h1"], [("h1", 0), ("h1", 1)])  # known: 100 .. 111, boot b
    assert cache.hosts_to_send(batch(112.0, boot="b2")) == ["h1"]  # a new boot goes at once
    assert cache.hosts_to_send(batch(105.0, boot="b2")) == []  # ... unless older than what is known
    swapped = batch(112.0, uuid="V")  # GPUs replaced
    assert cache.gpus_to_send(swapped) == [("h1", 0), ("h1", 1)]
    # Not committed (rolled back): still to send next time; committed: recorded.
    assert cache.gpus_to_send(swapped) == [("h1", 0), ("h1", 1)]
    cache.committed(swapped, [], [("h1", 0)])
    assert cache.gpus_to_send(swapped) == [("h1", 1)]


def test_array_literals() -> None:
    assert store_sql.array_literal([]) == "{}"
    assert store_sql.array_literal(["a", 'say "hi"', "back\\slash"]) == '{"a","say \\"hi\\"","back\\\\slash"}'
    assert store_sql.array_literal([1, 2.5, None, -0.1]) == "{1,2.5,NULL,-0.1}"
    assert store_sql.array_literal(["x", None]) == '{"x",NULL}'
    with pytest.raises(TypeError):
        store_sql.array_literal([True])
    assert store_sql.literal_params((["h"], [60.0])) == ('{"h"}', "{60.0}")


def test_array_literal_of_numpy_numbers() -> None:
    assert store_sql.array_literal([np.float64(1.5), None, np.int64(3)]) == "{1.5,NULL,3}"


# --------------------------------------------------------------------------- TimescaleDB (scripted connection)


class _Cursor:
    def __init__(self, rows: list[tuple[object, ...]]) -> None:
        self._rows = rows

    async def fetchone(self) -> tuple[object, ...] | None:
        return self._rows[0] if self._rows else None

    async def fetchall(self) -> list[tuple[object, ...]]:
        return self._rows


class _ScriptedTimescale:
    """Answers enable_timescaledb's queries as a TimescaleDB 2.x server with the
    real telemetry key would; ``refuse`` makes statements containing it fail."""

    def __init__(self, refuse: str | None = None, version: str = "2.22.1",
                 existing: bool | None = None) -> None:
        self.refuse = refuse
        self.version = version
        self.existing = existing  # None: not a hypertable yet; else its compression_enabled
        self.log: list[str] = []
        self.rolled_back = 0

    async def execute(self, sql: str | bytes, params: object = None) -> _Cursor:
        text = sql.decode() if isinstance(sql, bytes) else sql
        self.log.append(text)
        if self.refuse and self.refuse in text:
            raise psycopg.errors.FeatureNotSupported("column must be used for segmenting or ordering")
        if "pg_available_extensions" in text:
            return _Cursor([(1,)])
        if "FROM pg_extension" in text:
            return _Cursor([(self.version,)])
        if "timescaledb_information.hypertables" in text:
            return _Cursor([] if self.existing is None else [(self.existing,)])
        if "FROM pg_index" in text:
            return _Cursor([("host",), ("gpu_index",), ("ts",), ("boot",), ("seq",)])
        return _Cursor([])  # not yet a hypertable; DDL and policies return nothing we read

    def transaction(self) -> _Txn:
        return _Txn(self)


class _Txn:
    def __init__(self, conn: _ScriptedTimescale) -> None:
        self.conn = conn

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, et: object, exc: object, tb: object) -> bool:
        if exc is not None:
            self.conn.rolled_back += 1
        return False


async def test_timescaledb_conversion_statements() -> None:
    conn = _ScriptedTimescale()
    assert await store.enable_timescaledb(conn, raw_retention_days=7) is True  # type: ignore[arg-type]
    alter = next(s for s in conn.log if s.startswith("ALTER TABLE telemetry"))
    assert "compress_segmentby = 'host, gpu_index'" in alter
    assert "compress_orderby = 'ts, boot, seq'" in alter  # every unique-key column is covered
    (create,) = [s for s in conn.log if s.startswith("SELECT create_hypertable")]
    assert "create_default_indexes => false" in create and "migrate_data => true" in create
    assert any("add_compression_policy" in s for s in conn.log)
    assert any("add_retention_policy" in s for s in conn.log)
    assert "pg_advisory_unlock" in conn.log[-1] and conn.rolled_back == 0


async def test_timescaledb_refusal_leaves_plain_tables(caplog: pytest.LogCaptureFixture) -> None:
    conn = _ScriptedTimescale(refuse="timescaledb.compress")
    assert await store.enable_timescaledb(conn) is False  # type: ignore[arg-type]
    assert conn.rolled_back == 1  # the hypertable conversion went back with it
    assert "pg_advisory_unlock" in conn.log[-1]
    assert "rolled back, the raw tables stay as they were" in caplog.text


async def test_timescaledb_before_2_19_is_not_compressed(caplog: pytest.LogCaptureFixture) -> None:
    """Older releases skip rows after the first conflict in a compressed chunk
    (timescale/timescaledb#7672): hypertable and retention, no compression."""
    conn = _ScriptedTimescale(version="2.17.2")
    assert await store.enable_timescaledb(conn) is True  # type: ignore[arg-type]
    assert any("create_hypertable" in s for s in conn.log)
    assert any("add_retention_policy" in s for s in conn.log)
    assert not any("timescaledb.compress," in s or "compression_policy" in s for s in conn.log)
    assert "is not compressed further" in caplog.text


async def test_timescaledb_existing_hypertables(caplog: pytest.LogCaptureFixture) -> None:
    # Compressed by an earlier station on a release before the ON CONFLICT fix: no more compression.
    old = _ScriptedTimescale(version="2.17.2", existing=True)
    assert await store.enable_timescaledb(old) is True  # type: ignore[arg-type]
    assert not any("create_hypertable" in s for s in old.log)
    assert any("remove_compression_policy" in s for s in old.log)
    assert not any("timescaledb.compress," in s for s in old.log)
    # Uncompressed hypertable, TimescaleDB now 2.19+: compression is turned on.
    upgraded = _ScriptedTimescale(version="2.19.0", existing=False)
    assert await store.enable_timescaledb(upgraded) is True  # type: ignore[arg-type]
    assert any("compress_orderby = 'ts, boot, seq'" in s for s in upgraded.log)
    assert any("add_compression_policy" in s for s in upgraded.log)
    # Already compressed on 2.19+: left as it is (retention policy ensured).
    done = _ScriptedTimescale(existing=True)
    assert await store.enable_timescaledb(done) is True  # type: ignore[arg-type]
    assert not any("timescaledb.compress," in s or "compression_policy" in s for s in done.log)
    assert any("add_retention_policy" in s for s in done.log)


def test_timescaledb_version_parsing() -> None:
    assert store.version_tuple("2.18.1") == (2, 18, 1)
    assert store.version_tuple("2.19.0-dev") == (2, 19, 0)
    assert store.version_tuple("2.9.3") < (2, 18, 1) and store.version_tuple("0") < (2, 18, 1)
    assert store.version_tuple("2.19") == (2, 19, 0) >= (2, 19, 0)
