"""JetStream -> PostgreSQL ingest: every published sample stored exactly once.

Agents publish telemetry and events with core NATS publishes; the streams
``AETHER_TELEMETRY`` and ``AETHER_EVENTS`` capture them. This service reads
both through durable pull consumers, writes each fetched batch in one
transaction (:meth:`Store.write_batch`) and acks the messages only after
commit. Whatever fails in between (station killed, database down, NATS
restarted, an ack lost) ends in a redelivery, and the idempotent store turns
that redelivery into a no-op: at-least-once delivery + idempotent writes =
exactly-once storage.

Per stream, a fetch task and its write tasks (two for telemetry, one for
events) are joined by a one-slot queue, so fetching (the next batch is
prefetched), decoding and building rows overlap PostgreSQL's work on the
batches being written, and memory stays bounded (at most writers + 3 batches
per stream) when the database is down: the writers keep retrying, the fetcher
blocks, and the backlog stays in JetStream where :class:`IngestStatus` reports
it as ``waiting``. Acks are explicit, one per message after commit: with
AckPolicy.ALL a delivery lost in transit (a NATS restart) would be acked by a
later batch's ack and never stored; it measured no faster here anyway.

Nothing one message holds may stop a stream: a message whose rows cannot be
built, that PostgreSQL refuses, or whose storing keeps failing otherwise (an
event hook's bug: retried a few times first) is rejected on its own
(counted, logged, terminated) and the rest stored. A stream or durable
deleted under a running station is recreated, and reported until it is.

Stream and consumer setup and the status types live in
:mod:`aether_desktop.services.ingest_streams` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import nats.errors
import psycopg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from aether_desktop.services.history import History
from aether_desktop.services.history_sql import ROLLUP_MAX_WAIT_S, ROLLUP_QUIET_S
from aether_desktop.services.ingest_decode import DecodedBatch, decode_batch
from aether_desktop.services.ingest_streams import IngestStatus as IngestStatus
from aether_desktop.services.ingest_streams import RejectCounter as RejectCounter
from aether_desktop.services.ingest_streams import StatusBoard
from aether_desktop.services.ingest_streams import StatusCallback as StatusCallback
from aether_desktop.services.ingest_streams import StreamSpec as StreamSpec
from aether_desktop.services.ingest_streams import ensure_consumer as ensure_consumer
from aether_desktop.services.ingest_streams import ensure_stream as ensure_stream
from aether_desktop.services.ingest_streams import ensure_streams as ensure_streams
from aether_desktop.services.ingest_streams import stream_specs as stream_specs
from aether_desktop.services.pull_consumer import PullConsumer
from aether_desktop.services.store import Store
from aether_desktop.services.store_rows import (
    PreparedBatch,
)
from aether_protocol import subjects

log = logging.getLogger(__name__)
_T = TypeVar("_T")


# Tries of a batch that fails with something other than a database error (e.g.
# an event hook's bug) before it is written one message at a time, and of an
# event before it is stored without its hooks.
STORE_ATTEMPTS = 3

# A stream or consumer that refuses pulls (deleted, e.g.) is recreated at most this often.
REPAIR_INTERVAL_S = 5.0


class _Pipe:
    """One stream's durable consumer and its fetch -> write hand-off."""

    def __init__(self, spec: StreamSpec, consumer: PullConsumer) -> None:
        self.spec = spec
        self.consumer = consumer
        self.queue: asyncio.Queue[DecodedBatch] = asyncio.Queue(maxsize=1)
        self.waiting = 0
        # Batches fetched and not yet acked, by id(): NAKed on stop so the next
        # run gets them at once instead of after ack_wait.
        self.unacked: dict[int, list[Msg]] = {}
        # monotonic() when each writer started on its current batch (or, writing
        # one by one, its current message), by batch id().
        self.write_started: dict[int, float] = {}
        self.repaired_at = -math.inf  # monotonic() of the last try to recreate the stream/consumer


