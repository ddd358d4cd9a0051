"""The composition root: builds and runs the station's services (no Qt here).

The same ``Station`` runs behind the window and in ``aether --headless``.
What the operator must see (connection state, database state, notices) goes
through a ``StationSink``: the Qt state object in the window, a logger when
headless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aether_desktop.config import StationConfig
from aether_desktop.services.bus import Bus, ConnState
from aether_desktop.services.demo import DemoFleet
from aether_desktop.services.fleet import FleetState
from aether_protocol import Event, Telemetry

log = logging.getLogger("aether.station")


class StationSink(Protocol):
    def set_connection(self, state: str, detail: str) -> None: ...

    def set_db_status(self, ok: bool, waiting: int, detail: str) -> None: ...

    def post_notice(self, level: str, text: str) -> None: ...


class LogSink:
    """Headless: the operator reads the log."""

    def __init__(self) -> None:
        self._last_db: tuple[bool, str] | None = None
        self._last_conn: tuple[str, str] | None = None

    def set_connection(self, state: str, detail: str) -> None:
        if (state, detail) != self._last_conn:  # a failing connect retries every few seconds: say it once
            self._last_conn = (state, detail)
            log.info("NATS %s: %s", state, detail)

    def set_db_status(self, ok: bool, waiting: int, detail: str) -> None:
        # The backlog count changes every second while the database is down: log the change of state.
        key = (ok, re.sub(r"\d[\d,]*", "N", detail))
        if key != self._last_db:
            self._last_db = key
            if ok:
                log.info("database %s", detail or "ok")
            elif detail.startswith(("starting", "connecting")):  # not a problem yet
                log.info("database: %s", detail)
            else:
                log.warning("%s", detail if detail.startswith("database") else f"database unavailable: {detail}")

    def post_notice(self, level: str, text: str) -> None:
        getattr(log, level if level in ("info", "warning", "error") else "info")(text)


class Station:
    def __init__(self, cfg: StationConfig, sink: StationSink) -> None:
        self.cfg = cfg
        self.sink = sink
        # 131,072 GPU slots: the default 65,536 would silently drop GPUs of a 12,500 x 8 fleet.
        self.fleet = FleetState(offline_intervals=cfg.offline_after_intervals, max_gpus=131_072)
        self.bus: Bus | None = None
        self.demo: DemoFleet | None = None
        self.nats_servers: tuple[str, ...] = cfg.nats_servers
        self.nats_user: str | None = cfg.nats_user
        self.nats_password: str | None = cfg.nats_password
        self.store: Any = None
        self.ingest: Any = None
        self.history: Any = None
        self._embedded_nats: Any = None
        self._ingest_nc: Any = None
        self._nats_failure: str | None = None
        self._embedded_pg: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._event_listeners: list[Callable[[Event], None]] = []
        self._telemetry_listeners: list[Callable[[Telemetry, float], None]] = []
        self._db_openers: list[Callable[[Any], Awaitable[None]]] = []
        self._db_ready = asyncio.Event()
        self.db_error: str | None = None
        self.stopping = False
        self.dsn: str | None = None
        self._stoppers: list[Callable[[], Awaitable[None]]] = []
        self._starters: list[Callable[[], object]] = []

    # ------------------------------------------------------------------ wiring

    def add_event_listener(self, fn: Callable[[Event], None]) -> None:
        self._event_listeners.append(fn)

    def add_telemetry_listener(self, fn: Callable[[Telemetry, float], None]) -> None:
        self._telemetry_listeners.append(fn)

    def _on_telemetry_batch(self, msgs: Sequence[Telemetry], received_at: float) -> None:
        # One numpy write per array per chunk of messages (the bus drains its queue in ~3 ms chunks).
        self.fleet.ingest_many(msgs, received_at)
        for fn in self._telemetry_listeners:
            for msg in msgs:
                fn(msg, received_at)

    def _on_event(self, ev: Event) -> None:
        for fn in self._event_listeners:
            fn(ev)

    def _on_state(self, state: ConnState, detail: str) -> None:
        self.sink.set_connection(str(state), detail)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)
            self.sink.post_notice("error", f"{task.get_name()} stopped: {exc}")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start everything; never raises for an embedded NATS server that cannot start.

        Such a failure (binary missing, port taken) is shown to the operator and the
        server is retried in the background; the database and history come up meanwhile.
        """
        cfg = self.cfg
        settings = cfg.nats_settings(self.nats_servers, self.nats_user, self.nats_password)
        self.bus = Bus(settings, cfg.subject_prefix, on_event=self._on_event, on_state=self._on_state,
                       on_telemetry_batch=self._on_telemetry_batch)
        if cfg.embedded_nats:
            from aether_desktop.services.embedded_nats import EmbeddedNats

            self._embedded_nats = EmbeddedNats(cfg.data_dir, listen_host=cfg.embedded_listen, port=cfg.embedded_port,
                                               tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, tls_ca=cfg.tls_ca)
            try:
                await self._bring_up_embedded_nats(initial=True)
            except Exception as exc:  # binary missing, port in use, bad TLS files: say so, retry later
                self._report_nats_failure(exc, "could not start the embedded NATS server")
            self.spawn(self._watch_embedded_nats(), "embedded NATS watchdog")
        else:
            await self.bus.start(wait=5.0)
        if not cfg.no_db:
            self.spawn(self._open_database(), "database")
        else:
            self.sink.set_db_status(True, 0, "history is off (--no-db)")
        if cfg.demo_hosts and self.nats_servers:  # else: once the embedded server is up
            self.start_demo(cfg.demo_hosts)
        for fn in self._starters:
            fn()

    def start_demo(self, n_hosts: int | None = None) -> None:
        if not self.nats_servers:
            raise RuntimeError("the NATS server is not running (see the NATS state in the status bar)")
        if self.demo is None:
            self.demo = DemoFleet(self.nats_servers, self.nats_user, self.nats_password, self.cfg.subject_prefix,
                                  self.cfg.data_dir)
        hosts = self.demo.start(n_hosts or self.cfg.demo_hosts or 4, self.cfg.demo_gpus, self.cfg.demo_seed)
        self.sink.post_notice("info", f"demo fleet started: {len(hosts)} simulated host(s)")

    async def _open_database(self) -> None:
        """Start or reach the database, retrying forever; the live view works meanwhile."""
        from aether_desktop.services.history import History
        from aether_desktop.services.ingest import JetStreamIngest
        from aether_desktop.services.store import Store

        loop = asyncio.get_running_loop()
        dsn = self.cfg.db_dsn
        if dsn is None:
            from aether_desktop.services.embedded_pg import EmbeddedPostgres

            self._embedded_pg = EmbeddedPostgres(self.cfg.data_dir)
            self.sink.set_db_status(False, 0, "starting embedded PostgreSQL")
            try:
                info = await loop.run_in_executor(None, self._embedded_pg.start)
            except Exception as exc:  # the wheel may be missing or the data folder unusable
                self.db_error = f"embedded PostgreSQL failed: {exc}"
                self.sink.set_db_status(False, 0, self.db_error)
                log.error("%s", self.db_error)
                return
            dsn = info.dsn
        self.dsn = dsn
        self.sink.set_db_status(False, 0, "connecting to the database")
        store = Store(dsn)
        delay = 1.0
        while True:
            try:
                await store.open()
                break
            except Exception as exc:  # down, unreachable, auth: say so and retry
                error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if error != self.db_error:  # once per distinct error, not once per retry
                    log.warning("database %s unavailable: %s; retrying", _safe_dsn(dsn), error)
                self.db_error = error
                self.sink.set_db_status(False, 0, f"database unavailable: {self.db_error}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        self.store = store
        self.history = History(store.pool, raw_retention_days=self.cfg.retention_raw_days)
        await self._before_ingest(store)
        assert self.bus is not None
        bus = self.bus

        def start_ingest(nc: Any) -> None:
            # Called again with a new client after a from-scratch reconnect (the server closed
            # the connection, or the embedded server came back on another port): the old
            # ingest's client is closed for good, so it is replaced.
            if self.ingest is not None and self._ingest_nc is nc:
                return
            old, self._ingest_nc = self.ingest, nc
            self.ingest = JetStreamIngest(
                nc, store, prefix=self.cfg.subject_prefix, durable=self.cfg.durable,
                max_age_s=self.cfg.stream_max_age_h * 3600, on_status=self._on_ingest_status,
            )
            self.spawn(self._run_ingest(self.ingest, old), "ingest")

        bus.add_connect_listener(start_ingest)
        self._db_ready.set()
        self.sink.set_db_status(True, 0, "")
        self.spawn(self._maintenance(), "maintenance")
        self.spawn(self._backfill_live_view(), "live view backfill")

    async def _backfill_live_view(self, catch_up_s: float = 30.0) -> None:
        """Refill the heatmap and live plots with the last minutes from the database.

        After a restart the live view would start empty. What agents published
        while the station was away is still in JetStream, so the ingest gets
        ``catch_up_s`` to store it first; then whatever is stored is read once.
        A failure only costs the backfill (the live view fills as usual).
        """
        from aether_desktop.services.fleet import RING_METRICS

        deadline = time.monotonic() + catch_up_s
        while time.monotonic() < deadline and not (self.ingest is not None and self.ingest.caught_up.is_set()):
            await asyncio.sleep(0.5)
        fleet = self.fleet
        try:
            got = await self.history.recent(time.time(), fleet.history_s, RING_METRICS)
        except Exception as exc:  # noqa: BLE001 - a DB hiccup: the live view fills as usual
            log.warning("live view not backfilled from the database: %s", exc)
            return
        placed = fleet.backfill(got.identities, got.keys, got.ts, got.values, time.time())
        log.info("live view backfilled with %d stored samples of %d GPUs (from %s)", placed,
                 len(got.identities), time.strftime("%H:%M:%S", time.localtime(got.start)))

    async def _run_ingest(self, ingest: Any, old: Any) -> None:
        """Start the ingest, retrying: JetStream may not be ready the moment the client connects."""
        if old is not None:
            try:
                await old.stop(grace_s=1.0)
            except Exception as exc:  # its client is gone; nothing else to release
                log.info("old ingest stopped with: %s", exc)
        delay = 1.0
        while self.ingest is ingest:
            try:
                await ingest.start()
                return
            except Exception as exc:  # no JetStream yet, a reconnect in progress: say so and retry
                log.warning("history ingest could not start: %s; retrying in %.0f s", exc, delay)
                self.sink.set_db_status(False, 0, f"history ingest not running: {exc}")
                with contextlib.suppress(Exception):
                    await ingest.stop(grace_s=0.5)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _watch_embedded_nats(self, every_s: float = 2.0) -> None:
        """Start the embedded nats-server if it could not start, and again if it dies: nothing else would.

        The bus and the agents retry a dead port forever. The server is shared by the
        windows on this data folder; the first watchdog to notice respawns it and the
        others reuse it. With a random port (the default) it comes back on a new one,
        so the bus and the demo agents are pointed at it.
        """
        from aether_desktop.services.embedded_nats import probe_server_name

        loop = asyncio.get_running_loop()
        misses = 0
        delay = every_s
        while True:
            await asyncio.sleep(delay)
            if self.nats_servers:
                if self.bus is None or self.bus.state == ConnState.CONNECTED:
                    misses, delay = 0, every_s
                    continue
                url = urlsplit(self.nats_servers[0])
                answer = await loop.run_in_executor(None, probe_server_name, url.hostname or "127.0.0.1",
                                                    url.port or 4222, 1.0)
                misses = 0 if answer is not None else misses + 1
                if misses < 2:  # one miss may be a server still starting (another window respawning it)
                    continue
            try:
                if self.nats_servers:
                    await loop.run_in_executor(None, self._embedded_nats.stop)
                await self._bring_up_embedded_nats(restart=bool(self.nats_servers))
            except Exception as exc:  # binary gone, port taken, disk full: say so, try again later
                delay = min(max(delay, every_s) * 2, 60.0)
                state = "is down" if self.nats_servers else "could not start"
                self._report_nats_failure(exc, f"embedded NATS server {state} (retrying in {delay:.0f} s)")
            else:
                misses, delay = 0, every_s

    def _report_nats_failure(self, exc: BaseException, what: str) -> None:
        summary = failure_summary(exc)
        if summary == self._nats_failure:  # retries of the same failure: the first report stands
            return
        self._nats_failure = summary
        log.error("%s: %s", what, exc)
        text = f"{what}: {summary}"
        self.sink.set_connection("closed", text)
        self.sink.post_notice("error", text)

    async def _bring_up_embedded_nats(self, *, initial: bool = False, restart: bool = False) -> None:
        """Start (or join) the embedded server and point the bus and the demo agents at it."""
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(None, self._embedded_nats.start)
        self._nats_failure = None
        how = "reused" if info.reused else "started"
        if restart:
            how = "another window started it again" if info.reused else "started it again"
            log.warning("embedded nats-server had stopped; %s at %s", how, info.url)
            self.sink.post_notice("warning", f"embedded NATS server had stopped; {how} at {info.url}")
        else:
            log.info("embedded nats-server at %s (%s)", info.url, how)
        changed = (info.url,) != self.nats_servers
        self.nats_servers = (info.url,)
        self.nats_user, self.nats_password = info.user, info.password
        assert self.bus is not None
        if not self.bus.started:
            await self.bus.reconnect_to(self.cfg.nats_settings(self.nats_servers, info.user, info.password))
            await self.bus.start(wait=5.0)
        elif changed:  # same port: the clients reconnect by themselves
            await self.bus.reconnect_to(self.cfg.nats_settings(self.nats_servers, info.user, info.password))
        if self.demo is not None and changed:
            await loop.run_in_executor(None, self.demo.set_servers, self.nats_servers)
        elif self.demo is None and self.cfg.demo_hosts and not initial and not self.stopping:
            self.start_demo(self.cfg.demo_hosts)  # asked for at start, when the server was not up yet

    async def _before_ingest(self, store: Any) -> None:
        """Hook for services that must register store hooks before the first batch (alerts, jobs)."""
        for fn in self._db_openers:
            await fn(store)

    def add_db_opener(self, fn: Callable[[Any], Awaitable[None]]) -> None:
        self._db_openers.append(fn)

    def add_starter(self, fn: Callable[[], object]) -> None:
        """Called at the end of start() (background services that need the running loop)."""
        self._starters.append(fn)

    def add_stopper(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Called first on stop (services that hold DB connections or locks)."""
        self._stoppers.append(fn)

    def _on_ingest_status(self, status: Any) -> None:
        if status.db_ok and status.last_error:
            # The database is fine but samples do not reach it (a stream that refuses
            # pulls, a failing hook): "database ok" would hide that nothing is stored.
            self.sink.set_db_status(False, 0, f"history ingest: {status.last_error}")
            return
        detail = "" if status.db_ok else f"database unavailable, {status.waiting} samples waiting"
        if not status.db_ok and status.last_error:
            detail += f" ({status.last_error})"
        self.sink.set_db_status(bool(status.db_ok), int(status.waiting), detail)

    async def _maintenance(self) -> None:
        """Rollups every minute, retention every hour."""
        last_retention = 0.0
        while True:
            await asyncio.sleep(60)
            try:
                await self.history.refresh_rollups()
                if time.monotonic() - last_retention > 3600:
                    last_retention = time.monotonic()
                    await self.history.run_retention(self.cfg.retention_raw_days, self.cfg.retention_rollup_days)
            except Exception as exc:  # a DB hiccup: next round retries
                log.warning("maintenance failed: %s", exc)

    async def wait_db(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._db_ready.wait()
        return self._db_ready.is_set()

    async def stop(self) -> None:
        log.info("station stopping")
        self.stopping = True
        for fn in self._stoppers:
            try:
                await fn()
            except Exception:  # keep stopping the rest
                log.exception("error while stopping a service")
        if self.demo is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.demo.stop)
        if self.ingest is not None:
            with contextlib.suppress(Exception):
                await self.ingest.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.bus is not None:
            await self.bus.stop()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self._embedded_pg is not None:
            self._embedded_pg.stop()
        if self._embedded_nats is not None:
            self._embedded_nats.stop()


def failure_summary(exc: BaseException) -> str:
    """Pure: one line for the operator from an error that may carry a server log tail.

    nats-server's reason is its last (fatal) log line, e.g. "address already in use";
    the timestamps and pids are dropped so that a retry failing the same way reads the same.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) == 1:
        return lines[0]
    fatal = [ln for ln in lines[1:] if "[FTL]" in ln or "[ERR]" in ln] or lines[-1:]
    reason = re.sub(r"^\[\d+\]\s+\S+\s+\S+\s+\[\w+\]\s*", "", fatal[-1])
    return f"{lines[0].rstrip(':')}: {reason}"


def _safe_dsn(dsn: str) -> str:
    """A DSN fit for the log: any password is masked."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"(password=)\S+", r"\1***", dsn))


def data_dir_ok(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create data folder {path}: {exc}"
    return None
