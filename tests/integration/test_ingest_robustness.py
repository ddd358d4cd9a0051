"""Ingest robustness: one bad message, a failing hook, a deleted stream never stop storage.

Real nats-server (JetStream) + real PostgreSQL, as in test_ingest_noloss; the
only thing faked is a bug (an event hook that raises, a decode step that
raises once), never the wire or the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import psycopg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api

from aether_desktop.config import StationConfig
from aether_desktop.services import ingest as ingest_mod
from aether_desktop.services.ingest import (
    IngestStatus,
    ensure_consumer,
    ensure_stream,
    ensure_streams,
    stream_specs,
)
from aether_desktop.services.store import Store
from aether_desktop.station import Station
from aether_protocol import subjects
from aether_protocol.messages import Event, encode
from tests.integration.test_ingest_noloss import (
    assert_exactly_once,
    make_ingest,
    publish,
    telemetry_msg,
    wait_for,
)

pytestmark = pytest.mark.integration


def task(ingest: ingest_mod.JetStreamIngest, name: str) -> asyncio.Task[None]:
    return next(t for t in ingest._tasks if t.get_name() == name)


async def publish_raw(nc: NatsClient, kind: str, payloads: Sequence[bytes]) -> None:
    subject = subjects.telemetry("aether", "h9") if kind == "telemetry" else subjects.events("aether", "h1")
    for raw in payloads:
        await nc.publish(subject, raw)
    await nc.flush(timeout=10)


async def stored_event_ids(dsn: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT id FROM events")
        return {r[0] for r in await cur.fetchall()}


def event(i: str, **kw: Any) -> bytes:
    return encode(Event(v=1, host="h1", ts=1_764_000_000.0, id=i, kind="agent_started", **kw))


# --------------------------------------------------------------------------- (1) unstorable values


GPU = '"uuid":"u","name":"n","state":"ok"'
OUT_OF_RANGE = [  # valid JSON and types, but past what storage holds: rejected as invalid_value
    b'{"v":1,"host":"h9","boot":"x","seq":1,"ts":1e300,"state":"active","gpus":[]}',
    b'{"v":1,"host":"h9","boot":"x","seq":2,"ts":1.0,"state":"active","gpus":[{"index":0,%s,'
    b'"processes":[{"pid":9223372036854775808}]}]}' % GPU.encode(),
    b'{"v":1,"host":"h9","boot":"x","seq":3,"ts":1.0,"state":"active","gpus":[{"index":4294967296,%s}]}'
    % GPU.encode(),
]
# Passes validation, but its process memory does not fit float4: its rows cannot be built.
UNSTORABLE = (
    b'{"v":1,"host":"h9","boot":"x","seq":4,"ts":1.0,"state":"active","gpus":[{"index":0,%s,'
    b'"processes":[{"pid":1,"mem_used_mib":1e300}]}]}' % GPU.encode()
)


async def test_values_storage_cannot_hold_are_rejected_and_the_rest_stored(
    nc: NatsClient, store: Store, pg_dsn: str
) -> None:
    ingest = make_ingest(nc, store)
    await ingest.start()
    try:
        first = [telemetry_msg("h1", "b", s) for s in range(20)]
        await publish_raw(nc, "telemetry", OUT_OF_RANGE[:2])
        await publish(nc, first[:10])
        await publish_raw(nc, "telemetry", [UNSTORABLE, OUT_OF_RANGE[2]])
        await publish(nc, first[10:])
        # int4 columns wrapped in binary COPY: 4294967297 was stored as 1.
        await publish_raw(nc, "events", [event("bad-exit", exit_code=2**32 + 1), event("bad-gpu", gpus=[2**32])])
        await publish_raw(nc, "events", [event("good")])
        await assert_exactly_once(pg_dsn, first)
        await wait_for(lambda: ingest.status.rejected == 6, "6 rejections")
        assert ingest.rejects.snapshot() == {"invalid_value": 5, "unstorable": 1}
        assert not task(ingest, "ingest-fetch-telemetry").done()
        # Still storing after them.
        more = [telemetry_msg("h1", "b", s) for s in range(20, 30)]
        await publish(nc, more)
        await assert_exactly_once(pg_dsn, first + more)
        await wait_for(lambda: ingest.status.events_written == 1, "the good event")
        assert await stored_event_ids(pg_dsn) == {"good"}
        assert ingest.status.last_error is None and ingest.status.db_ok
    finally:
        await ingest.stop()


async def test_an_unexpected_error_in_the_fetch_loop_is_reported_and_survived(
    nc: NatsClient, store: Store, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ingest_mod.decode_batch
    raised: list[int] = []

    async def buggy(msgs: Any, kind: str, *a: Any) -> Any:
        if kind == "telemetry" and not raised:
            raised.append(len(msgs))
            raise RuntimeError("decoder bug")
        return await real(msgs, kind, *a)

    monkeypatch.setattr(ingest_mod, "decode_batch", buggy)
    statuses: list[IngestStatus] = []
    # ack_wait 2 s: the batch the bug dropped comes back that soon.
    ingest = make_ingest(nc, store, ack_wait_s=2.0, on_status=statuses.append)
    await ingest.start()
    try:
        msgs = [telemetry_msg("h1", "b", s) for s in range(30)]
        await publish(nc, msgs)
        await assert_exactly_once(pg_dsn, msgs)
        assert raised
        assert any("decoder bug" in (s.last_error or "") for s in statuses)
        await wait_for(lambda: ingest.status.last_error is None, "the error cleared once storing again")
        assert not task(ingest, "ingest-fetch-telemetry").done()
    finally:
        await ingest.stop()


# --------------------------------------------------------------------------- (2) failing hooks


async def test_a_hook_failing_on_one_event_stores_it_without_hooks(
    nc: NatsClient, store: Store, pg_dsn: str
) -> None:
    """It used to be retried forever (a batch) or to kill the events writer (one by one).
    Now the hook is tried a few times, then the event is stored without it: a station
    bug in a hook costs that hook's side effect, never the fleet's event log."""
    calls: list[str] = []

    async def hook(conn: psycopg.AsyncConnection, events: Sequence[Event]) -> None:
        calls.extend(e.id for e in events)
        if any(e.id.startswith("boom") for e in events):
            raise ValueError("hook bug")

    store.add_event_hook(hook)
    # One batch: published before the ingest starts. The NUL character (PostgreSQL
    # refuses it) sends the batch one by one at once; "boom" then fails on its own.
    await ensure_streams(nc.jetstream())
    await publish_raw(nc, "events", [event("nul", detail="a\x00b"), event("boom"), event("ok1"), event("ok2")])
    ingest = make_ingest(nc, store, max_backoff_s=0.2)
    await ingest.start()
    try:
        await wait_for(lambda: ingest.status.events_written == 3, "3 events stored")
        assert ingest.rejects.snapshot() == {"db_refused": 1}  # only what PostgreSQL refuses
        assert calls.count("boom") == 3  # STORE_ATTEMPTS, then stored without the hook
        await publish_raw(nc, "events", [event("boom2"), event("ok3")])  # a batch failing as a whole
        await publish_raw(nc, "events", [event("ok4")])
        await wait_for(lambda: ingest.status.events_written == 6, "6 events stored")
        assert await stored_event_ids(pg_dsn) == {"boom", "ok1", "ok2", "boom2", "ok3", "ok4"}
        assert ingest.rejects.total == 1
        assert not task(ingest, "ingest-write-events-0").done()
        await wait_for(lambda: ingest.status.waiting_messages == 0, "nothing left in the stream")
        assert ingest.status.db_ok and ingest.status.last_error is None
    finally:
        await ingest.stop()


async def test_a_hook_failing_once_loses_nothing(nc: NatsClient, store: Store, pg_dsn: str) -> None:
    failed: list[int] = []

    async def flaky(conn: psycopg.AsyncConnection, events: Sequence[Event]) -> None:
        if not failed:
            failed.append(len(events))
            raise ConnectionError("transient")

    store.add_event_hook(flaky)
    ingest = make_ingest(nc, store, max_backoff_s=0.2)
    await ingest.start()
    try:
        await publish_raw(nc, "events", [event(f"e{i}") for i in range(5)])
        await wait_for(lambda: ingest.status.events_written == 5, "5 events")
        assert failed and ingest.rejects.total == 0
    finally:
        await ingest.stop()


async def test_a_station_bug_on_the_write_path_holds_telemetry_never_drops_it(
    nc: NatsClient, store: Store, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-database failure that hits every write (a station bug) is not the
    messages' fault: they wait in JetStream, the status says why, and once the
    station works again every sample is stored, none rejected."""
    failures: list[str] = []
    real = Store._write_txn

    async def broken(self: Store, *a: Any, **kw: Any) -> Any:
        if len(failures) < 12:  # past the batch's and every per-message try count
            failures.append("x")
            raise RuntimeError("station bug")
        return await real(self, *a, **kw)

    monkeypatch.setattr(Store, "_write_txn", broken)
    seen: list[str] = []
    ingest = make_ingest(nc, store, max_backoff_s=0.05, batch=10,
                         on_status=lambda st: seen.append(st.last_error or ""))
    await ingest.start()
    try:
        msgs = [telemetry_msg("sb", "b", s) for s in range(5)]
        await publish(nc, msgs)
        await assert_exactly_once(pg_dsn, msgs)
        assert len(failures) == 12 and ingest.rejects.total == 0
        assert any("station bug" in e for e in seen)  # the status bar said why nothing was stored
        await wait_for(lambda: ingest.status.last_error is None, "the problem cleared")
    finally:
        await ingest.stop()


