"""Alert persistence: row helpers, the PostgreSQL repository and the write-behind writer.

``AlertManager`` (in ``alerts``) stays pure; this module listens to its
callbacks and stores every alert change without the tick awaiting the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aether_desktop.services.alerts import Alert, AlertManager, AlertState

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("aether.alerts")

_COLS = ("id, host, gpus, gpu_first_ts, kind, severity, source, state, first_ts, raised_ts, last_ts, "
         "cleared_ts, acked_ts, snoozed_until, score, sample_count, message, model_version")


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def alert_row(a: Alert, model_version: str | None = None) -> tuple[object, ...]:
    """The SQL parameters for one alert, in ``_COLS`` order (pure; unit-tested)."""
    return (a.id, a.host, list(a.gpus), [_dt(t) for _, t in a.gpu_first_ts], a.kind, a.severity, a.source,
            a.state, _dt(a.first_ts), _dt(a.raised_ts), _dt(a.last_ts), _dt(a.cleared_ts), _dt(a.acked_ts),
            _dt(a.snoozed_until), a.score, a.count, a.message, model_version)


def alert_from_row(r: Sequence[Any]) -> Alert:
    gpu_ts = tuple((int(g), float(_ts(t) or 0.0)) for g, t in zip(r[2], r[3], strict=True))
    return Alert(id=str(r[0]), host=r[1], gpu_first_ts=gpu_ts, kind=r[4], severity=r[5], source=r[6],
                 state=r[7], first_ts=float(_ts(r[8]) or 0.0), raised_ts=float(_ts(r[9]) or 0.0),
                 last_ts=float(_ts(r[10]) or 0.0), cleared_ts=_ts(r[11]), acked_ts=_ts(r[12]),
                 snoozed_until=_ts(r[13]), score=float(r[14]), count=int(r[15]), message=r[16])


class AlertRepository:
    """Alerts in PostgreSQL (table from migration 010_alerts.sql); every method uses the pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def save_many(self, alerts: Sequence[Alert], model_version: str | None = None) -> None:
        if not alerts:
            return
        placeholders = ", ".join(["%s"] * len(_COLS.split(",")))
        updates = ", ".join(f"{c.strip()} = EXCLUDED.{c.strip()}" for c in _COLS.split(",")[1:]
                            if c.strip() != "model_version")
        sql = (f"INSERT INTO alerts ({_COLS}) VALUES ({placeholders}) ON CONFLICT (id) DO UPDATE SET "
               f"{updates}, updated_at = now()")
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(sql, [alert_row(a, model_version) for a in alerts])

    async def save(self, alert: Alert, model_version: str | None = None) -> None:
        await self.save_many([alert], model_version)

    async def load_open(self) -> list[Alert]:
        return await self.recent(open_only=True, limit=10_000)

    async def recent(self, *, since: float | None = None, host: str | None = None,
                     state: AlertState | None = None, open_only: bool = False, limit: int = 500) -> list[Alert]:
        where: list[str] = []
        params: list[object] = []
        if since is not None:
            where.append("last_ts >= %s")
            params.append(_dt(since))
        if host is not None:
            where.append("host = %s")
            params.append(host)
        if state is not None:
            where.append("state = %s")
            params.append(state)
        if open_only:
            where.append("state <> 'cleared'")
        sql = f"SELECT {_COLS} FROM alerts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY first_ts DESC LIMIT %s"
        params.append(limit)
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(sql, params)
            rows = await cur.fetchall()
        return [alert_from_row(r) for r in rows]

    async def save_model_info(self, info: Mapping[str, Any]) -> None:
        """Record an anomaly-model version (its sidecar JSON) so every station sees its history."""
        from psycopg.types.json import Jsonb

        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO anomaly_models (version, origin, train_from, train_to, n_samples, info) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (version) DO UPDATE SET info = EXCLUDED.info",
                (info["version"], info.get("origin", "bootstrap"), _dt(info.get("train_from")),
                 _dt(info.get("train_to")), int(info.get("n_samples", 0)), Jsonb(dict(info))))


class AlertWriter:
    """Write-behind persistence: the tick never awaits the database.

    Snapshots are coalesced per alert id (the newest wins), so a burst of
    updates costs one row write, and writes stay ordered per alert. A failed
    write is logged and retried with backoff; nothing is dropped while the
    database is down. The writer may be built before the database opens
    (``repo=None``): it queues from the first alert and writes once ``run`` is
    given a repository, so alerts raised while the database starts are kept.
    The queue is bounded (``max_pending`` alerts); beyond it the oldest entry
    is dropped, with a warning.
    """

    def __init__(self, repo: AlertRepository | None, manager: AlertManager,
                 model_version: Callable[[], str | None] = lambda: None, max_pending: int = 10_000) -> None:
        self.repo = repo
        self._model_version = model_version
        self._max_pending = max_pending
        self._pending: dict[str, Alert] = {}
        self.dropped = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        for cb in (manager.on_alert_raised, manager.on_alert_updated, manager.on_alert_cleared):
            cb.connect(self._enqueue)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _enqueue(self, alert: Alert) -> None:
        self._pending[alert.id] = alert
        if len(self._pending) > self._max_pending:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            if self.dropped == 0:
                log.warning("more than %d alert changes wait for the database; dropping the oldest",
                            self._max_pending)
            self.dropped += 1
        self._idle.clear()
        self._wake.set()

    async def run(self, repo: AlertRepository | None = None) -> None:
        if repo is not None:
            self.repo = repo
        if self.repo is None:
            raise RuntimeError("the alert writer needs a repository to run")
        store = self.repo
        backoff = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            if not batch:
                self._idle.set()
                continue
            try:
                await store.save_many(list(batch.values()), self._model_version())
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - any database failure: keep the alerts, retry
                log.warning("saving %d alerts failed (%s); retrying in %.1f s", len(batch), exc, backoff)
                for aid, a in batch.items():
                    self._pending.setdefault(aid, a)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                self._wake.set()
                continue
            if not self._pending:
                self._idle.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is stored (``run`` must be running)."""
        await self._idle.wait()
