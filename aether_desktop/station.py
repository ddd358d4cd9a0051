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
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

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

    def set_connection(self, state: str, detail: str) -> None:
        log.info("NATS %s: %s", state, detail)

    def set_db_status(self, ok: bool, waiting: int, detail: str) -> None:
        key = (ok, detail)
        if key != self._last_db:
            self._last_db = key
            (log.info if ok else log.warning)("database %s%s", "ok" if ok else "unavailable",
                                              f": {detail}" if detail else "")

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
        self._embedded_pg: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._event_listeners: list[Callable[[Event], None]] = []
        self._telemetry_listeners: list[Callable[[Telemetry, float], None]] = []
        self._db_openers: list[Callable[[Any], Awaitable[None]]] = []
        self._db_ready = asyncio.Event()
        self.db_error: str | None = None
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
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        if cfg.embedded_nats:
            from aether_desktop.services.embedded_nats import EmbeddedNats

            self._embedded_nats = EmbeddedNats(cfg.data_dir, listen_host=cfg.embedded_listen, port=cfg.embedded_port,
                                               tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, tls_ca=cfg.tls_ca)
            info = await loop.run_in_executor(None, self._embedded_nats.start)
            self.nats_servers = (info.url,)
            self.nats_user, self.nats_password = info.user, info.password
            log.info("embedded nats-server at %s (%s)", info.url, "reused" if info.reused else "started")
        settings = cfg.nats_settings(self.nats_servers, self.nats_user, self.nats_password)
        self.bus = Bus(settings, cfg.subject_prefix, on_event=self._on_event, on_state=self._on_state,
                       on_telemetry_batch=self._on_telemetry_batch)
        await self.bus.start(wait=5.0)
        if not cfg.no_db:
            self.spawn(self._open_database(), "database")
        else:
            self.sink.set_db_status(True, 0, "history is off (--no-db)")
        if cfg.demo_hosts:
            self.start_demo(cfg.demo_hosts)
        for fn in self._starters:
            fn()

    def start_demo(self, n_hosts: int | None = None) -> None:
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
        store = Store(dsn)
        delay = 1.0
        while True:
            try:
                await store.open()
                break
            except Exception as exc:  # down, unreachable, auth: say so and retry
                self.db_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.sink.set_db_status(False, 0, f"database unavailable: {self.db_error}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        self.store = store
        self.history = History(store.pool)
        await self._before_ingest(store)
        assert self.bus is not None
        bus = self.bus

        def start_ingest(nc: Any) -> None:
            if self.ingest is not None:
                return
            self.ingest = JetStreamIngest(
                nc, store, prefix=self.cfg.subject_prefix, durable=self.cfg.durable,
                max_age_s=self.cfg.stream_max_age_h * 3600, on_status=self._on_ingest_status,
            )
            self.spawn(self.ingest.start(), "ingest")

        bus.add_connect_listener(start_ingest)
        self._db_ready.set()
        self.sink.set_db_status(True, 0, "")
        self.spawn(self._maintenance(), "maintenance")

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
            await asyncio.wait_for(self._db_ready.wait(), timeout)
        return self._db_ready.is_set()

    async def stop(self) -> None:
        log.info("station stopping")
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


def data_dir_ok(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create data folder {path}: {exc}"
    return None