# --------------------------------------------------------------------------- (3) stream deleted


async def test_deleted_stream_is_reported_and_recreated(
    nc: NatsClient, store: Store, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While `refuse` is set, recreating the stream fails as if JetStream did not answer,
    # so the problem must stay reported across status checks, not flicker away.
    refuse = asyncio.Event()
    real_ensure = ingest_mod.ensure_stream

    async def ensure_unless_refused(*a: Any, **kw: Any) -> str | None:
        if refuse.is_set():
            raise nats.errors.TimeoutError
        return await real_ensure(*a, **kw)

    monkeypatch.setattr(ingest_mod, "ensure_stream", ensure_unless_refused)
    statuses: list[IngestStatus] = []
    ingest = make_ingest(nc, store, repair_interval_s=0.5, on_status=statuses.append)
    await ingest.start()
    js = nc.jetstream()
    spec = stream_specs("aether")[0]
    try:
        first = [telemetry_msg("h1", "b", s) for s in range(10)]
        await publish(nc, first)
        await assert_exactly_once(pg_dsn, first)

        refuse.set()
        await js.delete_stream(spec.stream)
        await wait_for(lambda: not ingest.status.nats_ok, "nats_ok False")
        assert "telemetry pull refused" in (ingest.status.last_error or "")
        seen = len(statuses)
        await asyncio.sleep(1.5)  # several status checks (every 0.2 s) and repair tries (0.5 s)
        assert all(not s.nats_ok and "pull refused" in (s.last_error or "") for s in statuses[seen:])
        assert not ingest.status.nats_ok and "pull refused" in (ingest.status.last_error or "")

        refuse.clear()
        await wait_for(lambda: ingest.status.nats_ok and ingest.status.last_error is None, "recovered")
        later = [telemetry_msg("h1", "b", s) for s in range(10, 20)]
        await publish(nc, later, acked=True)  # acked: the recreated stream has them
        await assert_exactly_once(pg_dsn, first + later)

        # The durable alone: the stream keeps what arrives meanwhile.
        await js.delete_consumer(spec.stream, "aether-store-telemetry")
        more = [telemetry_msg("h1", "b", s) for s in range(20, 30)]
        await publish(nc, more, acked=True)
        await assert_exactly_once(pg_dsn, first + later + more)
        await wait_for(lambda: ingest.status.nats_ok and ingest.status.last_error is None, "recovered again")
    finally:
        await ingest.stop()


def test_station_shows_an_ingest_problem_while_the_database_is_fine() -> None:
    shown: list[tuple[bool, int, str]] = []

    class Sink:
        def set_connection(self, state: str, detail: str) -> None: ...

        def set_db_status(self, ok: bool, waiting: int, detail: str) -> None:
            shown.append((ok, waiting, detail))

        def post_notice(self, level: str, text: str) -> None: ...

    station = Station(StationConfig(nats_servers=("nats://127.0.0.1:1",), db_dsn="x"), Sink())
    station._on_ingest_status(IngestStatus(nats_ok=False, waiting=5, last_error="NATS: telemetry pull refused (503)"))
    assert shown[-1] == (False, 0, "history ingest: NATS: telemetry pull refused (503)")
    station._on_ingest_status(IngestStatus(db_ok=False, waiting=5, last_error="database: refused"))
    assert shown[-1] == (False, 5, "database unavailable, 5 samples waiting (database: refused)")
    station._on_ingest_status(IngestStatus(waiting=5))
    assert shown[-1] == (True, 5, "")


# --------------------------------------------------------------------------- (4) settings, waiting


async def test_stream_and_consumer_settings_updated_in_place(nc: NatsClient) -> None:
    js = nc.jetstream()
    spec = stream_specs("aether")[0]
    await js.add_stream(
        api.StreamConfig(
            name=spec.stream, subjects=[spec.subject], storage=api.StorageType.FILE,
            max_age=3600.0, duplicate_window=120.0, max_bytes=10_000_000,
        )
    )  # fmt: skip
    assert await ensure_stream(js, spec, max_age_s=7200.0, duplicate_window_s=60.0) == "updated"
    config = (await js.stream_info(spec.stream)).config
    assert (config.max_age, config.duplicate_window) == (7200.0, 60.0)
    assert config.max_bytes == 10_000_000  # the operator's setting stays
    assert await ensure_stream(js, spec, max_age_s=7200.0, duplicate_window_s=60.0) is None

    assert await ensure_consumer(js, spec, "d", ack_wait_s=60.0, max_ack_pending=1000) == "created"
    assert await ensure_consumer(js, spec, "d", ack_wait_s=60.0, max_ack_pending=1000) is None
    assert await ensure_consumer(js, spec, "d", ack_wait_s=30.0, max_ack_pending=5000) == "updated"
    info = (await js.consumer_info(spec.stream, "d")).config
    assert (info.ack_wait, info.max_ack_pending, info.filter_subject) == (30.0, 5000, spec.subject)


async def test_waiting_counts_gpu_samples(nc: NatsClient, store: Store, pg_dsn: str) -> None:
    ingest = make_ingest(nc, store, write_timeout_s=60.0)
    await ingest.start()
    try:
        first = [telemetry_msg("h1", "b", s, gpus=4) for s in range(5)]
        await publish(nc, first)
        await wait_for(lambda: ingest.status.rows_written == 20, "20 rows")
        async with await psycopg.AsyncConnection.connect(pg_dsn) as blocker:
            await blocker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")  # nothing gets stored
            await publish(nc, [telemetry_msg("h1", "b", s, gpus=4) for s in range(5, 35)])
            await wait_for(lambda: ingest.status.waiting_messages == 30, "30 messages waiting")
            assert ingest.status.waiting == 120  # 4 GPU samples each
            await blocker.rollback()
        await wait_for(lambda: ingest.status.waiting == 0, "drained")
    finally:
        await ingest.stop()