class JetStreamIngest:
    def __init__(
        self,
        nc: NatsClient,
        store: Store,
        *,
        prefix: str = subjects.DEFAULT_PREFIX,
        durable: str = "aether-store",
        max_age_s: float = 86400.0,
        duplicate_window_s: float = 120.0,
        batch: int = 2000,
        fetch_timeout_s: float = 0.2,
        ack_wait_s: float = 60.0,
        max_backoff_s: float = 5.0,
        write_timeout_s: float = 20.0,
        stall_s: float = 10.0,
        status_interval_s: float = 1.0,
        rollup_interval_s: float | None = 5.0,
        on_status: StatusCallback | None = None,
        rejects: RejectCounter | None = None,
        telemetry_writers: int = 2,
        store_attempts: int = STORE_ATTEMPTS,
        repair_interval_s: float = REPAIR_INTERVAL_S,
    ) -> None:
        self._nc = nc
        self._store = store
        self._prefix = prefix
        self._durable = durable
        self._max_age_s = max_age_s
        self._dup_window_s = duplicate_window_s
        self._batch = batch
        self._telemetry_writers = max(1, telemetry_writers)
        self._fetch_timeout_s = fetch_timeout_s
        self._ack_wait_s = ack_wait_s
        self._max_backoff_s = max_backoff_s
        self._write_timeout_s = write_timeout_s
        self._stall_s = stall_s
        self._status_interval_s = status_interval_s
        self._rollup_interval_s = rollup_interval_s
        self._store_attempts = max(1, store_attempts)
        self._repair_interval_s = repair_interval_s
        # Room for every batch in flight: prefetched, being decoded, queued, and one per writer.
        self._max_ack_pending = batch * (3 + self._telemetry_writers)
        self.rejects = rejects or RejectCounter()
        self._board = StatusBoard(on_status, lambda: bool(nc.is_connected))
        # GPU samples per telemetry message seen: turns the messages waiting into samples.
        self._tel_messages = 0
        self._tel_rows = 0
        self._pipes: list[_Pipe] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._last_rows_at = -math.inf  # monotonic() of the last batch that stored new rows
        # Set once the streams held nothing unstored at some status check: what was
        # published while the station was away is then in the database.
        self.caught_up = asyncio.Event()

    @property
    def status(self) -> IngestStatus:
        return self._board.status

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        js = self._nc.jetstream()
        await ensure_streams(
            js, self._prefix, max_age_s=self._max_age_s, duplicate_window_s=self._dup_window_s
        )
        self._stop.clear()
        for spec in stream_specs(self._prefix):
            durable = f"{self._durable}-{spec.kind}"
            await ensure_consumer(
                js, spec, durable, ack_wait_s=self._ack_wait_s, max_ack_pending=self._max_ack_pending
            )
            consumer = PullConsumer(self._nc, spec.stream, durable)
            await consumer.subscribe()
            pipe = _Pipe(spec, consumer)
            self._pipes.append(pipe)
            self._tasks.append(asyncio.create_task(self._fetch_loop(pipe), name=f"ingest-fetch-{spec.kind}"))
            # Telemetry gets several writers, each on its own pooled connection,
            # so one batch's COPY streams while another waits for its upserts
            # and commit: a single writer left both this process and PostgreSQL
            # idle half the time. Events keep one (hooks see them in order).
            writers = self._telemetry_writers if spec.kind == "telemetry" else 1
            for i in range(writers):
                name = f"ingest-write-{spec.kind}-{i}"
                self._tasks.append(asyncio.create_task(self._write_loop(pipe), name=name))
        self._tasks.append(asyncio.create_task(self._status_loop(), name="ingest-status"))
        if self._rollup_interval_s:
            self._tasks.append(asyncio.create_task(self._rollup_loop(), name="ingest-rollup"))

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Finish the batch in flight if it can within ``grace_s``; un-acked
        messages are simply redelivered to the next run."""
        self._stop.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for pipe in self._pipes:
            for batch in pipe.unacked.values():
                for m in batch:
                    with contextlib.suppress(nats.errors.Error):
                        await m.nak()
            pipe.unacked.clear()
            await pipe.consumer.close()
        self._pipes.clear()
        if self._nc.is_connected:
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await self._nc.flush(timeout=2)  # push the last acks out

    # ------------------------------------------------------------------ loops

    async def _fetch_loop(self, pipe: _Pipe) -> None:
        kind = pipe.spec.kind
        while not self._stop.is_set():
            try:
                if not await self._fetch_once(pipe):
                    return
            except Exception as exc:  # noqa: BLE001 - a bug must not end this stream's storage silently
                # The messages of this round were not handed on: JetStream
                # redelivers them after ack_wait.
                log.exception("%s ingest: unexpected error; carrying on", kind)
                self._board.set_problem(f"{kind} ingest", f"{kind}: unexpected {exc!r}")
                await self._sleep(1.0)

    async def _fetch_once(self, pipe: _Pipe) -> bool:
        """Fetch, decode and hand on one batch; False when stopping."""
        kind = pipe.spec.kind
        try:
            # The outer deadline is a watchdog: a fetch must never hang the loop.
            msgs, refused = await asyncio.wait_for(
                pipe.consumer.fetch(self._batch, self._fetch_timeout_s), self._fetch_timeout_s + 10
            )
        except TimeoutError:  # nats.errors.TimeoutError is one too
            return True  # NATS reconnecting: the client retries
        except nats.errors.Error as exc:
            refused = f"{exc!r}"
            msgs = []
        if refused is not None:  # e.g. the stream or the consumer was deleted: report, repair, retry
            await self._pull_refused(pipe, refused)
            return True
        self._board.set_problem(f"{kind} pull", None)
        if not msgs:
            return True
        good, bad, prepared = await decode_batch(msgs, kind)
        for m, err in bad:
            # An unstorable message's cause is an unexpected exception: log its traceback.
            log.warning("rejected %s message on %s: %s", kind, m.subject, err, exc_info=err.__cause__)
            self.rejects.add(err.reason)
            await self._term(m)
        if self._board.status.rejected != self.rejects.total:
            self._board.update(rejected=self.rejects.total)
        if good:
            if kind == "telemetry":
                self._tel_messages += len(good)
                self._tel_rows += len(prepared.telemetry.rows)
            pipe.unacked[id(good)] = good
            if not await self._put(pipe, DecodedBatch(good, prepared)):
                return False
        self._board.set_problem(f"{kind} ingest", None)
        return True

    async def _pull_refused(self, pipe: _Pipe, refused: str) -> None:
        """Report a refused pull until pulls work again; recreate what is missing.

        A deleted stream (or durable consumer) is not recreated by anything
        else: agents' publishes would go nowhere for as long as the station runs.
        """
        kind = pipe.spec.kind
        reason = refused.strip().splitlines()[0] if refused.strip() else "no reason given"
        self._board.set_problem(f"{kind} pull", f"NATS: {kind} pull refused ({reason})", nats_side=True)
        now = time.monotonic()
        if self._nc.is_connected and now - pipe.repaired_at >= self._repair_interval_s:
            pipe.repaired_at = now
            js = self._nc.jetstream()
            spec = pipe.spec
            try:
                made = await ensure_stream(
                    js, spec, max_age_s=self._max_age_s, duplicate_window_s=self._dup_window_s
                )
                durable = pipe.consumer.durable
                made_consumer = await ensure_consumer(
                    js, spec, durable, ack_wait_s=self._ack_wait_s, max_ack_pending=self._max_ack_pending
                )
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("%s pull refused (%s); checking stream %s failed: %r", kind, reason, spec.stream, exc)
            else:
                # The pull subscription (this client's inbox) outlives both: no resubscribe.
                log.warning("%s pull refused (%s); stream %s %s, consumer %s %s", kind, reason, spec.stream,
                            made or "present", durable, made_consumer or "present")
        await self._sleep(1.0)

    async def _write_loop(self, pipe: _Pipe) -> None:
        while True:
            got = await self._unless_stopped(pipe.queue.get())
            if got is None:
                return
            batch = got.result()
            pipe.write_started[id(batch)] = time.monotonic()
            try:
                if not await self._write_with_retry(pipe, batch):
                    return  # stopping: the batch stays un-acked and is redelivered later
            finally:
                del pipe.write_started[id(batch)]
            pipe.unacked.pop(id(batch.msgs), None)

    async def _write_with_retry(self, pipe: _Pipe, batch: DecodedBatch) -> bool:
        kind = pipe.spec.kind
        msgs = batch.msgs
        delay = 0.1
        held_since = time.monotonic()
        failures = 0  # other than the database's
        while True:
            try:
                # Watchdog: a write stuck on a dying server counts as a failure
                # (the pool discards the interrupted connection).
                await asyncio.wait_for(self._write(batch.prepared), self._write_timeout_s)
            except TimeoutError:
                self._board.update(db_ok=False, last_error=f"database: no answer in {self._write_timeout_s:.0f} s")
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                # Valid protocol, but PostgreSQL refuses something in it (e.g. a
                # NUL character in a string): isolate the offending messages
                # instead of blocking the stream forever.
                log.warning("database refused a %s batch (%s); writing one by one", kind, exc)
                return await self._write_individually(pipe, batch)
            except psycopg.Error as exc:  # connection refused, server restarting, pool timeout ...
                self._board.update(db_ok=False, last_error=f"database: {exc}".strip())
            except Exception as exc:  # noqa: BLE001 - e.g. a failing event hook: retry, then isolate it
                failures += 1
                last = failures >= self._store_attempts
                log.warning("storing a %s batch failed (try %d of %d)%s", kind, failures, self._store_attempts,
                            "; writing it one by one" if last else "", exc_info=exc)
                if last:
                    return await self._write_individually(pipe, batch)
                self._board.set_problem(f"{kind} store", f"storing {kind}: {exc!r}")
            else:
                await self._ack(msgs)
                self._board.set_problem(f"{kind} store", None)
                return True
            if self._stop.is_set():
                return False
            held_since = await self._hold(msgs, held_since)
            await self._sleep(delay)
            delay = min(delay * 2, self._max_backoff_s)

    async def _write(self, prepared: PreparedBatch, *, hooks: bool = True) -> None:
        res = await self._store.write_prepared(prepared, hooks=hooks)
        if res.telemetry_rows:
            self._last_rows_at = time.monotonic()
        s = self._board.status
        self._board.update(
            db_ok=True,
            last_error=self._board.problems() if not s.db_ok else s.last_error,
            rows_written=s.rows_written + res.telemetry_rows,
            events_written=s.events_written + res.events,
            duplicates=s.duplicates + res.telemetry_duplicates + res.event_duplicates,
        )

    async def _write_individually(self, pipe: _Pipe, batch: DecodedBatch) -> bool:
        """Store a batch that failed as a whole message by message: what the
        protocol or PostgreSQL refuses on its own is rejected (counted,
        terminated, logged), the rest stored. An event an event hook keeps
        failing on is stored without its hooks.

        Anything else (the database unavailable, a station bug on the write
        path) is retried as long as it takes, as whole batches are: nothing an
        agent sent is dropped for the station's sake. The messages still held
        are kept from being redelivered meanwhile, and the stall check times
        each message, not the whole batch.
        """
        kind = pipe.spec.kind
        msgs = batch.msgs
        held_since = time.monotonic()
        for n, m in enumerate(msgs):
            pipe.write_started[id(batch)] = time.monotonic()
            _, bad, one = await decode_batch([m], kind)  # decoded and built fine once already
            if bad:
                err = bad[0][1]
                await self._reject(pipe, m, err.reason, str(err), err.__cause__)
                continue
            delay = 0.1
            failures = 0
            while True:
                try:
                    await asyncio.wait_for(self._write(one), self._write_timeout_s)
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    await self._reject(pipe, m, "db_refused", f"database refused it: {exc}")
                except (TimeoutError, psycopg.Error) as exc:
                    error = exc if isinstance(exc, psycopg.Error) else f"no answer in {self._write_timeout_s:.0f} s"
                    self._board.update(db_ok=False, last_error=f"database: {error}".strip())
                    if (waited := await self._back_off(msgs[n:], held_since, delay)) is None:
                        return False
                    held_since, delay = waited
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. a failing event hook
                    failures += 1
                    if failures == self._store_attempts and one.events and await self._store_without_hooks(
                        pipe, m, one, exc
                    ):
                        break
                    # Not the database and not this message's data (both handled above):
                    # a station bug on the write path. Dropping would lose what agents
                    # sent; the message waits in JetStream (24 h) for a fixed station,
                    # and the status bar says why nothing is stored meanwhile.
                    if failures <= self._store_attempts:
                        log.warning("storing a %s message failed (try %d)", kind, failures, exc_info=exc)
                    self._board.set_problem(f"{kind} store", f"storing {kind}: {exc!r}")
                    if (waited := await self._back_off(msgs[n:], held_since, delay)) is None:
                        return False
                    held_since, delay = waited
                    continue
                else:
                    await self._ack([m])
                break
        self._board.set_problem(f"{kind} store", None)
        return True

    async def _back_off(self, held: Sequence[Msg], held_since: float, delay: float) -> tuple[float, float] | None:
        """Wait ``delay`` before the next try, keeping the held messages reserved;
        (when they were last reserved, the next delay), or None when stopping."""
        if self._stop.is_set():
            return None
        held_since = await self._hold(held, held_since)
        await self._sleep(delay)
        return held_since, min(delay * 2, self._max_backoff_s)

    async def _store_without_hooks(self, pipe: _Pipe, m: Msg, one: PreparedBatch, exc: BaseException) -> bool:
        """An event an event hook keeps failing on is still stored, without its hooks
        (their side effects, e.g. a job's state, are skipped and logged): a station
        bug in a hook must not cost the fleet's event log. True when stored and acked."""
        try:
            await asyncio.wait_for(self._write(one, hooks=False), self._write_timeout_s)
        except Exception:  # noqa: BLE001 - not even the plain insert works: the caller keeps retrying
            return False
        log.error("an event hook failed %d times on %s; the event is stored without its hooks",
                  self._store_attempts, m.subject, exc_info=exc)
        await self._ack([m])
        return True

    async def _reject(
        self, pipe: _Pipe, m: Msg, reason: str, why: str, exc: BaseException | None = None
    ) -> None:
        """Count, log (with ``exc``'s traceback) and terminate one message that will never be stored."""
        log.warning("rejected %s message on %s (%s): %s", pipe.spec.kind, m.subject, reason, why, exc_info=exc)
        self.rejects.add(reason)
        self._board.update(rejected=self.rejects.total)
        await self._term(m)

    async def _hold(self, msgs: Sequence[Msg], since: float) -> float:
        """Keep held messages from being redelivered while we wait: tell JetStream
        they are in progress every ack_wait/2 (``since``: when last told)."""
        if time.monotonic() - since <= self._ack_wait_s / 2:
            return since
        for m in msgs:
            with contextlib.suppress(nats.errors.Error):
                await m.in_progress()
        return time.monotonic()

    async def _status_loop(self) -> None:
        js = self._nc.jetstream()
        while not self._stop.is_set():
            waiting = samples = 0
            known = True
            for pipe in self._pipes:
                try:
                    info = await js.consumer_info(pipe.consumer.stream, pipe.consumer.durable)
                    pipe.waiting = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
                except (TimeoutError, nats.errors.Error) as exc:
                    log.debug("consumer info for %s unavailable: %r", pipe.spec.kind, exc)
                    known = False
                waiting += pipe.waiting
                per_message = self._samples_per_message() if pipe.spec.kind == "telemetry" else 1.0
                samples += round(pipe.waiting * per_message)
            self._board.update(waiting=samples, waiting_messages=waiting, nats_ok=self._board.nats_ok())
            if known and waiting == 0:
                self.caught_up.set()
            self._check_stall()
            await self._sleep(self._status_interval_s)

    def _check_stall(self) -> None:
        """Report the database as down while a batch makes no progress.

        A write that hangs (e.g. a server that accepts connections but does
        not answer) only fails at ``write_timeout_s``, and a pool checkout on
        a dead server retries for its own timeout; neither should leave the
        UI saying "database OK" with a growing backlog meanwhile.
        """
        now = time.monotonic()
        for pipe in self._pipes:
            started = min(pipe.write_started.values(), default=None)
            if started is not None and now - started > self._stall_s and self._board.status.db_ok:
                self._board.update(
                    db_ok=False,
                    last_error=f"database: a {pipe.spec.kind} batch is not stored after {now - started:.0f} s",
                )

    async def _rollup_loop(self) -> None:
        assert self._rollup_interval_s is not None
        history = History(self._store.pool)
        # A minute is taken once quiet (or after waiting too long): keep refreshing that
        # long after the last new rows, so the last minute gets rolled up too. Markers
        # left over (the database was down meanwhile) go with the station's minutely
        # maintenance refresh.
        linger_s = ROLLUP_MAX_WAIT_S + ROLLUP_QUIET_S + self._rollup_interval_s
        while not self._stop.is_set():
            await self._sleep(self._rollup_interval_s)
            if time.monotonic() - self._last_rows_at > linger_s:
                continue
            try:
                await history.refresh_rollups()
            except psycopg.Error as exc:
                log.info("rollup refresh postponed: %s", exc)

    # ------------------------------------------------------------------ helpers

    def _samples_per_message(self) -> float:
        """GPU samples per telemetry message seen so far (1 until one is seen)."""
        return self._tel_rows / self._tel_messages if self._tel_messages else 1.0

    async def _put(self, pipe: _Pipe, item: DecodedBatch) -> bool:
        """Hand a batch to the writer; False when stopping first (the batch is
        then never acked and comes back to the next run)."""
        return await self._unless_stopped(pipe.queue.put(item)) is not None

    async def _unless_stopped(self, aw: Awaitable[_T]) -> asyncio.Future[_T] | None:
        """``aw`` run to completion, or cancelled (then None) when stop() comes first."""
        fut = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({fut, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if fut.done():
            return fut
        fut.cancel()
        return None

    async def _ack(self, msgs: Sequence[Msg]) -> None:
        # Plain (not synchronous) acks: a lost ack only means a redelivery,
        # which the idempotent store absorbs.
        try:
            for m in msgs:
                await m.ack()
        except nats.errors.Error as exc:
            log.info("acks not sent (%r); the messages will be redelivered and skipped", exc)

    async def _term(self, m: Msg) -> None:
        with contextlib.suppress(nats.errors.Error):
            await m.term()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
